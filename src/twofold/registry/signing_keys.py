"""The provider's published signing keys (public halves only): what the portal's JWKS lists.
See :mod:`twofold.provider_keys`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry import audit
from twofold.registry.auth import Principal
from twofold.registry.base import RegistryBase
from twofold.registry.models import SigningKey, utcnow
from twofold.registry.rules import NotFound, RegistryError

_PUBLIC_MEMBERS = frozenset({"kty", "crv", "x", "y", "n", "e", "kid", "use", "alg"})


def signing_key_view(row: SigningKey) -> dict[str, Any]:
    return {
        "kid": row.kid,
        "purpose": row.purpose,
        "alg": row.jwk.get("alg"),
        "kty": row.jwk.get("kty"),
        "published_at": row.published_at.isoformat(),
        "last_seen_at": row.last_seen_at.isoformat(),
        "retired_at": row.retired_at.isoformat() if row.retired_at else None,
    }


class SigningKeysMixin(RegistryBase):
    """Keys are published by the processes that sign (at start), listed by the portal's JWKS,
    and retired by operators (a retired key leaves the JWKS: what it signed no longer
    verifies)."""

    async def publish_signing_key(self, purpose: str, jwk: dict[str, Any]) -> None:
        """Record the public ``jwk`` (with its ``kid``) as one the provider signs ``purpose``
        with; idempotent (a restart only records that the key is still in use). A retired key
        is refused: a process must not sign with a key clients no longer trust."""
        from twofold.provider_keys import PURPOSES

        if purpose not in PURPOSES or not isinstance(jwk.get("kid"), str) or set(jwk) - _PUBLIC_MEMBERS:
            raise RegistryError("not a public signing key", code="signing_key_invalid")
        kid = str(jwk["kid"])

        async def work(session: AsyncSession) -> None:
            row = await session.get(SigningKey, kid)
            now = utcnow()
            if row is None:
                session.add(
                    SigningKey(kid=kid, purpose=purpose, jwk=dict(jwk), published_at=now, last_seen_at=now)
                )
                await session.flush()
                await audit.append(
                    session,
                    actor="system",
                    action="signing_key.publish",
                    object_type="signing_key",
                    object_id=kid,
                    details={"purpose": purpose, "alg": jwk.get("alg"), "kty": jwk.get("kty")},
                )
                return
            if row.retired_at is not None:
                raise RegistryError(
                    f"the {purpose} signing key {kid} was retired on {row.retired_at:%Y-%m-%d}; give this "
                    "node a new key file (remove the old one to have a new key made) and start it again",
                    code="signing_key_retired",
                )
            row.last_seen_at = now

        await self._tx(work)

    async def signing_jwks(self) -> dict[str, Any]:
        """The JWKS of every published key that is not retired, oldest first."""
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(SigningKey)
                    .where(SigningKey.retired_at.is_(None))
                    .order_by(SigningKey.published_at)
                )
            ).scalars()
            return {"keys": [dict(row.jwk) for row in rows]}

    async def list_signing_keys(self, actor: Principal) -> list[dict[str, Any]]:
        self._need_operator(actor)
        async with self.sessions() as session:
            rows = (await session.execute(select(SigningKey).order_by(SigningKey.published_at))).scalars()
            return [signing_key_view(row) for row in rows]

    async def retire_signing_key(self, actor: Principal, kid: str) -> dict[str, Any]:
        self._need_operator(actor)

        async def work(session: AsyncSession) -> dict[str, Any]:
            row = await session.get(SigningKey, kid)
            if row is None:
                raise NotFound(f"no signing key {kid!r}", code="signing_key_not_found")
            if row.retired_at is None:
                row.retired_at = utcnow()
                await session.flush()
                await audit.append(
                    session,
                    actor=actor.name,
                    action="signing_key.retire",
                    object_type="signing_key",
                    object_id=kid,
                    details={"purpose": row.purpose},
                )
            return signing_key_view(row)

        return await self._tx(work)
