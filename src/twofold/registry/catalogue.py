"""The catalogue: environments and API products."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.crypto import certs as _certs
from twofold.registry import audit
from twofold.registry.auth import (
    Principal,
)
from twofold.registry.base import RegistryBase, _slug
from twofold.registry.models import (
    ApiProduct,
    Environment,
)
from twofold.registry.rules import (
    Conflict,
    NotFound,
    RegistryError,
)

SIGNATURE_POLICIES = ("required", "optional", "none")
DEFAULT_CONTENT_TYPES = ["application/json", "application/jose", "text/xml"]

DEFAULT_ENVIRONMENTS = [
    {
        "id": "cat",
        "name": "Client Testing",
        "allow_self_signed": True,
        "gateway_port": 8443,
        "position": 1,
        "max_validity_days": 365,
    },
    {
        "id": "prod",
        "name": "Production",
        "allow_self_signed": False,
        "gateway_port": 9443,
        "position": 2,
        "max_validity_days": 730,
    },
]
MAX_VALIDITY_DAYS = 825  # what an operator may allow at most (the CA/B Forum's old ceiling)
MAX_REPLAY_WINDOW = 86400  # seconds: a day at most either side of the gateway's clock
HEADER_FIELD = "header:"  # a replay field read from the JWS protected header, not the payload
_FIELD_NAME = re.compile(r"[A-Za-z0-9_$@:/.#+-]{1,120}")


def field_ref(value: str, what: str) -> tuple[bool, tuple[str, ...]]:
    """Where a replay field is: ``(True, (name,))`` for ``header:<name>`` (a JWS header
    parameter, e.g. ``header:http://openbanking.org.uk/iat``), else ``(False, path)`` for a
    payload field — ``iat``, or ``Data.Initiation.InstructionIdentification`` for a nested one."""
    value = value.strip()
    if value.startswith(HEADER_FIELD):
        name = value[len(HEADER_FIELD) :]
        if not _FIELD_NAME.fullmatch(name):
            raise RegistryError(
                f"{what} {value!r}: write header:<parameter name>, e.g. header:http://openbanking.org.uk/iat",
                code="product_invalid",
            )
        return True, (name,)
    path = tuple(value.split("."))
    if not value or len(path) > 8 or not all(p and _FIELD_NAME.fullmatch(p) and "/" not in p for p in path):
        raise RegistryError(
            f"{what} {value!r}: name a payload field (iat, or a.b.c for a nested one) or header:<parameter>",
            code="product_invalid",
        )
    return False, path


def product_view(row: ApiProduct) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "path_prefix": row.path_prefix,
        "upstream": row.upstream,
        "signature": row.signature,
        "content_types": list(row.content_types),
        "algorithms": list(row.algorithms),
        "replay_window": row.replay_window,
        "replay_iat": row.replay_iat,
        "replay_id": row.replay_id,
        "sign_responses": bool(row.sign_responses),
    }


def env_view(row: Environment) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "allow_self_signed": row.allow_self_signed,
        "gateway_port": row.gateway_port,
        "has_ca": bool(row.ca_pem),
        "issues_certificates": bool(row.issuing_ca_pem),
        "issuing_ca": _ca_subject(row.issuing_ca_pem),
        "max_validity_days": row.max_validity_days,
    }


def _ca_subject(pem: str | None) -> str | None:
    if not pem:
        return None
    return _certs.load_certificate(pem.encode()).subject.rfc4514_string()


def environment_cas(env: Environment) -> list[x509.Certificate]:
    """The CAs whose certificates an environment accepts: those the operator configured and
    the environment's own issuing CA."""
    cas = _certs.load_certificates(env.ca_pem.encode()) if env.ca_pem else []
    if env.issuing_ca_pem:
        issuing = _certs.load_certificate(env.issuing_ca_pem.encode())
        if all(c != issuing for c in cas):
            cas.append(issuing)
    return cas


class CatalogueMixin(RegistryBase):
    """Environments and API products (operators), and the defaults of a new registry."""

    # --- bootstrap ------------------------------------------------------------------------

    async def ensure_defaults(self) -> list[str]:
        """Default environments if there are none; returns what was created."""

        async def work(session: AsyncSession) -> list[str]:
            existing = (await session.execute(select(func.count()).select_from(Environment))).scalar()
            if existing:
                return []
            for env in DEFAULT_ENVIRONMENTS:
                session.add(Environment(**env))
            await audit.append(
                session,
                actor="system",
                action="environment.defaults",
                object_type="environment",
                object_id="cat,prod",
            )
            await self._bump(session)
            return [e["id"] for e in DEFAULT_ENVIRONMENTS]  # type: ignore[misc]

        return await self._tx(work)

    # --- environments and products ----------------------------------------------------------

    async def list_environments(self) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            rows = (
                await session.execute(select(Environment).order_by(Environment.position, Environment.id))
            ).scalars()
            return [env_view(e) for e in rows]

    async def environment(self, env_id: str) -> dict[str, Any]:
        async with self.sessions() as session:
            env = await session.get(Environment, env_id)
            if env is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
            return env_view(env)

    async def issuing_ca_pem(self, env_id: str) -> str | None:
        """The certificate (PEM) of the CA that issues for ``env_id``, if it issues."""
        async with self.sessions() as session:
            env = await session.get(Environment, env_id)
            if env is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
            return env.issuing_ca_pem

    async def save_environment(
        self,
        actor: Principal,
        env_id: str,
        *,
        name: str | None = None,
        allow_self_signed: bool | None = None,
        ca_pem: str | None = None,
        gateway_port: int | None = None,
        issuing_ca_pem: str | None = None,
        max_validity_days: int | None = None,
    ) -> dict[str, Any]:
        """Create or update an environment. ``issuing_ca_pem`` names the CA that issues from
        CSRs (its key stays with the portal, see :mod:`twofold.issuing`); "" turns it off."""
        self._need_operator(actor)
        env_id = _slug(env_id, "the environment id")
        if max_validity_days is not None and not 1 <= max_validity_days <= MAX_VALIDITY_DAYS:
            raise RegistryError(
                f"the maximum validity must be between 1 and {MAX_VALIDITY_DAYS} days",
                code="validity_invalid",
            )
        if issuing_ca_pem:
            try:
                issuing_ca_pem = _certs.certificate_pem(
                    _certs.load_certificate(issuing_ca_pem.encode(), name="the issuing CA certificate")
                ).decode()
            except RegistryError:
                raise
            except Exception as exc:
                raise RegistryError(
                    f"the issuing CA certificate cannot be read: {exc}", code="ca_invalid"
                ) from None
        if ca_pem:
            try:
                cas = _certs.load_certificates(ca_pem.encode(), name="the CA file")
            except RegistryError:
                raise
            except Exception as exc:
                raise RegistryError(
                    f"the CA file is not PEM certificates: {exc}", code="ca_invalid"
                ) from None
            ca_pem = "".join(_certs.certificate_pem(c).decode() for c in cas)

        async def work(session: AsyncSession) -> dict[str, Any]:
            env = await session.get(Environment, env_id)
            created = env is None
            if env is None:
                position = (await session.execute(select(func.max(Environment.position)))).scalar() or 0
                env = Environment(
                    id=env_id,
                    name=name or env_id,
                    allow_self_signed=bool(allow_self_signed),
                    position=position + 1,
                )
                session.add(env)
            if name is not None:
                env.name = name
            if allow_self_signed is not None:
                env.allow_self_signed = allow_self_signed
            if ca_pem is not None:
                env.ca_pem = ca_pem or None
            if gateway_port is not None:
                env.gateway_port = gateway_port
            if issuing_ca_pem is not None:
                env.issuing_ca_pem = issuing_ca_pem or None
            if max_validity_days is not None:
                env.max_validity_days = max_validity_days
            elif created:
                env.max_validity_days = 365 if env.allow_self_signed else 730
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="environment.create" if created else "environment.update",
                object_type="environment",
                object_id=env_id,
                details={
                    "name": env.name,
                    "allow_self_signed": env.allow_self_signed,
                    "has_ca": bool(env.ca_pem),
                    "issuing_ca": _ca_subject(env.issuing_ca_pem),
                    "max_validity_days": env.max_validity_days,
                },
            )
            await self._bump(session)
            return env_view(env)

        return await self._tx(work)

    async def list_products(self) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            return [
                product_view(p)
                for p in (await session.execute(select(ApiProduct).order_by(ApiProduct.id))).scalars()
            ]

    async def save_product(
        self,
        actor: Principal,
        product_id: str,
        *,
        name: str,
        path_prefix: str,
        upstream: str,
        signature: str = "required",
        content_types: list[str] | None = None,
        algorithms: list[str] | None = None,
        replay_window: int | None = None,
        replay_iat: str | None = None,
        replay_id: str | None = None,
        sign_responses: bool | None = None,
    ) -> dict[str, Any]:
        """Create or replace a product. The replay and response-signing settings are kept as
        they are when not given (``replay_window=0`` turns replay protection off)."""
        self._need_operator(actor)
        product_id = _slug(product_id, "the product id")
        if signature not in SIGNATURE_POLICIES:
            raise RegistryError(
                f"signature must be one of {', '.join(SIGNATURE_POLICIES)}", code="product_invalid"
            )
        if not path_prefix.startswith("/") or "//" in path_prefix or any(c in path_prefix for c in "?#* "):
            raise RegistryError(
                "the path prefix must be an absolute path such as /tsapi/v1/payments", code="product_invalid"
            )
        path_prefix = path_prefix.rstrip("/") or "/"
        if not (upstream.startswith(("http://", "https://")) or upstream.startswith("sandbox:")):
            raise RegistryError(
                "the upstream must be an http(s):// URL or sandbox:<name>", code="product_invalid"
            )
        from twofold.crypto.jws import SUPPORTED_ALGORITHMS

        algorithms = algorithms or ["RS256"]
        bad = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS or a.startswith("HS")]
        if bad:
            raise RegistryError(f"unsupported signature algorithms: {', '.join(bad)}", code="product_invalid")
        content_types = content_types or list(DEFAULT_CONTENT_TYPES)
        protection = Protection.checked(replay_window, replay_iat, replay_id, sign_responses)

        async def work(session: AsyncSession) -> dict[str, Any]:
            clash = (
                await session.execute(
                    select(ApiProduct).where(
                        ApiProduct.path_prefix == path_prefix, ApiProduct.id != product_id
                    )
                )
            ).scalar()
            if clash:
                raise Conflict(f"product {clash.id} already serves {path_prefix}", code="product_path_taken")
            row = await session.get(ApiProduct, product_id)
            created = row is None
            if row is None:
                row = ApiProduct(id=product_id, replay_iat="iat", replay_id="jti", sign_responses=False)
                session.add(row)
            row.name, row.path_prefix, row.upstream, row.signature = name, path_prefix, upstream, signature
            row.content_types, row.algorithms = content_types, algorithms
            protection.apply(row)
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="product.create" if created else "product.update",
                object_type="product",
                object_id=product_id,
                details=product_view(row),
            )
            await self._bump(session)
            return product_view(row)

        return await self._tx(work)

    async def set_product_protection(
        self,
        actor: Principal,
        product_id: str,
        *,
        replay_window: int | None = None,
        replay_iat: str | None = None,
        replay_id: str | None = None,
        sign_responses: bool | None = None,
    ) -> dict[str, Any]:
        """Change only a product's replay protection and response signing."""
        self._need_operator(actor)
        protection = Protection.checked(replay_window, replay_iat, replay_id, sign_responses)

        async def work(session: AsyncSession) -> dict[str, Any]:
            row = await session.get(ApiProduct, product_id)
            if row is None:
                raise NotFound(f"no API product {product_id!r}", code="product_not_found")
            protection.apply(row)
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="product.update",
                object_type="product",
                object_id=product_id,
                details=product_view(row),
            )
            await self._bump(session)
            return product_view(row)

        return await self._tx(work)


@dataclass(frozen=True)
class Protection:
    """Replay protection and response signing as an operator sets them (None: unchanged)."""

    replay_window: int | None
    replay_iat: str | None
    replay_id: str | None
    sign_responses: bool | None

    @classmethod
    def checked(
        cls, window: int | None, iat: str | None, id_field: str | None, sign: bool | None
    ) -> Protection:
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= MAX_REPLAY_WINDOW
        ):
            raise RegistryError(
                f"the replay window is a number of seconds from 1 to {MAX_REPLAY_WINDOW} (0 turns it off)",
                code="product_invalid",
            )
        if iat is not None:
            field_ref(iat, "the replay time field")
            iat = iat.strip()
        if id_field is not None:
            field_ref(id_field, "the replay id field")
            id_field = id_field.strip()
        return cls(window, iat, id_field, sign)

    def apply(self, row: ApiProduct) -> None:
        if self.replay_window is not None:
            row.replay_window = self.replay_window or None
        if self.replay_iat is not None:
            row.replay_iat = self.replay_iat
        if self.replay_id is not None:
            row.replay_id = self.replay_id
        if self.sign_responses is not None:
            row.sign_responses = self.sign_responses
        if row.replay_window and row.signature != "required":
            raise RegistryError(
                "replay protection needs signed requests: set the product's signature to required, or "
                "the replay window to 0",
                code="product_invalid",
            )
