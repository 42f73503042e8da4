"""`twofold portal …`: the portal's JSON API for integrators and CI pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import httpx

from twofold.cli._common import err, examples, out, print_json, read_file, write_file
from twofold.client import explain_tls_failure
from twofold.errors import TwofoldError, UsageError


def portal_options(fn: Any) -> Any:
    fn = click.option(
        "--cacert",
        envvar="TWOFOLD_CACERT",
        help="CA of the portal's TLS certificate (serve prints it). Env: TWOFOLD_CACERT.",
    )(fn)
    fn = click.option(
        "--token",
        envvar="TWOFOLD_TOKEN",
        required=True,
        help="Personal API token (tf_…). Env: TWOFOLD_TOKEN.",
    )(fn)
    return click.option(
        "--portal",
        "portal_url",
        envvar="TWOFOLD_PORTAL",
        default="https://localhost:8000",
        show_default=True,
        help="Portal base URL. Env: TWOFOLD_PORTAL.",
    )(fn)


def api_call(portal_url: str, token: str, cacert: str | None, method: str, path: str, **kwargs: Any) -> Any:
    verify: bool | str = cacert or True
    try:
        with httpx.Client(
            base_url=portal_url.rstrip("/"),
            verify=verify,
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as client:
            response = client.request(method, path, **kwargs)
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
    help="Register and list certificates through the portal's API (for CI pipelines that rotate "
    "certificates)."
    + examples(
        "export TWOFOLD_PORTAL=https://localhost:8000 TWOFOLD_TOKEN=tf_… TWOFOLD_CACERT=data/ca/ca.crt",
        "twofold portal cert add --env cat --use mtls acme-cat/mtls.crt",
        "twofold portal cert request --env prod --use mtls prod/mtls.csr --out prod/mtls.crt",
        "twofold portal cert list --env cat",
    )
)
def portal() -> None:
    pass


@portal.group(help="Certificates of your organisation.")
def cert() -> None:
    pass


@cert.command(
    "add",
    help="Register a certificate (PEM or DER) for MTLS or Digital Signature use."
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
    file: str, env_id: str, use: str, as_json: bool, portal_url: str, token: str, cacert: str | None
) -> None:
    data = read_file(file, "the certificate file")
    row = api_call(
        portal_url,
        token,
        cacert,
        "POST",
        "/api/v1/certificates",
        files={"file": (file, data)},
        data={"environment": env_id, "use": use},
    )
    if as_json:
        print_json(row)
        return
    err.print(
        f"registered {row['use_label']} certificate {row['common_name']} in {env_id}: {row['fingerprint']} "
        f"(expires {row['not_after'][:10]})"
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
    token: str,
    cacert: str | None,
) -> None:
    data = read_file(csr_file, "the CSR file")
    for path in (out_path, chain_path):  # refuse before anything is issued
        if path and path != "-" and Path(path).exists() and not force:
            raise UsageError(f"{path} already exists; pass --force to overwrite it")
    fields = {"environment": env_id, "use": use, **({"days": str(days)} if days else {})}
    row = api_call(
        portal_url,
        token,
        cacert,
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
        f"{row['serial']}, {row['fingerprint']} (expires {row['not_after'][:10]})"
    )
    if out_path != "-":
        err.print(f"  certificate  {out_path}" + (f"\n  CA chain     {chain_path}" if chain_path else ""))


@cert.command("list", help="List registered certificates.")
@click.option("--env", "env_id", help="Only this environment.")
@click.option("--json", "as_json", is_flag=True)
@portal_options
def cert_list(env_id: str | None, as_json: bool, portal_url: str, token: str, cacert: str | None) -> None:
    rows = api_call(
        portal_url, token, cacert, "GET", "/api/v1/certificates", params={"env": env_id} if env_id else {}
    )
    if as_json:
        print_json(rows)
        return
    if not rows:
        err.print("no certificates registered" + (f" in {env_id}" if env_id else ""))
        return
    for row in rows:
        colour = "red" if row["days_left"] < 30 else "green"
        out.print(
            f"{row['environment']:<6} {row['use_label']:<18} {row['common_name']:<24} {row['fingerprint']}  "
            f"[{colour}]{row['days_left']} days left[/]  added by {row['added_by']}"
        )


@cert.command(
    "rm", help="Remove a certificate by its SHA-256 fingerprint; calls using it are refused at once."
)
@click.argument("fingerprint")
@click.option("--env", "env_id", required=True)
@click.option("--json", "as_json", is_flag=True)
@portal_options
def cert_rm(
    fingerprint: str, env_id: str, as_json: bool, portal_url: str, token: str, cacert: str | None
) -> None:
    row = api_call(
        portal_url, token, cacert, "DELETE", f"/api/v1/certificates/{fingerprint}", params={"env": env_id}
    )
    print_json(row) if as_json else err.print(
        f"removed {row['common_name']} ({row['fingerprint'][:16]}…) from {env_id}"
    )


__all__ = ["portal"]
