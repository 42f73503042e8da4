"""Helpers for the portal suites (browser and JSON API): the portal run the way production
runs it — HTTPS with a server certificate from a local CA, secure session cookies — on a
temporary SQLite registry, in a background thread with its own event loop, so that
synchronous clients (Playwright's sync API, httpx.Client) can drive it while the test
reaches the same registry directly through :meth:`PortalServer.call`.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
import tempfile
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pyotp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twofold.aio import LoopThread
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.crypto.keys import PrivateKey
from twofold.issuing import IssuingCAs
from twofold.listener import GuardedSite
from twofold.portal.app import init_app
from twofold.portal.web import PortalConfig
from twofold.registry.auth import MFA_ROLES, SYSTEM, Principal, parse_roles
from twofold.registry.models import utcnow
from twofold.registry.service import Registry
from twofold.tls import server_context

T = TypeVar("T")
PASSWORD = "correct horse battery staple"

# One CA for every portal server of a test process: it signs the servers' TLS certificates
# and, configured on the `prod` environment, the client certificates that `prod` accepts.
SERVER_CA = LocalCA("twofold portal test CA")
PROD_CA = LocalCA("twofold prod issuing CA")
# The CA that issues from CSRs in `prod` (its key in the server's data directory).
PROD_ISSUER = LocalCA("twofold prod CSR issuing CA")


class PortalServer:
    """``init_app`` over HTTPS (``server_context(..., require_client_cert=False)``)."""

    def __init__(self, db_path: Path | str, *, config: PortalConfig | None = None) -> None:
        self.db_path = db_path
        self.config = config or PortalConfig(secure_cookies=True)
        if self.config.issuers is None:  # beside a SQLite file, else (a database URL) a directory of its own
            data = (
                db_path.parent / "issuing-data"
                if isinstance(db_path, Path)
                else Path(tempfile.mkdtemp(prefix="twofold-issuing-"))
            )
            self.config = replace(self.config, issuers=IssuingCAs(data))
        issued = SERVER_CA.issue("localhost", usage="server", sans=["DNS:localhost", "IP:127.0.0.1"])
        self.tls = server_context(issued.key, issued.certificate, require_client_cert=False)
        self.port = 0
        self.registry: Registry | None = None
        self._runner: web.AppRunner | None = None
        self._thread: LoopThread | None = None
        # The registry's clock runs this far ahead of real time: each sign-in code moves it
        # on by a time step (a code is accepted once), tests move it to expire links.
        self.offset = dt.timedelta(0)
        self.totp_secrets: dict[str, str] = {}

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def client_verify(self) -> ssl.SSLContext:
        """What an httpx client needs to trust this server (real verification, no shortcuts)."""
        context = ssl.create_default_context(cadata=certs.certificate_pem(SERVER_CA.certificate).decode())
        return context

    def start(self) -> PortalServer:
        self._thread = LoopThread("twofold-portal")
        try:
            self._thread.call(self._serve(), timeout=30)
        except BaseException:
            self._thread.close()
            raise
        return self

    async def _serve(self) -> None:
        registry = await Registry.open(str(self.db_path))
        registry.clock = self.now
        await registry.ensure_defaults()
        await registry.save_environment(
            SYSTEM,
            "prod",
            ca_pem=certs.certificate_pem(PROD_CA.certificate).decode(),
            issuing_ca_pem=certs.certificate_pem(PROD_ISSUER.certificate).decode(),
        )
        assert self.config.issuers is not None
        if not self.config.issuers.present("prod"):
            self.config.issuers.install("prod", PROD_ISSUER)
        self.registry = registry
        self._runner = web.AppRunner(init_app(registry, self.config), access_log=None)
        await self._runner.setup()
        site = GuardedSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)  # as `twofold serve` does
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.registry is not None:
            await self.registry.close()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.call(self._cleanup(), timeout=15)
            self._thread.close()

    def __enter__(self) -> PortalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the registry, directly -----------------------------------------------------------

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a registry coroutine on the server's loop (where its engine lives)."""
        assert self._thread is not None
        return self._thread.call(coroutine, timeout)

    @property
    def reg(self) -> Registry:
        assert self.registry is not None
        return self.registry

    def add_org(self, slug: str) -> None:
        self.call(self.reg.add_org(SYSTEM, slug, f"{slug.title()} Ltd"))

    def now(self) -> dt.datetime:
        return utcnow() + self.offset

    def add_user(
        self, email: str, *, org: str | None, roles: str, password: str | None = PASSWORD, enrol: bool = True
    ) -> None:
        """A user; API Security users and operators with a password have a second factor
        already (``enrol=False``: they set it up at their first sign-in)."""
        view = self.call(self.reg.add_user(SYSTEM, email, org=org, roles=roles, password=password))
        if enrol and password is not None and parse_roles(roles) & MFA_ROLES:
            self.enrol(Principal(email, view["id"], None, org, parse_roles(roles)))

    def enrol(self, who: Principal) -> list[str]:
        """Set up the second factor as the enrolment page does; returns the recovery codes."""
        secret = self.call(self.reg.mfa_begin(who))["secret"]
        self.totp_secrets[who.name] = secret
        return self.call(self.reg.mfa_confirm(who, self.totp(who.name)))

    def totp(self, email: str) -> str:
        """A fresh code for ``email`` (a later time step than any code given before)."""
        self.offset += dt.timedelta(seconds=30)
        return pyotp.TOTP(self.totp_secrets[email]).at(self.now())

    def sign_in(self, client: httpx.Client, email: str, password: str = PASSWORD) -> str:
        """Sign ``client`` in as a person does (password, then the code where asked);
        returns the session's CSRF token."""
        login = client.post("/login", data={"email": email, "password": password})
        assert login.status_code == 303, login.text[:300]
        if login.headers["location"].startswith("/login/code"):
            page = client.get("/login/code")
            posted = client.post(
                "/login/code", data={"csrf_token": csrf_of(page.text), "code": self.totp(email)}
            )
            assert posted.status_code == 303, posted.text[:300]
        return csrf_of(client.get("/account/password").text)

    def principal(self, email: str) -> Principal:
        token = self.token(email)
        return self.call(self.reg.token_principal(token))

    def token(self, email: str) -> str:
        return self.call(self.reg.create_token(SYSTEM, "test", for_email=email))

    def register(self, who: Principal, env: str, use: str, certificate: x509.Certificate) -> dict[str, Any]:
        return self.call(self.reg.add_certificate(who, env, use, certs.certificate_pem(certificate)))

    def certificates(self, org: str | None = None, env: str | None = None) -> list[dict[str, Any]]:
        """Active certificates, as an operator sees them."""
        return self.call(self.reg.list_certificates(SYSTEM, env, org=org))

    def all_certificates(self) -> list[dict[str, Any]]:
        return self.call(self.reg.list_certificates(SYSTEM, None, include_removed=True))

    def audit_count(self) -> int:
        return self.call(self.reg.verify_audit()).entries


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html[:300]
    return match.group(1)


# --- certificates for the tests --------------------------------------------------------------


def ec_key() -> PrivateKey:
    return keys.generate_private_key("ec", curve="P-256")


def self_signed(cn: str, *, usage: certs.Usage = "client", days: int = 365) -> x509.Certificate:
    return certs.self_signed_certificate(ec_key(), f"/O=Test/CN={cn}", usage=usage, days=days)


def prod_issued(cn: str, *, usage: certs.Usage = "client") -> x509.Certificate:
    return PROD_CA.issue(cn, usage=usage).certificate


def pem(certificate: x509.Certificate) -> bytes:
    return certs.certificate_pem(certificate)


def raw_certificate(
    cn: str,
    *,
    key: PrivateKey | None = None,
    public_key: Any = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    name: x509.Name | None = None,
) -> x509.Certificate:
    """A self-signed certificate built with ``cryptography`` directly, for the shapes
    twofold's own builders refuse to make (RSA-1024, expired, serverAuth only, no CN)."""
    key = key or ec_key()
    now = dt.datetime.now(dt.UTC)
    name = name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key or key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=90))
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(key, hashes.SHA256())


def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_pem_private_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _tlv(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


_SHA256_RSA = bytes.fromhex("06092a864886f70d01010b")  # OID sha256WithRSAEncryption
_WEAK_RSA = {"SHA1": bytes.fromhex("06092a864886f70d010105"), "MD5": bytes.fromhex("06092a864886f70d010104")}


def weak_hash_certificate(cn: str, digest: str = "SHA1") -> x509.Certificate:
    """A self-signed RSA certificate signed with SHA-1 or MD5. ``cryptography`` no longer
    builds those, so a SHA-256 one is re-signed: the algorithm OID is swapped in the TBS
    (same length) and the DER is put together again by hand."""
    key = rsa_key(2048)
    tbs = raw_certificate(cn, key=key).tbs_certificate_bytes
    assert tbs.count(_SHA256_RSA) == 1
    tbs = tbs.replace(_SHA256_RSA, _WEAK_RSA[digest])
    algorithm = hashes.SHA1() if digest == "SHA1" else hashes.MD5()
    signature = key.sign(tbs, padding.PKCS1v15(), algorithm)
    algorithm_id = _tlv(0x30, _WEAK_RSA[digest] + b"\x05\x00")
    certificate = x509.load_der_x509_certificate(
        _tlv(0x30, tbs + algorithm_id + _tlv(0x03, b"\x00" + signature))
    )
    assert certificate.signature_hash_algorithm is not None
    assert certificate.signature_hash_algorithm.name == digest.lower()
    return certificate
