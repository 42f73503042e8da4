"""The checks of `twofold doctor`, in order, each learning what the next ones need: the files,
the server, the gateway's answer, the registry (through the portal API), the signed call and
the clock. Each check ends ✓ (pass), ✗ (fail, with what to do), ! (warn) or - (skipped)."""

from __future__ import annotations

import datetime as dt
import email.utils
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from twofold.cli.portal import api_call
from twofold.client.probe import IDENTIFICATION_REFUSALS, Probe, probe
from twofold.crypto import _pem, certs, keys
from twofold.errors import TwofoldError

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
MARKS = {PASS: "[green]✓[/]", FAIL: "[red]✗[/]", WARN: "[yellow]![/]", SKIP: "[dim]-[/]"}
SKEW_WARN, SKEW_FAIL = 5.0, 60.0


@dataclass
class Check:
    id: str
    title: str
    status: str
    detail: str
    fix: str | None = None


@dataclass
class Inputs:
    url: str
    cert: str
    key: str
    sign_key: str | None
    sign_cert: str | None
    cacert: str | None
    env: str | None
    portal: tuple[str, str, str | None] | None
    echo_path: str
    passphrase: Callable[[], bytes | None] | None
    sign_passphrase: Callable[[], bytes | None] | None


@dataclass
class State:
    """What the checks learnt, for the checks after them."""

    certificate: x509.Certificate | None = None
    key: keys.PrivateKey | None = None
    sign_key: keys.PrivateKey | None = None
    pair_ok: bool = False
    reachable: bool = False
    tls_trusted: bool = False
    call: Probe | None = None
    env: dict[str, Any] | None = None
    registered_rows: list[dict[str, Any]] = field(default_factory=list)


class Doctor:
    def __init__(self, inputs: Inputs) -> None:
        self.i = inputs
        self.s = State()
        self.checks: list[Check] = []
        parts = urlsplit(inputs.url)
        self.host = parts.hostname or ""
        self.port = parts.port or 443
        self.path = parts.path or "/"
        self.base = f"{parts.scheme}://{parts.netloc}"

    def add(self, id_: str, title: str, status: str, detail: str, fix: str | None = None) -> None:
        self.checks.append(Check(id_, title, status, detail, fix))

    def run(self) -> list[Check]:
        for step in (
            self.files,
            self.key_pair,
            self.validity,
            self.client_auth,
            self.reachable,
            self.server_tls,
            self.client_certificate,
            self.registered,
            self.product,
            self.signature_registered,
            self.signed_probe,
            self.clock,
        ):
            try:
                step()
            except TwofoldError as error:  # e.g. the portal refused a request
                self.add(
                    step.__name__, step.__name__.replace("_", " "), FAIL, f"{error.code}: {error.message}"
                )
        return self.checks

    # --- the files ------------------------------------------------------------------------------

    def _read(self, path: str, what: str, problems: list[str]) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            problems.append(f"{what} {path} cannot be read ({exc.strerror})")
            return None

    def files(self) -> None:
        problems: list[str] = []
        facts: list[str] = []
        data = self._read(self.i.cert, "the certificate", problems)
        if data is not None:
            try:
                listed = certs.load_certificates(data, name=self.i.cert)
                self.s.certificate = listed[0]
                facts.append(f"{self.i.cert} is a certificate (CN={certs.common_name(listed[0].subject)})")
            except TwofoldError:
                problems.append(f"{self.i.cert} is {_pem.describe(data)}, not a certificate")
        for path, what, passphrase, attr in (
            (self.i.key, "key", self.i.passphrase, "key"),
            (self.i.sign_key, "signing key", self.i.sign_passphrase, "sign_key"),
        ):
            if path is None:
                continue
            data = self._read(path, f"the {what}", problems)
            if data is None:
                continue
            try:
                key = keys.load_private_key(data, passphrase, name=path)
            except TwofoldError as error:
                problems.append(error.message)
                continue
            setattr(self.s, attr, key)
            facts.append(f"{path} is an {keys.describe_key(key)} private key")
        if self.i.cacert:
            data = self._read(self.i.cacert, "the CA file", problems)
            if data is not None:
                try:
                    certs.load_certificates(data, name=self.i.cacert)
                    facts.append(f"{self.i.cacert} holds CA certificates")
                except TwofoldError:
                    problems.append(f"{self.i.cacert} is {_pem.describe(data)}, not CA certificates")
        if problems:
            self.add(
                "files",
                "files",
                FAIL,
                "; ".join(problems),
                "give --cert the certificate (.crt/.pem), --key its private key, --cacert the CA of the server",
            )
        else:
            self.add("files", "files", PASS, "; ".join(facts))

    def key_pair(self) -> None:
        cert, key = self.s.certificate, self.s.key
        if cert is None or key is None:
            self.add("key_pair", "key pair", SKIP, "needs a readable certificate and key")
            return
        if keys.public_key_bytes(key) != keys.public_key_bytes(cert.public_key()):  # type: ignore[arg-type]
            self.add(
                "key_pair",
                "key pair",
                FAIL,
                f"{self.i.key} is not the private key of {self.i.cert} (their public keys differ)",
                "use the key the certificate was made for (the one its CSR was made with)",
            )
            return
        self.s.pair_ok = True
        self.add("key_pair", "key pair", PASS, f"{self.i.key} belongs to {self.i.cert}")

    def validity(self) -> None:
        cert = self.s.certificate
        if cert is None:
            self.add("validity", "validity", SKIP, "needs a readable certificate")
            return
        now = dt.datetime.now(dt.UTC)
        left = certs.days_left(cert.not_valid_after_utc, now)
        renew = "get a new certificate before then: twofold rotate --env … --dir …"
        if cert.not_valid_after_utc <= now:
            self.add(
                "validity",
                "validity",
                FAIL,
                f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                "get a new certificate for a new key and register it (twofold init, then the Security page)",
            )
        elif cert.not_valid_before_utc > now:
            self.add(
                "validity",
                "validity",
                FAIL,
                f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                "check this machine's clock, or wait until the certificate is valid",
            )
        elif left < 30:
            self.add(
                "validity",
                "validity",
                WARN,
                f"valid until {cert.not_valid_after_utc:%Y-%m-%d}, {left} days left",
                renew,
            )
        else:
            self.add(
                "validity",
                "validity",
                PASS,
                f"valid until {cert.not_valid_after_utc:%Y-%m-%d} ({left} days left)",
            )

    def client_auth(self) -> None:
        cert = self.s.certificate
        if cert is None:
            self.add("client_auth", "clientAuth", SKIP, "needs a readable certificate")
        elif certs.allows_client_auth(cert):
            self.add(
                "client_auth", "clientAuth", PASS, "its extended key usage allows TLS client authentication"
            )
        else:
            self.add(
                "client_auth",
                "clientAuth",
                FAIL,
                "its extended key usage lacks clientAuth: servers refuse it for mTLS",
                "reissue it with extendedKeyUsage = clientAuth (twofold init and twofold cert new do)",
            )

    # --- the server -----------------------------------------------------------------------------

    def reachable(self) -> None:
        try:
            with socket.create_connection((self.host, self.port), timeout=5):
                pass
        except OSError as exc:
            self.add(
                "reachable",
                "reachable",
                FAIL,
                f"{self.host}:{self.port} does not accept connections ({exc.strerror or exc})",
                "check the URL's host and port, that the gateway runs, and firewalls on the way",
            )
            return
        self.s.reachable = True
        self.add("reachable", "reachable", PASS, f"{self.host}:{self.port} accepts connections")

    def _context(self) -> ssl.SSLContext:
        if self.i.cacert:
            cas = certs.load_certificates(Path(self.i.cacert).read_bytes(), name=self.i.cacert)
            context = ssl.create_default_context(
                cadata="".join(certs.certificate_pem(c).decode() for c in cas)
            )
        else:
            context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def server_tls(self) -> None:
        if not self.s.reachable:
            self.add("server_tls", "server TLS", SKIP, "needs a reachable server")
            return
        trust = self.i.cacert or "the system's CAs"
        try:
            context = self._context()
            with (
                socket.create_connection((self.host, self.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=self.host) as tls,
            ):
                version = tls.version()
                der = tls.getpeercert(binary_form=True)
        except ssl.SSLCertVerificationError as exc:
            self.add(
                "server_tls",
                "server TLS",
                FAIL,
                f"the server's certificate is not trusted by {trust}: {exc.verify_message}",
                "pass with --cacert the CA that issued the server's certificate (twofold serve: data/ca/ca.crt)",
            )
            return
        except (ssl.SSLError, OSError) as exc:
            # The server's certificate was checked before it could refuse us for lack of a client
            # certificate (TLS 1.2): trusted, then.
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                self.add(
                    "server_tls",
                    "server TLS",
                    FAIL,
                    f"not trusted by {trust}: {exc}",
                    "pass the right --cacert",
                )
                return
            self.s.tls_trusted = True
            self.add(
                "server_tls",
                "server TLS",
                PASS,
                f"server certificate trusted by {trust}; it asks for a client certificate",
            )
            return
        self.s.tls_trusted = True
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else "?"
        self.add(
            "server_tls", "server TLS", PASS, f"{version}; server certificate {subject} trusted by {trust}"
        )

    def _call(self) -> Probe | None:
        if self.s.call is None and self.s.pair_ok and self.s.tls_trusted:
            assert self.s.certificate is not None
            assert self.s.key is not None
            self.s.call = probe(
                self.i.url, cert=self.s.certificate, key=self.s.key, verify=self.i.cacert or True
            )
        return self.s.call

    def client_certificate(self) -> None:
        call = self._call()
        if call is None:
            self.add("client_cert", "client cert", SKIP, "needs a matching key pair and a trusted server")
            return
        if call.tls_refused:
            self.add(
                "client_cert",
                "client cert",
                FAIL,
                f"the server refused the client certificate at the TLS handshake ({call.message})",
                "register it as MTLS in the environment this gateway serves (Security page, or twofold portal "
                "cert add --use mtls), or call the gateway of the environment where it is registered",
            )
        elif call.code in IDENTIFICATION_REFUSALS:
            self.add(
                "client_cert",
                "client cert",
                FAIL,
                f"{call.code}: {call.message}",
                "register the certificate as MTLS on the Security page",
            )
        else:
            self.add("client_cert", "client cert", PASS, f"accepted by the gateway ({call.describe()})")

    # --- the portal -----------------------------------------------------------------------------

    def _environment(self) -> dict[str, Any] | None:
        if self.s.env is not None or self.i.portal is None:
            return self.s.env
        envs = api_call(*self.i.portal, "GET", "/api/v1/environments")
        if self.i.env:
            found = [e for e in envs if e["id"] == self.i.env]
        else:
            found = [e for e in envs if _same_server(e.get("gateway_url"), self.host, self.port)]
        self.s.env = found[0] if len(found) == 1 else None
        return self.s.env

    def _portal_step(self, id_: str, title: str) -> dict[str, Any] | None:
        if self.i.portal is None:
            self.add(id_, title, SKIP, "give --portal and --token (an API token) to check the registry")
            return None
        try:
            env = self._environment()
        except TwofoldError as error:
            self.add(
                id_,
                title,
                FAIL,
                f"the portal refused: {error.code}: {error.message}",
                "check --portal, --token and --cacert",
            )
            return None
        if env is None:
            self.add(id_, title, SKIP, f"which environment {self.base} serves is not known: give --env")
            return None
        return env

    def registered(self) -> None:
        env = self._portal_step("registered", "registered")
        if env is None or self.i.portal is None:
            return
        if self.s.certificate is None:
            self.add("registered", "registered", SKIP, "needs a readable certificate")
            return
        fingerprint = certs.fingerprint_sha256(self.s.certificate)
        rows = api_call(*self.i.portal, "GET", "/api/v1/certificates")
        self.s.registered_rows = rows
        mine = [r for r in rows if r["fingerprint"] == fingerprint]
        here = [r for r in mine if r["environment"] == env["id"] and r["use"] == "mtls"]
        if here:
            self.add(
                "registered", "registered", PASS, f"MTLS certificate {here[0]['common_name']} in {env['id']}"
            )
            return
        elsewhere = sorted({f"{r['environment']} ({r['use_label']})" for r in mine})
        detail = f"{self.i.cert} is not registered as MTLS in {env['id']}" + (
            f"; it is registered in {', '.join(elsewhere)}" if elsewhere else ""
        )
        self.add(
            "registered",
            "registered",
            FAIL,
            detail,
            f"register it in {env['id']} (Security page, or twofold portal cert add --env {env['id']} --use mtls "
            f"{self.i.cert})"
            + (", or call the gateway of the environment where it is registered" if elsewhere else ""),
        )

    def product(self) -> None:
        env = self._portal_step("product", "product")
        if env is None or self.i.portal is None:
            return
        products = api_call(*self.i.portal, "GET", "/api/v1/products")
        lowered = self.path.lower()
        matching = [
            p
            for p in products
            if lowered == p["path_prefix"].lower()
            or lowered.startswith(p["path_prefix"].lower().rstrip("/") + "/")
        ]
        if not matching:
            self.add(
                "product",
                "product",
                SKIP,
                f"no API product serves {self.path}: give the URL of an API (e.g. …/accessapi/balance)",
            )
            return
        product = max(matching, key=lambda p: len(p["path_prefix"]))
        projects = api_call(*self.i.portal, "GET", "/api/v1/projects")
        having = [
            p["name"]
            for p in projects
            if any(
                link["product"] == product["id"] and link["environment"] == env["id"]
                for link in p["products"]
            )
        ]
        if having:
            self.add(
                "product",
                "product",
                PASS,
                f"{product['id']} ({product['path_prefix']}) is in project {having[0]!r} in {env['id']}",
            )
        else:
            self.add(
                "product",
                "product",
                FAIL,
                f"{product['id']} ({product['path_prefix']}) is in no project of your organisation in {env['id']}",
                f"a Developer adds {product['id']} to a project for {env['id']} on the portal's Projects page",
            )

    def signature_registered(self) -> None:
        if self.i.sign_key is None:
            self.add("signature", "signature", SKIP, "no --sign-key given")
            return
        env = self._portal_step("signature", "signature")
        if env is None or self.i.portal is None:
            return
        if self.s.sign_key is None:
            self.add("signature", "signature", SKIP, "needs a readable signing key")
            return
        mine = keys.public_key_bytes(self.s.sign_key)
        rows = [
            r
            for r in (self.s.registered_rows or api_call(*self.i.portal, "GET", "/api/v1/certificates"))
            if r["use"] == "signature" and r["environment"] == env["id"]
        ]
        for row in rows:
            pem = api_call(*self.i.portal, "GET", f"/api/v1/certificates/{row['fingerprint']}/pem")[
                "certificate_pem"
            ]
            if keys.public_key_bytes(certs.load_certificate(pem.encode()).public_key()) == mine:  # type: ignore[arg-type]
                self.add(
                    "signature",
                    "signature",
                    PASS,
                    f"{self.i.sign_key} matches the Digital Signature certificate {row['common_name']} in {env['id']}",
                )
                return
        self.add(
            "signature",
            "signature",
            FAIL,
            f"{self.i.sign_key} matches none of the {len(rows)} Digital Signature certificate(s) registered in {env['id']}",
            f"register the certificate of this key: twofold portal cert add --env {env['id']} --use signature <its .crt>",
        )

    # --- the signed call and the clock ---------------------------------------------------------------

    def signed_probe(self) -> None:
        if self.i.sign_key is None:
            self.add("signed_probe", "signed probe", SKIP, "no --sign-key given")
            return
        if not (self.s.pair_ok and self.s.tls_trusted and self.s.sign_key is not None):
            self.add(
                "signed_probe",
                "signed probe",
                SKIP,
                "needs a working mTLS pair, a trusted server and a signing key",
            )
            return
        url = self.base + self.i.echo_path
        assert self.s.certificate is not None
        assert self.s.key is not None
        result = probe(
            url,
            cert=self.s.certificate,
            key=self.s.key,
            verify=self.i.cacert or True,
            signing_key=self.s.sign_key,
            signing_cert=self.i.sign_cert,
        )
        if result.ok:
            signer = result.signed_by()
            self.add(
                "signed_probe",
                "signed probe",
                PASS,
                f"POST {self.i.echo_path} signed with {self.i.sign_key}: verified ({result.describe()})"
                + (f", by {signer[:16]}…" if signer else ""),
            )
            return
        fixes = {
            "product_not_in_project": "a Developer adds the echo product to a project in this environment (or pass --echo PATH)",
            "no_signature_certificate": "register the certificate of your signing key as Digital Signature",
            "jws_signature_invalid": "sign with the key of a registered Digital Signature certificate",
            "jws_no_key": "register the certificate of your signing key as Digital Signature (or drop the wrong kid)",
        }
        self.add(
            "signed_probe",
            "signed probe",
            FAIL,
            f"POST {self.i.echo_path} signed with {self.i.sign_key}: {result.describe()}",
            fixes.get(result.code or "", "see the gateway's message"),
        )

    def clock(self) -> None:
        call = self.s.call
        date = call.date if call is not None else None
        if date is None:
            self.add("clock", "clock", SKIP, "needs an HTTP answer with a Date header")
            return
        server = email.utils.parsedate_to_datetime(date)
        skew = (dt.datetime.now(dt.UTC) - server).total_seconds()
        detail = (
            f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the server's clock (its Date header)"
        )
        if abs(skew) > SKEW_FAIL:
            self.add(
                "clock",
                "clock",
                FAIL,
                detail,
                "synchronise this machine's clock (NTP): validity and signature checks depend on it",
            )
        elif abs(skew) > SKEW_WARN:
            self.add("clock", "clock", WARN, detail, "synchronise this machine's clock (NTP)")
        else:
            self.add("clock", "clock", PASS, detail)


def _same_server(gateway_url: str | None, host: str, port: int) -> bool:
    if not gateway_url:
        return False
    parts = urlsplit(gateway_url)
    loopback = {"localhost", "127.0.0.1", "::1"}
    same_host = parts.hostname == host or (parts.hostname in loopback and host in loopback)
    return same_host and (parts.port or 443) == port
