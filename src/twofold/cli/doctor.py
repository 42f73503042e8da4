"""`twofold doctor`: why does my call fail? Every check an integrator needs, each answered
✓ or ✗ with what to do, from the files to the signed call through the gateway (the checks:
:mod:`twofold.cli.diagnosis`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from urllib.parse import urlsplit

import click
from rich.markup import escape

from twofold.cli._common import (
    EXIT_FAILURE,
    err,
    examples,
    out,
    passphrase_options,
    passphrase_source,
    print_json,
)
from twofold.cli.diagnosis import FAIL, MARKS, SKIP, WARN, Doctor, Inputs


@click.command(
    "doctor",
    help="Find out why a call fails: checks the files (readable, the right kind, key matches "
    "certificate, validity, clientAuth), the server (reachable, TLS version, certificate trusted by "
    "--cacert), that the gateway accepts the client certificate, and — with --portal/--token — that it "
    "is registered in that environment and the API product is in a project; with --sign-key, that the "
    "signing key's certificate is registered and a signed probe through the sandbox echo product "
    "verifies; and the clock against the server's. Each check is ✓ or ✗ with what to do. Exit 0 when "
    "nothing failed, 1 otherwise."
    + examples(
        "twofold doctor https://localhost:8443/accessapi/balance --cert acme-cat/mtls.crt --key acme-cat/mtls.key "
        "--cacert data/ca/ca.crt",
        "twofold doctor https://localhost:8443/tsapi/v1/payments --cert mtls.crt --key mtls.key --sign-key sign.key "
        "--cacert ca.crt --portal https://localhost:8000 --token tf_…",
        "twofold doctor … --json | jq '.checks[] | select(.status == \"fail\")'",
    ),
)
@click.argument("url")
@click.option("--cert", required=True, help="The mTLS client certificate.")
@click.option("--key", required=True, help="Its private key.")
@click.option("--sign-key", help="The Digital Signature private key.")
@click.option("--sign-cert", help="Its certificate (named in the JWS header as x5t#S256).")
@click.option("--cacert", help="CA of the server's certificate (default: the system's CAs).")
@click.option(
    "--env", "env_id", help="The environment the URL's gateway serves (default: found through the portal)."
)
@click.option(
    "--portal",
    "portal_url",
    envvar="TWOFOLD_PORTAL",
    help="Portal base URL, to check the registry. Env: TWOFOLD_PORTAL.",
)
@click.option("--token", envvar="TWOFOLD_TOKEN", help="API token for the portal. Env: TWOFOLD_TOKEN.")
@click.option(
    "--portal-cacert",
    envvar="TWOFOLD_CACERT",
    help="CA of the portal (default: --cacert). Env: TWOFOLD_CACERT.",
)
@click.option(
    "--echo",
    "echo_path",
    default="/echo",
    show_default=True,
    help="Path of the echo product for the signed probe.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@passphrase_options(what="the client key")
@passphrase_options(prefix="sign-", what="the signing key")
def doctor(
    url: str,
    cert: str,
    key: str,
    sign_key: str | None,
    sign_cert: str | None,
    cacert: str | None,
    env_id: str | None,
    portal_url: str | None,
    token: str | None,
    portal_cacert: str | None,
    echo_path: str,
    as_json: bool,
    passphrase_file: str | None,
    passphrase_env: str | None,
    sign_passphrase_file: str | None,
    sign_passphrase_env: str | None,
) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise click.UsageError(f"{url!r} is not an https:// URL")
    portal = (portal_url, token, portal_cacert or cacert) if portal_url and token else None

    def source(file: str | None, env: str | None, label: str) -> Callable[[], bytes | None]:
        ask = passphrase_source(file, env, label)
        return lambda: _bytes(ask() if callable(ask) else ask)

    checks = Doctor(
        Inputs(
            url,
            cert,
            key,
            sign_key,
            sign_cert,
            cacert,
            env_id,
            portal,
            echo_path,
            source(passphrase_file, passphrase_env, key),
            source(sign_passphrase_file, sign_passphrase_env, sign_key or ""),
        )
    ).run()
    failed = [c for c in checks if c.status == FAIL]
    if as_json:
        print_json({"url": url, "ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        out.print(f"twofold doctor {url}")
        for check in checks:
            out.print(f"  {MARKS[check.status]} {check.title:<13} {escape(check.detail)}")
            if check.fix and check.status in (FAIL, WARN):
                out.print(f"  {'':<15} [dim]→ {escape(check.fix)}[/]")
        counted = [c for c in checks if c.status != SKIP]
        if failed:
            err.print(f"[bold red]{len(failed)} of {len(counted)} checks failed[/]")
        else:
            err.print(
                f"[bold green]all {len(counted)} checks passed[/]"
                + (f" ({len(checks) - len(counted)} skipped)" if len(counted) < len(checks) else "")
            )
    if failed:
        raise SystemExit(EXIT_FAILURE)


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value
