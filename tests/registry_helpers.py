"""Builders for the registry suites: organisations with users in given roles, certificates
of every kind the upload rules care about, the database as plain rows (to look for leaked
secrets and to count changes), and parallel uploads from separate OS processes.

Bulk certificates use EC P-256 keys (cheap); RSA appears only where a rule is about RSA.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import multiprocessing
import runpy
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import func, select, text

from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.crypto.keys import PrivateKey
from twofold.registry.auth import SYSTEM, Principal, parse_roles
from twofold.registry.models import AuditEntry, Base, Certificate, CnOwner
from twofold.registry.rules import RegistryError
from twofold.registry.service import Registry

RACE_WORKER = Path(__file__).with_name("registry_race_worker.py")

# --- organisations, users, principals ---------------------------------------------------


@dataclass(frozen=True)
class Org:
    slug: str
    id: int
    security: Principal  # API Security only
    developer: Principal  # Developer only


def principal_for(view: dict[str, Any], org_id: int | None) -> Principal:
    """The Principal the service builds for a user's API token (a token counts as having
    passed the second factor)."""
    return Principal(
        view["email"], view["id"], org_id, view["organisation"], parse_roles(view["roles"]), mfa_passed=True
    )


async def add_person(
    reg: Registry, email: str, *, org: Org | None, roles: str, password: str | None = None
) -> Principal:
    view = await reg.add_user(SYSTEM, email, org=org.slug if org else None, roles=roles, password=password)
    return principal_for(view, org.id if org else None)


async def make_org(reg: Registry, slug: str) -> Org:
    """An organisation with one API Security user and one Developer."""
    made = await reg.add_org(SYSTEM, slug, f"{slug.title()} Ltd")
    sec = await reg.add_user(
        SYSTEM, f"security@{slug}.example", org=slug, roles="api_security", password=None
    )
    dev = await reg.add_user(SYSTEM, f"developer@{slug}.example", org=slug, roles="developer", password=None)
    return Org(slug, made["id"], principal_for(sec, made["id"]), principal_for(dev, made["id"]))


async def make_operator(reg: Registry, email: str = "ops@platform.example") -> Principal:
    return await add_person(reg, email, org=None, roles="operator")


# --- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    key: PrivateKey
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return certs.certificate_pem(self.certificate)

    @property
    def der(self) -> bytes:
        return certs.certificate_der(self.certificate)

    @property
    def fingerprint(self) -> str:
        return certs.fingerprint_sha256(self.certificate)


def ec_key() -> PrivateKey:
    return keys.generate_private_key("ec", curve="P-256")


def make_cert(
    cn: str,
    *,
    key: PrivateKey | None = None,
    usage: certs.Usage = "client",
    days: int = 90,
    not_before: dt.datetime | None = None,
    ca: LocalCA | None = None,
) -> Cert:
    """A certificate for ``cn``: self-signed, or issued by ``ca``. ``usage`` "client" carries
    EKU clientAuth, "server" only serverAuth, "signature" no EKU (any use)."""
    key = key or ec_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "twofold tests"), cn_attr(cn)])
    cert = certs.issue_certificate(
        subject=name,
        public_key=key.public_key(),
        issuer_key=ca.key if ca else key,
        issuer=ca.certificate if ca else None,
        days=days,
        usage=usage,
        not_before=not_before,
    )
    return Cert(key, cert)


def cn_attr(cn: str) -> x509.NameAttribute:
    return x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)


def expired_cert(cn: str) -> Cert:
    return make_cert(cn, days=30, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=60))


def not_yet_valid_cert(cn: str) -> Cert:
    return make_cert(cn, days=30, not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=10))


def rsa_cert(cn: str, bits: int) -> Cert:
    """RSA of any size, 1024 included (twofold's own key generator refuses small keys)."""
    return make_cert(cn, key=rsa.generate_private_key(public_exponent=65537, key_size=bits))


def openssl_cert(openssl: str, workdir: Path, cn: str, *, digest: str, key: str = "ec") -> bytes:
    """A self-signed certificate from `openssl req -x509 -<digest>` (cryptography no longer
    signs with SHA-1 or MD5). ``key`` is "ec" (P-256) or "rsa" (2048)."""
    key_args = (
        ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if key == "ec" else ["-newkey", "rsa:2048"]
    )
    out = workdir / f"{digest}-{key}.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            f"-{digest}",
            *key_args,
            "-nodes",
            "-keyout",
            str(workdir / f"{digest}-{key}.key"),
            "-out",
            str(out),
            "-subj",
            f"/CN={cn}",
            "-days",
            "30",
            "-addext",
            "extendedKeyUsage=clientAuth",
        ],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def pem_chain(*items: Cert | x509.Certificate) -> bytes:
    return b"".join(certs.certificate_pem(i.certificate if isinstance(i, Cert) else i) for i in items)


# --- private keys in every form people upload by mistake ------------------------------------

PASSWORD = b"correct horse battery staple"


def private_key_uploads(cert: Cert) -> dict[str, bytes]:
    """The private key of ``cert`` in the encodings people actually have lying around."""
    key = cert.key
    pkcs8, pem, der = (
        serialization.PrivateFormat.PKCS8,
        serialization.Encoding.PEM,
        serialization.Encoding.DER,
    )
    plain = serialization.NoEncryption()
    locked = serialization.BestAvailableEncryption(PASSWORD)
    traditional = key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, plain)
    return {
        "pem-pkcs8": key.private_bytes(pem, pkcs8, plain),
        "der-pkcs8": key.private_bytes(der, pkcs8, plain),
        "pem-pkcs8-encrypted": key.private_bytes(pem, pkcs8, locked),
        "der-pkcs8-encrypted": key.private_bytes(der, pkcs8, locked),
        "pem-traditional": traditional,
        "pem-openssh": key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain),
        "pem-certificate-then-key": cert.pem + traditional,
        "pkcs12-encrypted": pkcs12.serialize_key_and_certificates(
            b"client", key, cert.certificate, None, locked
        ),
        "pkcs12-unencrypted": pkcs12.serialize_key_and_certificates(
            b"client", key, cert.certificate, None, plain
        ),
    }


def secret_needles(key: PrivateKey, upload: bytes) -> list[bytes]:
    """Byte strings that must appear nowhere if nothing of ``upload`` was kept: the private
    number in raw, hex and base64 forms, every base64 line of a PEM upload, and 32-byte
    windows of a binary upload."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        number = key.private_numbers().private_value
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        number = key.private_numbers().d
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    needles = [
        raw,
        raw.hex().encode(),
        raw.hex().upper().encode(),
        base64.b64encode(raw).rstrip(b"="),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
    ]
    if b"-----BEGIN" in upload:
        lines = [line.strip() for line in upload.splitlines()]
        needles += [line for line in lines if len(line) >= 40 and not line.startswith(b"-----")]
    else:
        needles += [upload[i : i + 32] for i in range(0, max(1, len(upload) - 32), 16)]
        needles.append(base64.b64encode(upload)[:64])
    return needles


# --- the database as rows -----------------------------------------------------------------


async def table_rows(reg: Registry) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (the ORM's tables and Alembic's), for dumps and diffs."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with reg.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows[table.name] = [tuple(r) for r in (await conn.execute(select(table))).all()]
        rows["alembic_version"] = [
            tuple(r) for r in (await conn.execute(text("SELECT * FROM alembic_version")))
        ]
    return rows


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict | list):
        return json.dumps(value).encode()
    return str(value).encode()


async def database_dump(reg: Registry) -> bytes:
    """All stored values, concatenated; on SQLite also the raw database and WAL files."""
    parts = [_as_bytes(v) for rows in (await table_rows(reg)).values() for row in rows for v in row]
    if reg.engine.url.get_backend_name() == "sqlite" and reg.engine.url.database:
        for suffix in ("", "-wal"):
            path = Path(reg.engine.url.database + suffix)
            if path.exists():
                parts.append(path.read_bytes())
    return b"\n".join(parts)


async def count(reg: Registry, model: Any, *where: Any) -> int:
    async with reg.sessions() as session:
        return int(
            (await session.execute(select(func.count()).select_from(model).where(*where))).scalar() or 0
        )


async def active_certs(reg: Registry, *where: Any) -> list[Certificate]:
    async with reg.sessions() as session:
        query = select(Certificate).where(Certificate.status == "active", *where).order_by(Certificate.id)
        return list((await session.execute(query)).scalars())


async def cn_owner(reg: Registry, env: str, cn: str) -> int | None:
    async with reg.sessions() as session:
        row = await session.get(CnOwner, (env, cn.strip().casefold()))
        return row.org_id if row else None


@dataclass(frozen=True)
class Snapshot:
    certificates: int
    active: int
    audit: int
    version: int
    cn_owners: int


async def snapshot(reg: Registry) -> Snapshot:
    return Snapshot(
        certificates=await count(reg, Certificate),
        active=await count(reg, Certificate, Certificate.status == "active"),
        audit=await count(reg, AuditEntry),
        version=await reg.version(),
        cn_owners=await count(reg, CnOwner),
    )


async def refused(reg: Registry, call: Any) -> RegistryError:
    """Await ``call`` expecting a RegistryError; assert nothing in the registry changed."""
    before = await snapshot(reg)
    try:
        await call
    except RegistryError as exc:
        error = exc
    else:
        raise AssertionError("the call was accepted, a refusal was expected")
    assert await snapshot(reg) == before, "a refused change left traces in the registry"
    return error


# --- parallel uploads -------------------------------------------------------------------------


def outcome(result: object) -> str:
    """ "ok" for an accepted upload, the error code for a clean refusal, and a loud
    description of anything else (a database error, a 5xx)."""
    if isinstance(result, dict):
        return "ok"
    if isinstance(result, RegistryError) and result.status < 500:
        return result.code
    if isinstance(result, BaseException):
        return f"UNEXPECTED {type(result).__name__}: {result}"
    return f"UNEXPECTED result {result!r}"


async def race_in_loop(reg: Registry, uploads: Sequence[tuple[Principal, str, str, bytes]]) -> list[str]:
    """All uploads at once on one Registry (one event loop, many connections)."""
    results = await asyncio.gather(
        *(reg.add_certificate(p, env, use, data) for p, env, use, data in uploads), return_exceptions=True
    )
    return [outcome(r) for r in results]


def _principal_fields(p: Principal) -> dict[str, Any]:
    return {
        "name": p.name,
        "user_id": p.user_id,
        "org_id": p.org_id,
        "org_slug": p.org_slug,
        "roles": sorted(p.roles),
    }


def race_in_processes(url: str, uploads: Sequence[tuple[Principal, str, str, bytes]]) -> list[str]:
    """Each upload from its own OS process, each with its own Registry (engine, pool,
    connections) on ``url``; all wait at a barrier once connected, then upload together."""
    return in_processes(
        [
            {
                "task": "add",
                "url": url,
                "principal": _principal_fields(p),
                "env": env,
                "use": use,
                "data": data,
            }
            for p, env, use, data in uploads
        ]
    )


def open_in_processes(url: str, n: int) -> list[str]:
    """``n`` processes run ``Registry.open(url)`` (migrating) and ``ensure_defaults()`` at once,
    as several `twofold serve` instances starting together on a new database do."""
    return in_processes([{"task": "open", "url": url} for _ in range(n)])


def in_processes(jobs: Sequence[dict[str, Any]]) -> list[str]:
    """Run each job of tests/registry_race_worker.py in its own OS process, all released
    together by a barrier; their outcomes, in order.

    Processes come from a forkserver that imports twofold once, so a child costs a fork,
    not an interpreter start."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["twofold.registry.service", "sqlalchemy.dialects.postgresql.asyncpg", "aiosqlite"]
    )
    barrier = ctx.Barrier(len(jobs))
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=runpy.run_path,
            args=(str(RACE_WORKER),),
            kwargs={
                "run_name": "__race__",
                "init_globals": {"ARGS": {**job, "index": i}, "BARRIER": barrier, "RESULTS": results},
            },
            daemon=True,
        )
        for i, job in enumerate(jobs)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, str] = {}
    try:
        for _ in procs:
            index, result = results.get(timeout=90)
            outcomes[index] = result
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return [outcomes[i] for i in range(len(jobs))]


def tally(outcomes: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        out[o] = out.get(o, 0) + 1
    return out
