"""`twofold portal …`: the portal's JSON API for integrators and CI pipelines — certificates
here, projects in :mod:`twofold.cli.portal_projects`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import httpx

from twofold.cli._common import err, examples, print_json, read_file, table, write_file
from twofold.client import client_context, explain_tls_failure
from twofold.crypto import certs
from twofold.errors import TwofoldError, UsageError

TOKEN_ENV = "TWOFOLD_TOKEN"
MIN_PREFIX = 8


@dataclass(frozen=True)
class Portal:
    """Where the portal is and who calls it."""

    url: str
    token: str
    cacert: str | None

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return api_call(self.url, self.token, self.cacert, method, path, **kwargs)


def portal_options(fn: Any) -> Any:
    """--portal, --token and --cacert, each with its environment variable."""

    fn = click.option(
        "--cacert",
        envvar="TWOFOLD_CACERT",
        help="CA of the portal's TLS certificate (serve prints it: data/ca/ca.crt). Env: TWOFOLD_CACERT.",
    )(fn)
    fn = click.option(
        "--token",
        envvar=TOKEN_ENV,
        help=f"Personal API token (tf_…). Env: {TOKEN_ENV}.",
    )(fn)
    return click.option(
        "--portal",
        "portal_url",
        envvar="TWOFOLD_PORTAL",
        default="https://localhost:8000",
        show_default=True,
        help="Portal base URL. Env: TWOFOLD_PORTAL.",
    )(fn)


def connect(portal_url: str, token: str | None, cacert: str | None) -> Portal:
    if not token:
        raise UsageError(
            f"no API token: pass --token tf_… or set {TOKEN_ENV}. Make one on the portal's API tokens "
            "page, or ask an operator (`twofold admin token new --email you@example.com`)",
            code="token_missing",
        )
    return Portal(portal_url, token, cacert)


def api_call(portal_url: str, token: str, cacert: str | None, method: str, path: str, **kwargs: Any) -> Any:
    if cacert and not Path(cacert).is_file():
        raise UsageError(
            f"the CA file {cacert} (--cacert or TWOFOLD_CACERT) does not exist", code="file_not_found"
        )
    verify = client_context(verify=cacert or True)
    try:
        with httpx.Client(
            base_url=portal_url.rstrip("/"),
            verify=verify,
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            response = client.request(method, path, **kwargs)
    except httpx.UnsupportedProtocol:
        raise UsageError(f"{portal_url!r} is not an https:// URL of a portal", code="usage") from None
    except httpx.TransportError as exc:
        raise explain_tls_failure(exc, sent_client_cert=False, host=portal_url) from None
    try:
        body = response.json()
    except ValueError:
        raise TwofoldError(
            f"the portal answered HTTP {response.status_code} without JSON; is {portal_url} the portal?",
            code="portal_unexpected",
        ) from None
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise TwofoldError(
            str(error.get("message", f"HTTP {response.status_code}")),
            code=str(error.get("code", f"http_{response.status_code}")),
            status=response.status_code,
        )
    return body


@click.group(
    help="Certificates and projects of your organisation, through the portal's API (for CI pipelines "
    "that rotate certificates, and CLI-only users)."
    + examples(
        "export TWOFOLD_PORTAL=https://localhost:8000 TWOFOLD_TOKEN=tf_… TWOFOLD_CACERT=data/ca/ca.crt",
        "twofold portal cert add --env cat --use mtls acme-cat/mtls.crt",
        "twofold portal cert request --env prod --use mtls prod/mtls.csr --out prod/mtls.crt",
        "twofold portal cert list --env cat",
        "twofold portal project add treasury",
        "twofold portal project product add treasury --env cat balance payments",
    )
)
def portal() -> None:
    pass


@portal.group(help="Certificates of your organisation.")
def cert() -> None:
    pass


def refuse_private_key(path: str, data: bytes) -> None:
    """A file holding a private key never leaves the machine: refuse before sending a byte."""
    content = certs.private_key_content(data, path)
    if content is None:
        return
    if content.startswith("a PKCS#12"):
        fix = f"export the certificate alone: openssl pkcs12 -in {path} -clcerts -nokeys -out cert.pem"
    elif content.startswith("a private key besides"):
        fix = f"register a file with the certificate alone: openssl x509 -in {path} -out cert.pem"
    else:
        sibling = next(
            (
                str(Path(path).with_suffix(s))
                for s in (".crt", ".pem", ".cer")
                if Path(path).with_suffix(s).is_file()
            ),
            None,
        )
        fix = f"register its certificate instead{': ' + sibling if sibling and sibling != path else ''}"
    raise UsageError(
        f"{path} is {content}: nothing was sent, the key stays private on this machine. A certificate is "
        f"registered on its own — {fix}",
        code="private_key_not_sent",
    )


@cert.command(
    "add",
    help="Register a certificate (PEM or DER) for MTLS or Digital Signature use. A file holding a "
    "private key (a .key, a certificate + key bundle, a .p12) is refused here, before anything is sent."
    + examples(
        "twofold portal cert add --env cat --use mtls acme-cat/mtls.crt",
        "twofold portal cert add --env cat --use signature acme-cat/sign.crt",
    ),
)
@click.argument("file")
@click.option("--env", "env_id", required=True, help="Environment id, e.g. cat or prod.")
@click.option("--use", type=click.Choice(["mtls", "signature"]), required=True)
@click.option("--json", "as_json", is_flag=True)
@portal_options
def cert_add(
    file: str, env_id: str, use: str, as_json: bool, portal_url: str, token: str | None, cacert: str | None
) -> None:
    data = read_file(file, "the certificate file")
    refuse_private_key(file, data)
    row = connect(portal_url, token, cacert).call(
        "POST",
        "/api/v1/certificates",
        files={"file": (Path(file).name, data)},
        data={"environment": env_id, "use": use},
    )
    if as_json:
        print_json(row)
        return
    err.print(
        f"registered {row['use_label']} certificate {row['common_name']} in {env_id}: {row['fingerprint']} "
        f"(expires {row['not_after'][:10]})",
        markup=False,
    )


@cert.command(
    "request",
    help="Submit a CSR (PEM or DER) to an environment that issues certificates: its CA issues the "
    "certificate, the portal registers it, and it is written to --out (the CA's chain to --chain)."
    + examples(
        "twofold csr new --key prod/mtls.key --subject '/O=Acme/CN=acme-prod' --out prod/mtls.csr",
        "twofold portal cert request --env prod --use mtls prod/mtls.csr --out prod/mtls.crt --chain prod/ca.pem",
        "openssl verify -CAfile prod/ca.pem prod/mtls.crt",
    ),
)
@click.argument("csr_file")
@click.option("--env", "env_id", required=True, help="Environment id, e.g. prod.")
@click.option("--use", type=click.Choice(["mtls", "signature"]), required=True)
@click.option(
    "--out", "out_path", required=True, help="Where to write the issued certificate (PEM; '-' stdout)."
)
@click.option("--chain", "chain_path", help="Where to write the issuing CA's certificate (PEM).")
@click.option("--days", type=click.IntRange(1, 3650), help="Validity (default: the environment's maximum).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--json", "as_json", is_flag=True)
@portal_options
def cert_request(
    csr_file: str,
    env_id: str,
    use: str,
    out_path: str,
    chain_path: str | None,
    days: int | None,
    force: bool,
    as_json: bool,
    portal_url: str,
    token: str | None,
    cacert: str | None,
) -> None:
    portal = connect(portal_url, token, cacert)
    data = read_file(csr_file, "the CSR file")
    for path in (out_path, chain_path):  # refuse before anything is issued
        if path and path != "-" and Path(path).exists() and not force:
            raise UsageError(f"{path} already exists; pass --force to overwrite it")
    fields = {"environment": env_id, "use": use, **({"days": str(days)} if days else {})}
    row = portal.call(
        "POST",
        "/api/v1/certificates/requests",
        files={"file": (csr_file, data)},
        data=fields,
    )
    write_file(out_path, row["certificate_pem"].encode(), force=True)
    if chain_path:
        write_file(chain_path, row["chain_pem"].encode(), force=True)
    if as_json:
        print_json({k: v for k, v in row.items() if not k.endswith("_pem")})
        return
    err.print(
        f"issued and registered {row['use_label']} certificate {row['common_name']} in {env_id}: serial "
        f"{row['serial']}, {row['fingerprint']} (expires {row['not_after'][:10]})",
        markup=False,
    )
    if out_path != "-":
        err.print(f"  certificate  {out_path}" + (f"\n  CA chain     {chain_path}" if chain_path else ""))


@cert.command("list", help="List registered certificates (full SHA-256 fingerprints).")
@click.option("--env", "env_id", help="Only this environment.")
@click.option("--json", "as_json", is_flag=True)
@portal_options
def cert_list(
    env_id: str | None, as_json: bool, portal_url: str, token: str | None, cacert: str | None
) -> None:
    rows = connect(portal_url, token, cacert).call(
        "GET", "/api/v1/certificates", params={"env": env_id} if env_id else {}
    )
    if as_json:
        print_json(rows)
        return
    table(
        ["ENV", "USE", "COMMON NAME", "SHA-256 FINGERPRINT", "EXPIRES", "ADDED BY"],
        [
            [
                row["environment"],
                row["use_label"],
                row["common_name"],
                row["fingerprint"],
                f"{row['not_after'][:10]} ({row['days_left']} days)",
                row["added_by"],
            ]
            for row in rows
        ],
        empty="no certificates registered" + (f" in {env_id}" if env_id else ""),
    )


def resolve_fingerprint(portal: Portal, env_id: str, ref: str) -> str:
    """A full SHA-256 fingerprint from what a person gives: the fingerprint (colons and a
    trailing … allowed), a unique prefix of at least 8 hex digits, or the certificate file."""
    if Path(ref).is_file():
        data = read_file(ref, "the certificate file")
        refuse_private_key(ref, data)
        return certs.fingerprint_sha256(certs.load_certificate(data, name=ref))
    hexed = ref.strip().lower().replace(":", "").rstrip(".…")
    if not re.fullmatch(r"[0-9a-f]+", hexed):
        raise UsageError(
            f"{ref!r} is neither a SHA-256 fingerprint (or a prefix of one) nor a certificate file",
            code="usage",
        )
    if len(hexed) == 64:
        return hexed
    if len(hexed) < MIN_PREFIX:
        raise UsageError(
            f"a fingerprint prefix needs {MIN_PREFIX} or more hex digits ({hexed} has {len(hexed)})",
            code="usage",
        )
    rows = portal.call("GET", "/api/v1/certificates", params={"env": env_id})
    matches = [row for row in rows if row["fingerprint"].startswith(hexed)]
    if not matches:
        raise TwofoldError(
            f"no active certificate in {env_id} has a fingerprint starting with {hexed}; "
            f"`twofold portal cert list --env {env_id}` shows them",
            code="certificate_not_found",
        )
    if len(matches) > 1:
        candidates = "; ".join(f"{r['fingerprint']} ({r['common_name']}, {r['use_label']})" for r in matches)
        raise UsageError(
            f"{hexed} starts {len(matches)} fingerprints in {env_id}: {candidates}. Give more digits",
            code="fingerprint_ambiguous",
        )
    return str(matches[0]["fingerprint"])


@cert.command(
    "rm",
    help="Remove a certificate — given by its SHA-256 fingerprint, a unique prefix of it (8 or more hex "
    "digits, as the portal shows), or the certificate file. Calls using it are refused at once."
    + examples(
        "twofold portal cert rm --env cat acme-cat/mtls.crt",
        "twofold portal cert rm --env cat 4e8a50f0",
    ),
)
@click.argument("certificate")
@click.option("--env", "env_id", required=True)
@click.option("--json", "as_json", is_flag=True)
@portal_options
def cert_rm(
    certificate: str, env_id: str, as_json: bool, portal_url: str, token: str | None, cacert: str | None
) -> None:
    portal = connect(portal_url, token, cacert)
    fingerprint = resolve_fingerprint(portal, env_id, certificate)
    row = portal.call("DELETE", f"/api/v1/certificates/{quote(fingerprint, safe='')}", params={"env": env_id})
    if as_json:
        print_json(row)
        return
    err.print(f"removed {row['common_name']} ({row['fingerprint']}) from {env_id}", markup=False)


@portal.group(help="API products: what projects can hold.")
def product() -> None:
    pass


@product.command(
    "list", help="List the API products (to add to a project: `twofold portal project product add`)."
)
@click.option("--json", "as_json", is_flag=True)
@portal_options
def product_list(as_json: bool, portal_url: str, token: str | None, cacert: str | None) -> None:
    rows = connect(portal_url, token, cacert).call("GET", "/api/v1/products")
    if as_json:
        print_json(rows)
        return
    table(
        ["PRODUCT", "NAME", "PATH", "SIGNATURE"],
        [[row["id"], row["name"], row["path_prefix"], row["signature"]] for row in rows],
        empty="no API products yet (an operator adds them)",
    )


__all__ = ["Portal", "connect", "portal", "portal_options"]
