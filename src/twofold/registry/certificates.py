"""Certificates: registration under the rules, listing and removal."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.crypto import certs as _certs
from twofold.registry import audit
from twofold.registry.auth import (
    Principal,
)
from twofold.registry.base import RegistryBase
from twofold.registry.catalogue import environment_cas
from twofold.registry.models import (
    Certificate,
    CnOwner,
    Environment,
    Organisation,
    utcnow,
)
from twofold.registry.rules import (
    USE_LABELS,
    Conflict,
    Forbidden,
    NotFound,
    UploadFacts,
    inspect_upload,
)


def cert_view(
    row: Certificate, env_name: str | None = None, org_slug: str | None = None, now: dt.datetime | None = None
) -> dict[str, Any]:
    now = now or utcnow()
    return {
        "id": row.id,
        "fingerprint": row.fingerprint,
        "environment": row.environment_id,
        "environment_name": env_name,
        "organisation": org_slug,
        "use": row.use,
        "use_label": USE_LABELS[row.use],
        "common_name": row.common_name,
        "subject": row.subject,
        "issuer": row.issuer,
        "serial": row.serial,
        "not_before": row.not_before.isoformat(),
        "not_after": row.not_after.isoformat(),
        "days_left": _certs.days_left(row.not_after, now),
        "key": f"{row.key_type} {row.key_size}",
        "self_signed": row.self_signed,
        "x5t_s256": row.x5t_s256,
        "sha1_thumbprint": row.sha1_thumbprint,
        "status": row.status,
        "added_by": row.added_by,
        "added_at": row.added_at.isoformat(),
        "removed_by": row.removed_by,
        "removed_at": row.removed_at.isoformat() if row.removed_at else None,
    }


class CertificatesMixin(RegistryBase):
    """mTLS and Digital Signature certificates under the counting rules."""

    # --- certificates ---------------------------------------------------------------------

    async def add_certificate(self, actor: Principal, env_id: str, use: str, data: bytes) -> dict[str, Any]:
        """Register a certificate under every rule; refusals leave the registry unchanged."""
        if not actor.manages_certificates:
            raise Forbidden(
                "only users with the API Security role may add certificates", code="api_security_only"
            )
        self._need_second_factor(actor)
        async with self.sessions() as session:
            env = await session.get(Environment, env_id)
            if env is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
            cas = environment_cas(env)
        facts = inspect_upload(
            data,
            use=use,
            allow_self_signed=env.allow_self_signed,
            trusted_cas=cas,
            environment_name=f"{env.name} ({env.id})",
        )

        async def work(session: AsyncSession) -> dict[str, Any]:
            return await self._register(session, actor, env, use, facts, "certificate.add")

        return await self._tx(work)

    async def _register(
        self,
        session: AsyncSession,
        actor: Principal,
        env: Environment,
        use: str,
        facts: UploadFacts,
        action: str,
        **details: Any,
    ) -> dict[str, Any]:
        """Insert under the rules, audit as ``action`` (with ``details``), tell the gateways."""
        row = await self._insert_certificate(session, actor, env, use, facts)
        await audit.append(
            session,
            actor=actor.name,
            action=action,
            object_type="certificate",
            object_id=facts.fingerprint,
            org_id=actor.org_id,
            details={
                "environment": env.id,
                "use": use,
                "common_name": facts.common_name,
                "not_after": facts.not_after.isoformat(),
                **details,
            },
        )
        await self._bump(session)
        return cert_view(row, env.name, actor.org_slug)

    async def _insert_certificate(
        self, session: AsyncSession, actor: Principal, env: Environment, use: str, facts: UploadFacts
    ) -> Certificate:
        """Insert an accepted certificate under the counting rules (a CN belongs to one
        organisation, two mTLS per CN, two signature per organisation), in ``session``."""
        org_id = actor.org_id
        assert org_id is not None
        env_id = env.id
        active = Certificate.status == "active"
        # One statement, so one snapshot: a concurrent upload of the same certificate that
        # commits in between cannot make the answer "public key reused".
        same = or_(Certificate.fingerprint == facts.fingerprint, Certificate.spki_sha256 == facts.spki_sha256)
        clashes = set((await session.execute(select(Certificate.fingerprint).where(active, same))).scalars())
        if facts.fingerprint in clashes:
            raise Conflict("this certificate is already registered", code="certificate_duplicate")
        if clashes:
            raise Conflict(
                "a certificate with the same public key is already registered; every certificate "
                "needs its own key pair",
                code="public_key_reused",
            )
        if use == "mtls":
            # Locked (PostgreSQL) so that a concurrent removal of the CN's last certificate
            # cannot release the name between this check and this transaction's insert.
            owner = await session.get(CnOwner, (env_id, facts.cn_key), with_for_update=True)
            if owner is not None and owner.org_id != org_id:
                raise Conflict(
                    f"the Common Name {facts.common_name!r} belongs to another organisation in "
                    f"{env.name}; use a Common Name of your own",
                    code="cn_taken",
                )
            if owner is None:
                session.add(CnOwner(environment_id=env_id, cn_key=facts.cn_key, org_id=org_id))
                await session.flush()
            taken_q = select(Certificate.slot).where(
                active,
                Certificate.use == "mtls",
                Certificate.environment_id == env_id,
                Certificate.cn_key == facts.cn_key,
            )
            full = (
                f"at most two mTLS certificates may share the Common Name {facts.common_name!r} in "
                f"{env.name}; remove one before adding another"
            )
            code = "mtls_cn_limit"
        else:
            taken_q = select(Certificate.slot).where(
                active,
                Certificate.use == "signature",
                Certificate.environment_id == env_id,
                Certificate.org_id == org_id,
            )
            full = (
                f"at most two Digital Signature certificates are allowed per organisation in {env.name}; "
                "remove one before adding another"
            )
            code = "signature_limit"
        taken = set((await session.execute(taken_q)).scalars())
        free = [slot for slot in (1, 2) if slot not in taken]
        if not free:
            raise Conflict(full, code=code)
        row = Certificate(
            org_id=org_id,
            environment_id=env_id,
            use=use,
            slot=free[0],
            der=facts.der,
            fingerprint=facts.fingerprint,
            spki_sha256=facts.spki_sha256,
            x5t_s256=facts.x5t_s256,
            sha1_thumbprint=facts.sha1_thumbprint,
            subject=facts.subject,
            common_name=facts.common_name,
            cn_key=facts.cn_key,
            issuer=facts.issuer,
            serial=facts.serial,
            not_before=facts.not_before,
            not_after=facts.not_after,
            key_type=facts.key_type,
            key_size=facts.key_size,
            self_signed=facts.self_signed,
            status="active",
            added_by=actor.name,
            added_at=utcnow(),
        )
        session.add(row)
        await session.flush()  # a lost race on a slot or fingerprint raises here → retried
        return row

    async def list_certificates(
        self,
        actor: Principal,
        env_id: str | None = None,
        *,
        org: str | None = None,
        include_removed: bool = False,
    ) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            query = (
                select(Certificate, Environment.name, Organisation.slug)
                .join(Environment, Environment.id == Certificate.environment_id)
                .join(Organisation, Organisation.id == Certificate.org_id)
            )
            if actor.is_operator:
                if org:
                    query = query.where(Organisation.slug == org)
            elif actor.org_id is None:
                raise Forbidden("this account belongs to no organisation")
            else:
                query = query.where(Certificate.org_id == actor.org_id)
            if env_id:
                if await session.get(Environment, env_id) is None:
                    raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
                query = query.where(Certificate.environment_id == env_id)
            if not include_removed:
                query = query.where(Certificate.status == "active")
            rows = (
                await session.execute(
                    query.order_by(
                        Certificate.environment_id, Certificate.use, Certificate.common_name, Certificate.id
                    )
                )
            ).all()
            now = utcnow()
            return [cert_view(c, env_name, slug, now) for c, env_name, slug in rows]

    async def remove_certificate(self, actor: Principal, env_id: str, fingerprint: str) -> dict[str, Any]:
        """Remove an active certificate; operators may remove any (incident response)."""
        if not (actor.manages_certificates or actor.is_operator):
            raise Forbidden(
                "only users with the API Security role may remove certificates", code="api_security_only"
            )
        self._need_second_factor(actor)
        fingerprint = fingerprint.strip().lower().replace(":", "")

        async def work(session: AsyncSession) -> dict[str, Any]:
            query = select(Certificate).where(
                Certificate.status == "active",
                Certificate.environment_id == env_id,
                Certificate.fingerprint == fingerprint,
            )
            if not actor.is_operator:
                query = query.where(Certificate.org_id == actor.org_id)
            # Locked (PostgreSQL; SQLite transactions are serial): a concurrent removal of the
            # same row waits here, then finds it no longer active — one removal, one audit entry.
            row = (await session.execute(query.with_for_update())).scalar()
            if row is None:
                raise NotFound(
                    f"no active certificate {fingerprint[:16]}… in environment {env_id}",
                    code="certificate_not_found",
                )
            row.status, row.removed_by, row.removed_at = "removed", actor.name, utcnow()
            await session.flush()
            if row.use == "mtls":
                # Lock the name's owner row first: a concurrent add of the same CN holds it until
                # it commits, so the count below sees that add and the name is not released.
                await session.execute(
                    select(CnOwner)
                    .where(CnOwner.environment_id == env_id, CnOwner.cn_key == row.cn_key)
                    .with_for_update()
                )
                left = (
                    await session.execute(
                        select(func.count())
                        .select_from(Certificate)
                        .where(
                            Certificate.status == "active",
                            Certificate.use == "mtls",
                            Certificate.environment_id == env_id,
                            Certificate.cn_key == row.cn_key,
                        )
                    )
                ).scalar()
                if not left:
                    await session.execute(
                        delete(CnOwner).where(CnOwner.environment_id == env_id, CnOwner.cn_key == row.cn_key)
                    )
            await audit.append(
                session,
                actor=actor.name,
                action="certificate.remove",
                object_type="certificate",
                object_id=fingerprint,
                org_id=row.org_id,
                details={"environment": env_id, "use": row.use, "common_name": row.common_name},
            )
            await self._bump(session)
            return cert_view(row)

        return await self._tx(work)
