"""`twofold admin`: the catalogue — API products (with their replay protection and response
signing), the provider's signing keys, environments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from twofold.cli._common import (
    err,
    examples,
    passphrase_options,
    passphrase_source,
    print_json,
    read_file,
    table,
)
from twofold.cli._registry import DEFAULT_DATA, db_options, with_registry
from twofold.cli.admin import admin
from twofold.crypto import certs
from twofold.errors import UsageError
from twofold.issuing import IssuingCAs, load_for_install
from twofold.registry.auth import SYSTEM
from twofold.registry.catalogue import MAX_REPLAY_WINDOW
from twofold.registry.service import SIGNATURE_POLICIES, Registry

# --- products and environments -----------------------------------------------------------------


def protection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Replay protection and signed responses (each left as it is when not given)."""
    for option in reversed(_PROTECTION):
        command = option(command)
    return command


_PROTECTION = [
    click.option(
        "--replay-window",
        type=click.IntRange(0, MAX_REPLAY_WINDOW),
        help="Refuse replayed signed requests: the signing time within ± this many seconds and each id "
        "once per organisation (0: off; unchanged when not given).",
    ),
    click.option(
        "--replay-iat",
        help="Where the signing time is: a payload field (default iat; a.b for nested) or header:<name>.",
    ),
    click.option(
        "--replay-id",
        help="Where the request's unique id is: a payload field (default jti) or header:<name>.",
    ),
    click.option(
        "--sign-responses/--no-sign-responses",
        default=None,
        help="The gateway signs the upstream's JSON answers as compact JWS (unchanged when not given).",
    ),
]


@admin.group(help="API products.")
def product() -> None:
    pass


@product.command(
    "add",
    help="Create or update an API product."
    + examples(
        "twofold admin product add payments --name Payments --path /tsapi/v1/payments --upstream sandbox:payments",
        "twofold admin product add quotes --name Quotes --path /fx/v1/quotes --upstream http://10.0.0.5:8080 "
        "--signature none --content-type application/json",
        "twofold admin product add payments --name Payments --path /tsapi/v1/payments --upstream sandbox:payments "
        "--replay-window 300 --sign-responses",
        "twofold admin product add ob --name 'OB payments' --path /ob/v3/payments --upstream http://10.0.0.7:8080 "
        "--replay-window 120 --replay-iat header:http://openbanking.org.uk/iat "
        "--replay-id Data.Initiation.InstructionIdentification",
    ),
)
@click.argument("product_id")
@click.option("--name", required=True)
@click.option("--path", "path_prefix", required=True, help="Path prefix, e.g. /tsapi/v1/payments.")
@click.option("--upstream", required=True, help="http(s)://… or sandbox:payments|balance|echo.")
@click.option("--signature", type=click.Choice(SIGNATURE_POLICIES), default="required", show_default=True)
@click.option("--content-type", "content_types", multiple=True, help="Accepted content type (repeatable).")
@click.option(
    "--alg", "algorithms", multiple=True, help="Accepted JWS algorithm (repeatable; default RS256)."
)
@protection_options
@click.option("--json", "as_json", is_flag=True)
@db_options
def product_add(
    product_id: str,
    name: str,
    path_prefix: str,
    upstream: str,
    signature: str,
    content_types: tuple[str, ...],
    algorithms: tuple[str, ...],
    replay_window: int | None,
    replay_iat: str | None,
    replay_id: str | None,
    sign_responses: bool | None,
    as_json: bool,
    data: str | None,
    db: str | None,
) -> None:
    row = with_registry(
        data,
        db,
        lambda r: r.save_product(
            SYSTEM,
            product_id,
            name=name,
            path_prefix=path_prefix,
            upstream=upstream,
            signature=signature,
            content_types=list(content_types) or None,
            algorithms=list(algorithms) or None,
            replay_window=replay_window,
            replay_iat=replay_iat,
            replay_id=replay_id,
            sign_responses=sign_responses,
        ),
    )
    print_json(row) if as_json else err.print(f"saved API product {row['id']} at {row['path_prefix']}")


@product.command(
    "set",
    help="Change a product's replay protection and response signing only."
    + examples(
        "twofold admin product set payments --replay-window 300 --sign-responses",
        "twofold admin product set payments --replay-window 0 --no-sign-responses",
    ),
)
@click.argument("product_id")
@protection_options
@click.option("--json", "as_json", is_flag=True)
@db_options
def product_set(
    product_id: str,
    replay_window: int | None,
    replay_iat: str | None,
    replay_id: str | None,
    sign_responses: bool | None,
    as_json: bool,
    data: str | None,
    db: str | None,
) -> None:
    if replay_window is None and replay_iat is None and replay_id is None and sign_responses is None:
        raise UsageError(
            "say what to change: --replay-window, --replay-iat, --replay-id or --[no-]sign-responses"
        )
    row = with_registry(
        data,
        db,
        lambda r: r.set_product_protection(
            SYSTEM,
            product_id,
            replay_window=replay_window,
            replay_iat=replay_iat,
            replay_id=replay_id,
            sign_responses=sign_responses,
        ),
    )
    print_json(row) if as_json else err.print(f"saved API product {row['id']}: {_protection_text(row)}")


def _protection_text(row: dict[str, Any]) -> str:
    parts = []
    if row["replay_window"]:
        parts.append(f"replay ±{row['replay_window']}s ({row['replay_iat']}, {row['replay_id']})")
    if row["sign_responses"]:
        parts.append("signed responses")
    return "; ".join(parts) or "no replay protection, unsigned responses"


@product.command("list", help="List API products.")
@click.option("--json", "as_json", is_flag=True)
@db_options
def product_list(as_json: bool, data: str | None, db: str | None) -> None:
    rows = with_registry(data, db, lambda r: r.list_products())
    if as_json:
        print_json(rows)
        return
    table(
        ["PRODUCT", "PATH", "SIGNATURE", "UPSTREAM", "PROTECTION"],
        [
            [
                row["id"],
                row["path_prefix"],
                row["signature"],
                row["upstream"],
                _protection_text(row) if row["replay_window"] or row["sign_responses"] else "-",
            ]
            for row in rows
        ],
        empty="no API products",
    )


@admin.group(
    "signing-key",
    help="The provider's signing keys (expiry notices, gateway responses) that the portal's JWKS "
    "lists. Each portal and gateway node publishes its key when it starts.",
)
def signing_key() -> None:
    pass


@signing_key.command("list", help="List published signing keys.")
@click.option("--json", "as_json", is_flag=True)
@db_options
def signing_key_list(as_json: bool, data: str | None, db: str | None) -> None:
    rows = with_registry(data, db, lambda r: r.list_signing_keys(SYSTEM))
    if as_json:
        print_json(rows)
        return
    table(
        ["KID", "PURPOSE", "ALG", "STATE"],
        [
            [
                row["kid"],
                row["purpose"],
                row["alg"],
                f"retired {row['retired_at'][:10]}"
                if row["retired_at"]
                else f"seen {row['last_seen_at'][:16]}",
            ]
            for row in rows
        ],
        empty="no signing keys published yet (portal and gateways publish theirs when they start)",
    )


@signing_key.command(
    "retire",
    help="Take a key out of the JWKS (what it signed no longer verifies; a node still holding it "
    "refuses to start until it has a new key file).",
)
@click.argument("kid")
@db_options
def signing_key_retire(kid: str, data: str | None, db: str | None) -> None:
    with_registry(data, db, lambda r: r.retire_signing_key(SYSTEM, kid))
    err.print(f"retired signing key {kid}")


@admin.group(help="Environments.")
def env() -> None:
    pass


@env.command(
    "set",
    help="Create or update an environment. --issuing-ca-key/--issuing-ca-cert install the CA that "  # noqa: S608 - help text, not SQL
    "issues certificates from CSRs: its key is copied (0600) into the data directory of the portal "
    "that issues — run this where `twofold serve` runs, or name the files in its settings instead."
    + examples(
        "twofold admin env set prod --ca bank-issuing-ca.pem",
        "twofold admin env set prod --issuing-ca-key prod-ca.key --issuing-ca-cert prod-ca.crt --max-validity-days 397",
        "twofold admin env set uat --name 'User Acceptance' --self-signed --port 10443",
    ),
)
@click.argument("env_id")
@click.option("--name")
@click.option(
    "--self-signed/--no-self-signed",
    "allow_self_signed",
    default=None,
    help="Accept self-signed client certificates.",
)
@click.option("--ca", "ca_file", help="PEM file of the CA(s) that issue client certificates.")
@click.option("--port", type=click.IntRange(1, 65535), help="Gateway port of this environment.")
@click.option(
    "--issuing-ca-key", help="Private key of the CA that issues from CSRs (with --issuing-ca-cert)."
)
@click.option("--issuing-ca-cert", help="Certificate of that CA (PEM or DER).")
@click.option("--no-issuing-ca", is_flag=True, help="Stop issuing certificates in this environment.")
@click.option(
    "--max-validity-days", type=click.IntRange(1, 825), help="Longest validity issued (default 730)."
)
@passphrase_options("issuing-ca-", "the issuing CA's key")
@db_options
def env_set(
    env_id: str,
    name: str | None,
    allow_self_signed: bool | None,
    ca_file: str | None,
    port: int | None,
    issuing_ca_key: str | None,
    issuing_ca_cert: str | None,
    no_issuing_ca: bool,
    max_validity_days: int | None,
    issuing_ca_passphrase_file: str | None,
    issuing_ca_passphrase_env: str | None,
    data: str | None,
    db: str | None,
) -> None:
    ca_pem = None
    if ca_file:
        ca_bytes = read_file(ca_file, "the CA file")
        certs.load_certificates(ca_bytes, name=ca_file)  # says what the file is, if not certificates
        ca_pem = ca_bytes.decode("ascii", "replace")
    if bool(issuing_ca_key) != bool(issuing_ca_cert):
        raise UsageError("give both --issuing-ca-key and --issuing-ca-cert")
    if issuing_ca_key and no_issuing_ca:
        raise UsageError("--no-issuing-ca and --issuing-ca-key contradict each other")
    issuing_pem: str | None = "" if no_issuing_ca else None
    issuer = None
    if issuing_ca_key and issuing_ca_cert:
        issuer = load_for_install(
            issuing_ca_key,
            issuing_ca_cert,
            passphrase_source(issuing_ca_passphrase_file, issuing_ca_passphrase_env, issuing_ca_key),
        )
        issuing_pem = certs.certificate_pem(issuer.certificate).decode()
    installed = None

    async def work(registry: Registry) -> dict[str, Any]:
        nonlocal installed
        if issuer is not None:  # into the serve's data directory, once its registry is found there
            installed = IssuingCAs(Path(data or DEFAULT_DATA)).install(env_id, issuer)
        return await registry.save_environment(
            SYSTEM,
            env_id,
            name=name,
            allow_self_signed=allow_self_signed,
            ca_pem=ca_pem,
            gateway_port=port,
            issuing_ca_pem=issuing_pem,
            max_validity_days=max_validity_days,
        )

    row = with_registry(data, db, work)
    err.print(f"saved environment {row['id']} ({row['name']})")
    if installed is not None:
        err.print(
            f"  issuing CA {row['issuing_ca']}: key {installed.key} (0600), certificate {installed.cert}; "
            f"CSRs submitted for {row['id']} are issued for up to {row['max_validity_days']} days"
        )
    elif no_issuing_ca:
        err.print(f"  {row['id']} no longer issues certificates from CSRs")


@env.command("list", help="List environments.")
@click.option("--json", "as_json", is_flag=True)
@db_options
def env_list(as_json: bool, data: str | None, db: str | None) -> None:
    rows = with_registry(data, db, lambda r: r.list_environments())
    if as_json:
        print_json(rows)
        return
    table(
        ["ENVIRONMENT", "NAME", "PORT", "CERTIFICATES"],
        [
            [
                row["id"],
                row["name"],
                str(row["gateway_port"] or "-"),
                ("self-signed ok" if row["allow_self_signed"] else "CA-issued only")
                + (f", issues from CSRs ({row['issuing_ca']})" if row["issues_certificates"] else ""),
            ]
            for row in rows
        ],
        empty="no environments",
    )
