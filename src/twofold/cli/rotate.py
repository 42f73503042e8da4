"""`twofold rotate`: replace credentials without a failed call.

For each credential rotated (MTLS ``mtls.key``/``mtls.crt``, Digital Signature
``sign.key``/``sign.crt`` in ``--dir``): a new key of the old one's type; a certificate for it
with the old subject — issued from a CSR where the environment issues, else self-signed where
that is accepted; registered beside the old one (the CN's second mTLS certificate, the second
signature certificate); a probe through the gateway with the new pair; then the files are
switched (each by an atomic rename, the old ones kept as ``*.old``), running clients get
``--grace`` seconds to pick them up, and the old certificate is removed from the registry.
A failed probe removes what was registered, deletes the new files and says why.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twofold.cli._common import err, examples, passphrase_options, passphrase_source, print_json, write_file
from twofold.cli.portal import api_call, connect, portal_options
from twofold.client.probe import SIGNATURE_REFUSALS, Probe, probe_until
from twofold.crypto import certs, keys
from twofold.errors import TwofoldError, UsageError

FILES = {"mtls": "mtls", "signature": "sign"}
USAGE: dict[str, certs.Usage] = {"mtls": "client", "signature": "signature"}


@dataclass
class Credential:
    use: str
    key_path: Path
    cert_path: Path
    key: keys.PrivateKey
    certificate: x509.Certificate
    passphrase: bytes | None  # the old key's, used for the new one too
    new_key: keys.PrivateKey | None = None
    new_certificate: x509.Certificate | None = None
    registered: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "MTLS" if self.use == "mtls" else "Digital Signature"

    @property
    def old_fingerprint(self) -> str:
        return certs.fingerprint_sha256(self.certificate)

    @property
    def new_fingerprint(self) -> str:
        assert self.new_certificate is not None
        return certs.fingerprint_sha256(self.new_certificate)

    def new_paths(self) -> tuple[Path, Path]:
        return _suffixed(self.key_path, ".new"), _suffixed(self.cert_path, ".new")

    def old_paths(self) -> tuple[Path, Path]:
        return _suffixed(self.key_path, ".old"), _suffixed(self.cert_path, ".old")


def _suffixed(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _step(ok: bool | None, text: str) -> None:
    mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[dim]…[/]"}[ok]
    err.print(f"  {mark} {text}")


def _load(directory: Path, use: str, passphrase_file: str | None, passphrase_env: str | None) -> Credential:
    name = FILES[use]
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    for path in (key_path, cert_path):
        if not path.is_file():
            raise UsageError(
                f"{path} does not exist: --dir must hold {name}.key and {name}.crt (what `twofold init` writes)"
            )
    asked: list[bytes | None] = []
    source = passphrase_source(passphrase_file, passphrase_env, str(key_path))

    def remember() -> bytes | None:
        value = source() if callable(source) else None
        secret = value.encode() if isinstance(value, str) else value
        asked.append(secret)
        return secret

    key = keys.load_private_key(key_path.read_bytes(), remember, name=str(key_path))
    certificate = certs.load_certificate(cert_path.read_bytes(), name=str(cert_path))
    if keys.public_key_bytes(key) != keys.public_key_bytes(certificate.public_key()):  # type: ignore[arg-type]
        raise UsageError(f"{key_path} is not the key of {cert_path}: fix the pair before rotating it")
    return Credential(use, key_path, cert_path, key, certificate, asked[0] if asked else None)


def _check_registered(
    portal: tuple[str, str, str | None], env: dict[str, Any], creds: list[Credential]
) -> None:
    """Rotate only what is registered in this environment (else the files would be switched
    to a certificate that the environment where they are used does not know)."""
    rows = api_call(*portal, "GET", "/api/v1/certificates")
    for cred in creds:
        where = sorted({r["environment"] for r in rows if r["fingerprint"] == cred.old_fingerprint})
        if env["id"] not in where:
            elsewhere = f" (it is registered in {', '.join(where)})" if where else ""
            raise UsageError(
                f"{cred.cert_path} is not registered in {env['id']}{elsewhere}: rotate it in the environment "
                f"that uses it, or register it in {env['id']} first"
            )


def _same_kind(key: keys.PrivateKey) -> keys.PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        return keys.generate_private_key("rsa", bits=key.key_size if key.key_size in keys.RSA_SIZES else 2048)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return keys.generate_private_key("ec", curve=keys.jose_curve(key.curve))


def _environment(portal: tuple[str, str, str | None], env_id: str) -> dict[str, Any]:
    envs = {e["id"]: e for e in api_call(*portal, "GET", "/api/v1/environments")}
    if env_id not in envs:
        raise UsageError(f"the portal has no environment {env_id!r}; it has {', '.join(sorted(envs))}")
    return dict(envs[env_id])


def _obtain(
    portal: tuple[str, str, str | None], env: dict[str, Any], cred: Credential, days: int | None
) -> None:
    """A new key and a registered certificate for it (issued, or self-signed)."""
    cred.new_key = _same_kind(cred.key)
    subject = cred.certificate.subject
    if env["issues_certificates"]:
        csr = certs.csr_pem(certs.build_csr(cred.new_key, subject))
        fields = {"environment": env["id"], "use": cred.use, **({"days": str(days)} if days else {})}
        row = api_call(
            *portal, "POST", "/api/v1/certificates/requests", files={"file": ("rotate.csr", csr)}, data=fields
        )
        cred.new_certificate = certs.load_certificate(row["certificate_pem"].encode())
        how = f"issued by {env['name']}'s CA (serial {row['serial']})"
    elif env["allow_self_signed"]:
        cred.new_certificate = certs.self_signed_certificate(
            cred.new_key, subject, days=days or env["max_validity_days"], usage=USAGE[cred.use]
        )
        row = api_call(
            *portal,
            "POST",
            "/api/v1/certificates",
            json={
                "environment": env["id"],
                "use": cred.use,
                "certificate": certs.certificate_pem(cred.new_certificate).decode(),
            },
        )
        how = "self-signed"
    else:
        raise UsageError(
            f"{env['name']} ({env['id']}) accepts only certificates from its CA and does not issue them: get a "
            "certificate for a new key from that CA and register it with `twofold portal cert add`"
        )
    cred.registered = True
    _step(
        True,
        f"new {keys.describe_key(cred.new_key)} key; {cred.label} certificate for {subject.rfc4514_string()} "
        f"{how}, registered beside the old one ({row['fingerprint'][:16]}…)",
    )


def _write_new(cred: Credential) -> None:
    assert cred.new_key is not None
    assert cred.new_certificate is not None
    key_new, cert_new = cred.new_paths()
    write_file(
        key_new, keys.private_key_bytes(cred.new_key, passphrase=cred.passphrase), secret=True, force=True
    )
    write_file(cert_new, certs.certificate_pem(cred.new_certificate), force=True)


def _switch(cred: Credential) -> None:
    """Each file replaced by an atomic rename; the old ones stay as ``*.old``."""
    key_new, cert_new = cred.new_paths()
    key_old, cert_old = cred.old_paths()
    for current, old in ((cred.key_path, key_old), (cred.cert_path, cert_old)):
        old.unlink(missing_ok=True)
        os.link(current, old)
    os.replace(key_new, cred.key_path)
    os.replace(cert_new, cred.cert_path)


def _rollback(portal: tuple[str, str, str | None], env_id: str, creds: list[Credential]) -> None:
    for cred in creds:
        for path in cred.new_paths():
            path.unlink(missing_ok=True)
        if cred.registered and cred.new_certificate is not None:
            try:
                api_call(
                    *portal, "DELETE", f"/api/v1/certificates/{cred.new_fingerprint}", params={"env": env_id}
                )
                _step(
                    True,
                    f"rolled back: removed the new {cred.label} certificate {cred.new_fingerprint[:16]}…",
                )
            except TwofoldError as error:
                _step(
                    False,
                    f"could not remove the new {cred.label} certificate {cred.new_fingerprint}: {error.message} — "
                    f"remove it with `twofold portal cert rm --env {env_id} {cred.new_fingerprint}`",
                )


def _probe(
    gateway: str,
    path: str,
    cacert: str | None,
    mtls: tuple[Path, Path, bytes | None],
    sign: Credential | None,
) -> tuple[bool, str, Probe]:
    """Whether the new pair works through the gateway, and a sentence saying so (or why not).
    ``mtls`` is the certificate, key and passphrase to call with."""
    url = gateway.rstrip("/") + path
    verify: bool | str = cacert or True
    cert, key, passphrase = mtls
    if sign is None:
        result = probe_until(
            url, lambda p: p.identified, cert=cert, key=key, passphrase=passphrase, verify=verify
        )
        if result.identified:
            return (
                True,
                f"GET {url}: the gateway accepted the new mTLS certificate ({result.describe()})",
                result,
            )
        return False, f"GET {url} with the new mTLS certificate: {result.describe()}", result
    key_new, cert_new = sign.new_paths()
    result = probe_until(
        url,
        lambda p: p.ok or (p.status is not None and p.code not in SIGNATURE_REFUSALS and p.identified),
        cert=cert,
        key=key,
        passphrase=passphrase,
        verify=verify,
        signing_key=key_new,
        signing_cert=cert_new,
        signing_passphrase=sign.passphrase,
    )
    signer = result.signed_by()
    if result.ok and signer in (None, sign.new_fingerprint):
        return True, f"POST {url} signed with the new key: verified ({result.describe()})", result
    if result.code == "product_not_in_project":
        return (
            False,
            f"POST {url}: {result.message} — the probe needs a product that verifies signatures in a project "
            "(the sandbox echo product, or --probe PATH)",
            result,
        )
    if result.ok:
        return False, f"POST {url}: verified with {signer}, not the new certificate", result
    return False, f"POST {url} signed with the new key: {result.describe()}", result


@click.command(
    "rotate",
    help="Replace credentials with zero downtime: new key (same type), new certificate (from the "
    "environment's CA by CSR, or self-signed where accepted), registered beside the old one, probed "
    "through the gateway, files switched atomically (old ones kept as *.old), then the old certificate "
    "removed. A failed probe rolls everything back and says why. Exit 0 rotated, 1 refused or rolled back."
    + examples(
        "twofold rotate --env cat --dir acme-cat/",
        "twofold rotate --env prod --use mtls --dir acme-prod/ --grace 30",
        "twofold rotate --env cat --use signature --dir acme-cat/ --probe /echo",
    ),
)
@click.option("--env", "env_id", required=True, help="Environment id, e.g. cat or prod.")
@click.option(
    "--dir", "directory", required=True, type=click.Path(file_okay=False), help="Credentials directory."
)
@click.option("--use", type=click.Choice(["mtls", "signature", "both"]), default="both", show_default=True)
@click.option("--gateway", help="Gateway base URL (default: the environment's, as the portal names it).")
@click.option("--probe", "probe_path", default="/echo", show_default=True, help="Path of the probe call.")
@click.option(
    "--grace",
    type=click.FloatRange(0, 3600),
    default=5.0,
    show_default=True,
    help="Seconds running clients get to pick up the new files before the old certificate is removed.",
)
@click.option(
    "--days", type=click.IntRange(1, 825), help="Validity of the new certificates (default: the maximum)."
)
@click.option("--keep-old", is_flag=True, help="Keep the *.old files after the old certificate is removed.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@passphrase_options(what="the credentials' keys")
@portal_options
def rotate(
    env_id: str,
    directory: str,
    use: str,
    gateway: str | None,
    probe_path: str,
    grace: float,
    days: int | None,
    keep_old: bool,
    as_json: bool,
    passphrase_file: str | None,
    passphrase_env: str | None,
    portal_url: str,
    token: str | None,
    cacert: str | None,
) -> None:
    token = connect(portal_url, token, cacert).token  # no token: says how to give one
    folder = Path(directory)
    uses = ["mtls", "signature"] if use == "both" else [use]
    creds = [_load(folder, u, passphrase_file, passphrase_env) for u in uses]
    current = creds[0] if uses[0] == "mtls" else _load(folder, "mtls", passphrase_file, passphrase_env)
    mtls_files = (current.cert_path, current.key_path, current.passphrase)  # the probe calls with it
    portal = (portal_url, token, cacert)
    env = _environment(portal, env_id)
    _check_registered(portal, env, creds)
    gateway_url = gateway or env.get("gateway_url")
    if not gateway_url:
        raise UsageError(f"the portal names no gateway for {env_id}: pass --gateway https://host:port")
    err.print(
        f"rotating {' and '.join(c.label for c in creds)} in {env['name']} ({env_id}); gateway {gateway_url}"
    )
    try:
        for cred in creds:
            _obtain(portal, env, cred, days)
            _write_new(cred)
        for cred in creds:
            if cred.use == "mtls":
                key_new, cert_new = cred.new_paths()
                mtls_files = (cert_new, key_new, cred.passphrase)
                ok, said, _ = _probe(gateway_url, probe_path, cacert, mtls_files, None)
            else:
                ok, said, _ = _probe(gateway_url, probe_path, cacert, mtls_files, cred)
            _step(ok, "probe: " + said)
            if not ok:
                raise _ProbeFailed(said)
    except (TwofoldError, _ProbeFailed) as failure:
        _rollback(portal, env_id, creds)
        message = failure.message if isinstance(failure, TwofoldError) else str(failure)
        code = failure.code if isinstance(failure, TwofoldError) else "probe_failed"
        raise TwofoldError(
            f"rotation rolled back, the old credentials are unchanged and still registered: {message}",
            code=code,
        ) from None
    for cred in creds:
        _switch(cred)
        _step(True, f"switched {cred.key_path} and {cred.cert_path} (the old ones: *.old)")
    if grace:
        _step(None, f"waiting {grace:g} s for running clients to pick up the new files")
        time.sleep(grace)
    removed = []
    for cred in creds:
        try:
            api_call(
                *portal, "DELETE", f"/api/v1/certificates/{cred.old_fingerprint}", params={"env": env_id}
            )
        except TwofoldError as error:
            if error.code != "certificate_not_found":
                _step(
                    False,
                    f"could not remove the old {cred.label} certificate: {error.message}; remove it with "
                    f"`twofold portal cert rm --env {env_id} {cred.old_fingerprint}` (its files: *.old)",
                )
                continue
            _step(True, f"the old {cred.label} certificate was not registered in {env_id}: nothing to remove")
        else:
            _step(
                True, f"removed the old {cred.label} certificate {cred.old_fingerprint[:16]}… from {env_id}"
            )
        removed.append(cred)
        if not keep_old:
            for path in cred.old_paths():
                path.unlink(missing_ok=True)
    if as_json:
        print_json(
            {
                "environment": env_id,
                "rotated": [
                    {
                        "use": c.use,
                        "key": str(c.key_path),
                        "certificate": str(c.cert_path),
                        "old_fingerprint": c.old_fingerprint,
                        "new_fingerprint": c.new_fingerprint,
                        "old_removed": c in removed,
                    }
                    for c in creds
                ],
            }
        )
    err.print(
        "[bold green]rotated[/]" + ("" if len(removed) == len(creds) else " (see above what is left to do)")
    )


class _ProbeFailed(Exception):
    pass
