"""The gateway's read-only view of the registry, rebuilt whenever the registry changes.

Everything a request needs is looked up in memory: which organisation a client
certificate fingerprint belongs to, which products the organisation may call in this
environment, and the verifier for its Digital Signature certificates.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import cached_property

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.crypto import jws
from twofold.gateway.replay import ReplayPolicy
from twofold.registry.catalogue import environment_cas
from twofold.registry.models import (
    ApiProduct,
    Certificate,
    Environment,
    Organisation,
    Project,
    ProjectProduct,
    RegistryVersion,
)
from twofold.registry.service import Registry


@dataclass(frozen=True)
class ClientCert:
    fingerprint: str
    org_id: int
    org: str
    common_name: str
    not_before: dt.datetime
    not_after: dt.datetime
    der: bytes

    @cached_property
    def valid_from(self) -> float:
        return self.not_before.timestamp()

    @cached_property
    def valid_until(self) -> float:
        return self.not_after.timestamp()


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    prefix: str
    upstream: str
    signature: str  # required | optional | none
    content_types: frozenset[str]
    algorithms: tuple[str, ...]
    replay: ReplayPolicy | None = None  # replay protection (twofold.gateway.replay)
    sign_responses: bool = False  # the gateway signs the upstream's JSON answers


@dataclass(frozen=True)
class EnvView:
    id: str
    name: str
    allow_self_signed: bool
    port: int | None
    cas: tuple[x509.Certificate, ...]


@dataclass
class Snapshot:
    version: int
    environments: dict[str, EnvView]
    mtls: dict[str, dict[str, ClientCert]]  # env → fingerprint → cert
    signature_keys: dict[tuple[int, str], tuple[jws.VerificationKey, ...]]  # (org, env) → keys
    access: dict[tuple[int, str], frozenset[str]]  # (org, env) → product ids
    products: tuple[Product, ...]  # longest prefix first
    expiries: dict[str, tuple[dt.datetime, ...]] = field(
        default_factory=dict
    )  # env → not_after of the active Digital Signature certificates (mTLS ones are in mtls)
    orgs: dict[int, str] = field(default_factory=dict)  # id → slug
    _verifiers: dict[tuple[int, str, tuple[str, ...]], jws.Verifier] = field(default_factory=dict)

    def product_for(self, path: str) -> Product | None:
        """The product whose prefix is the longest that matches whole segments, in any case."""
        lowered = path.lower()
        for prefix, below, product in self._prefixes:
            if lowered.startswith(below) or lowered == prefix:
                return product
        return None

    @cached_property
    def _prefixes(self) -> tuple[tuple[str, str, Product], ...]:
        return tuple(
            (p.prefix.lower(), "" if p.prefix == "/" else p.prefix.lower() + "/", p) for p in self.products
        )

    def verifier(
        self, org_id: int, env: str, algorithms: tuple[str, ...], max_size: int
    ) -> jws.Verifier | None:
        """The organisation's signature verifier, built once per snapshot."""
        key = (org_id, env, algorithms)
        verifier = self._verifiers.get(key)
        if verifier is None:
            keys = self.signature_keys.get((org_id, env))
            if not keys:
                return None
            verifier = jws.Verifier(keys, algorithms=algorithms, max_size=max_size)
            self._verifiers[key] = verifier
        return verifier

    def trusted_certificates(self, env: str) -> list[x509.Certificate]:
        """What the TLS layer of ``env`` trusts: the active mTLS leaves and the env's CAs."""
        view = self.environments.get(env)
        leaves = [x509.load_der_x509_certificate(c.der) for c in self.mtls.get(env, {}).values()]
        return leaves + list(view.cas if view else ())

    def expiring(self, env: str, within: dt.timedelta, now: dt.datetime | None = None) -> int:
        """Active certificates (both uses) of ``env`` that expire within ``within``."""
        now = now or dt.datetime.now(dt.UTC)
        start, end = now.timestamp(), (now + within).timestamp()
        mtls = sum(1 for c in self.mtls.get(env, {}).values() if start <= c.valid_until <= end)
        return mtls + sum(1 for not_after in self.expiries.get(env, ()) if now <= not_after <= now + within)


async def load_snapshot(registry: Registry, previous: Snapshot | None = None) -> Snapshot:
    """The registry as the gateway sees it. With ``previous``, its mTLS certificates are
    carried over and only the rows changed since its version are read (the rest of the
    registry is small and read whole); without, or when organisations or environments changed,
    everything is read."""
    async with registry.sessions() as session:
        return await _load(session, previous)


_MTLS_COLUMNS = (
    Certificate.fingerprint,
    Certificate.org_id,
    Certificate.environment_id,
    Certificate.common_name,
    Certificate.not_before,
    Certificate.not_after,
    Certificate.der,
)


async def _mtls(
    session: AsyncSession,
    environments: dict[str, EnvView],
    orgs: dict[int, str],
    previous: Snapshot | None,
) -> dict[str, dict[str, ClientCert]]:
    mtls_rows = Certificate.use == "mtls"
    if previous is None:
        mtls: dict[str, dict[str, ClientCert]] = {e: {} for e in environments}
        query = select(*_MTLS_COLUMNS, Certificate.status).where(mtls_rows, Certificate.status == "active")
    else:
        mtls = {e: previous.mtls.get(e, {}) for e in environments}
        query = select(*_MTLS_COLUMNS, Certificate.status).where(
            mtls_rows, Certificate.changed_version > previous.version
        )
        query = query.order_by(Certificate.changed_version, Certificate.id)  # the latest change last
    copied: set[str] = set()
    for fingerprint, org_id, env_id, common_name, not_before, not_after, der, status in await session.execute(
        query
    ):
        if previous is not None and env_id not in copied:
            mtls[env_id] = dict(mtls.get(env_id, {}))  # the previous snapshot stays as it was
            copied.add(env_id)
        certs = mtls.setdefault(env_id, {})
        if status == "active":
            certs[fingerprint] = ClientCert(
                fingerprint, org_id, orgs.get(org_id, "?"), common_name, not_before, not_after, der
            )
        else:
            certs.pop(fingerprint, None)
    return mtls


async def _load(session: AsyncSession, previous: Snapshot | None = None) -> Snapshot:
    version = (
        await session.execute(select(RegistryVersion.version).where(RegistryVersion.id == 1))
    ).scalar() or 0
    environments: dict[str, EnvView] = {}
    for env in (await session.execute(select(Environment))).scalars():
        cas = tuple(environment_cas(env))
        environments[env.id] = EnvView(env.id, env.name, env.allow_self_signed, env.gateway_port, cas)
    orgs = {
        org_id: slug for org_id, slug in await session.execute(select(Organisation.id, Organisation.slug))
    }
    if previous is not None and (
        previous.orgs != orgs
        or set(previous.environments) != set(environments)
        or previous.version > version  # a registry restored from a backup
    ):
        previous = None
    mtls = await _mtls(session, environments, orgs, previous)
    signature: dict[tuple[int, str], list[jws.VerificationKey]] = {}
    rows = (
        await session.execute(
            select(Certificate).where(Certificate.status == "active", Certificate.use == "signature")
        )
    ).scalars()
    expiries: dict[str, list[dt.datetime]] = {}
    for row in rows:
        expiries.setdefault(row.environment_id, []).append(row.not_after)
        cert = x509.load_der_x509_certificate(row.der)
        signature.setdefault((row.org_id, row.environment_id), []).append(
            jws.VerificationKey.from_certificate(cert, label=row.fingerprint)
        )
    access: dict[tuple[int, str], set[str]] = {}
    links = await session.execute(
        select(Project.org_id, ProjectProduct.environment_id, ProjectProduct.product_id).join(
            ProjectProduct, ProjectProduct.project_id == Project.id
        )
    )
    for org_id, env_id, product_id in links:
        access.setdefault((org_id, env_id), set()).add(product_id)
    products = sorted(
        (
            Product(
                p.id,
                p.name,
                p.path_prefix,
                p.upstream,
                p.signature,
                frozenset(p.content_types),
                tuple(p.algorithms),
                ReplayPolicy.of(p.replay_window, p.replay_iat, p.replay_id),
                bool(p.sign_responses),
            )
            for p in (await session.execute(select(ApiProduct))).scalars()
        ),
        key=lambda p: len(p.prefix),
        reverse=True,
    )
    return Snapshot(
        version=int(version),
        environments=environments,
        mtls=mtls,
        signature_keys={k: tuple(v) for k, v in signature.items()},
        access={k: frozenset(v) for k, v in access.items()},
        products=tuple(products),
        expiries={k: tuple(v) for k, v in expiries.items()},
        orgs=orgs,
    )
