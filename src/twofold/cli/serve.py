"""`twofold serve` (portal + gateways + sandbox) and `twofold demo` (the seed flow)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import click
import httpx
import pyotp

from twofold.cli._common import err, examples, out
from twofold.client import AsyncClient
from twofold.crypto import certs, keys
from twofold.errors import UsageError
from twofold.mail import make_mailer
from twofold.portal.mails import send_link
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry
from twofold.serve import ServeConfig, run, serve


def _announce(message: str) -> None:
    err.print(f"[cyan]twofold:[/] {message}")


@click.command(
    "serve",
    help="Run the portal, one gateway per environment and the sandbox API in one process. "
    "The first start creates the data directory, a local CA and a server certificate for localhost, "
    "the environments cat (8443) and prod (9443), the sandbox products and an operator account whose "
    "one-time password is printed."
    + examples(
        "twofold serve",
        "twofold serve --data /var/lib/twofold --workers 2",
        "twofold serve --db postgresql://twofold@db.internal/twofold --host 0.0.0.0",
        "twofold serve --config twofold.toml",
    ),
)
@click.option("--data", help="Data directory (database, CA, server certificate). Default ./data.")
@click.option("--db", envvar="TWOFOLD_DB", help="Database URL (default: SQLite in the data directory).")
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with these settings."
)
@click.option("--host", help="Address the portal and gateways listen on (default 127.0.0.1).")
@click.option("--portal-port", type=click.IntRange(1, 65535), help="Portal port (default 8000).")
@click.option(
    "--admin-port", type=click.IntRange(1, 65535), help="Health/metrics port on loopback (default 9100)."
)
@click.option(
    "--workers", type=click.IntRange(1, 64), help="Gateway processes sharing the ports (default 1)."
)
@click.option("--no-access-log", is_flag=True, help="Do not print one JSON line per gateway request.")
def serve_command(
    data: str | None,
    db: str | None,
    config_file: str | None,
    host: str | None,
    portal_port: int | None,
    admin_port: int | None,
    workers: int | None,
    no_access_log: bool,
) -> None:
    config = ServeConfig.load(
        config_file,
        data=data,
        db=db,
        host=host,
        portal_port=portal_port,
        admin_port=admin_port,
        workers=workers,
        access_log=False if no_access_log else None,
    )

    def ready(facts: dict[str, Any]) -> None:
        err.print()
        err.print(
            f"[bold green]twofold is running[/] (database {facts['db']}, {facts['workers']} gateway process(es))"
        )
        err.print(f"  portal    {facts['portal']}")
        for env, url in facts["gateways"].items():
            err.print(f"  gateway   {url}  ({env})")
        err.print(f"  admin     {facts['admin']}/metrics  /healthz  /readyz")
        if facts["worker_admin_ports"]:
            ports = ", ".join(str(p) for p in facts["worker_admin_ports"])
            err.print(f"            (each extra gateway process has its own: ports {ports})")
        err.print(f"  CA        {facts['ca']}   (clients: --cacert {facts['ca']})")
        err.print("  next      in another terminal: twofold demo    — Ctrl-C stops")

    serve(config, _announce, ready)


# --- demo --------------------------------------------------------------------------------------


def _step(number: int, title: str, command: str | None = None) -> None:
    out.print(f"\n[bold]{number}. {title}[/]")
    if command:
        out.print(f"[dim]$ {command}[/]")


def _show(value: Any) -> None:
    out.print(json.dumps(value, indent=2)[:1500])


async def _portal_up(url: str, cacert: Path) -> bool:
    verify: str | bool = str(cacert) if cacert.exists() else False  # noqa: ASYNC240 - one stat, at start
    try:
        async with httpx.AsyncClient(verify=verify, timeout=2) as client:
            await client.get(f"{url}/api/v1/openapi.json")
        return True
    except httpx.HTTPError:
        return False


def _html_value(html: str, pattern: str) -> str:
    match = re.search(pattern, html)
    if match is None:
        raise UsageError("the portal's page did not look as expected; is it the same twofold version?")
    return match.group(1)


async def _activate(portal: str, ca: Path, link_path: str, email: str) -> str:
    """What the invited person does in the browser, over the portal's pages: open the link,
    choose a password, set up the authenticator (the code computed from the shown key), and
    create an API token on the API tokens page. Returns the token."""
    password = secrets.token_urlsafe(16)
    async with httpx.AsyncClient(base_url=portal, verify=str(ca), timeout=30) as browser:
        (await browser.get(link_path)).raise_for_status()
        chosen = await browser.post(link_path, data={"new_password": password, "confirm_password": password})
        if chosen.status_code != 303:
            raise UsageError(f"activating {email} failed: HTTP {chosen.status_code}")
        enrol = await browser.get("/account/mfa")
        secret = _html_value(enrol.text, r'id="mfa-secret"[^>]*>([A-Z2-7]+)<')
        csrf = _html_value(enrol.text, r'name="csrf_token" value="([^"]+)"')
        codes = await browser.post(
            "/account/mfa", data={"csrf_token": csrf, "code": pyotp.TOTP(secret).now()}
        )
        if codes.status_code != 201:
            raise UsageError(f"setting up the second factor failed: HTTP {codes.status_code}")
        out.print(f"password chosen, authenticator set up (key {secret[:4]}…), 10 recovery codes shown once")
        page = await browser.post("/tokens", data={"csrf_token": csrf, "name": "demo"})
        return _html_value(page.text, r'id="new-token"[^>]*>([^<]+)<')


async def demo_flow(config: ServeConfig, portal: str, work: Path) -> None:
    ca = config.data / "ca" / "ca.crt"
    mailer = make_mailer(config.mail_settings(), config.data)
    registry = await Registry.open(config.db_url, migrate=False)
    try:
        envs = {e["id"]: e for e in await registry.list_environments()}
        gateway = f"https://localhost:{config.ports.get('cat', envs['cat']['gateway_port'])}"
        org = f"demo-{secrets.token_hex(3)}"
        email = f"security@{org}.example"
        _step(
            1,
            f"The operator creates the organisation {org} and invites its API Security user",
            f"twofold admin org add {org} && twofold admin user invite --org {org} --email {email} "
            "--role api_security --role developer",
        )
        await registry.add_org(SYSTEM, org, f"Demo {org}")
        link = await registry.invite(
            SYSTEM, email, org=org, roles=["api_security", "developer"], lifetime=config.link_lifetime
        )
        where = await send_link(mailer, config.public_url, link)
        out.print(f"invitation for {email}: {where}")
    finally:
        await registry.close()
    _step(
        2,
        "The invited user opens the link: chooses a password, sets up the authenticator app, "
        "creates an API token",
        f"open the link from the mail ({portal}/account/link/…) in a browser",
    )
    token = await _activate(portal, ca, link.path, email)
    out.print(f"signed in as {email}; API token {token[:10]}…")

    _step(3, "Generate mTLS and Digital Signature credentials", f"twofold init --cn {org}-cat --out {work}")
    material: dict[str, Any] = {}
    for use, cn in (("mtls", f"{org}-cat"), ("signature", f"{org}-cat-sign")):
        key = keys.generate_private_key()
        cert = certs.self_signed_certificate(
            key, f"/O={org}/CN={cn}", usage="client" if use == "mtls" else "signature"
        )
        name = "mtls" if use == "mtls" else "sign"
        (work / f"{name}.key").write_bytes(keys.private_key_bytes(key))
        (work / f"{name}.key").chmod(0o600)
        (work / f"{name}.crt").write_bytes(certs.certificate_pem(cert))
        material[use] = (key, cert)
        out.print(f"{name}.crt  CN={cn}  SHA-256 {certs.fingerprint_sha256(cert)}")

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=portal, verify=str(ca), headers=headers, timeout=30) as api:
        _step(
            4,
            "Register both certificates through the portal API",
            f"twofold portal cert add --env cat --use mtls {work}/mtls.crt  (and --use signature)",
        )
        for use, (_key, cert) in material.items():
            response = await api.post(
                "/api/v1/certificates",
                json={"environment": "cat", "use": use, "certificate": certs.certificate_pem(cert).decode()},
            )
            response.raise_for_status()
            row = response.json()
            out.print(f"registered {row['use_label']}: {row['common_name']} ({row['fingerprint'][:16]}…)")
        _step(5, "Create a project with the balance and payments API products in Client Testing")
        project = (await api.post("/api/v1/projects", json={"name": "Treasury integration"})).json()
        for product in ("balance", "payments"):
            (await api.put(f"/api/v1/projects/{project['id']}/products/cat/{product}")).raise_for_status()
        out.print(f"project {project['name']!r}: balance, payments (cat)")

    await asyncio.sleep(0.6)  # registry changes reach the gateway within a second
    mtls_key, mtls_cert = material["mtls"]
    sign_key, sign_cert = material["signature"]
    async with AsyncClient(gateway, cert=mtls_cert, key=mtls_key, verify=str(ca), timeout=30) as plain:
        _step(
            6,
            "Call the balance API over mTLS, without a signature",
            f"curl --cert {work}/mtls.crt --key {work}/mtls.key --cacert {ca} {gateway}/accessapi/balance",
        )
        response = await plain.get("/accessapi/balance")
        out.print(f"HTTP {response.status_code}")
        _show(response.json())
    e2e = f"E2E-{secrets.token_hex(4).upper()}"
    payment = {
        "payments": {
            "paymentIdentifiers": {"endToEndId": e2e},
            "value": {"amount": "125.50", "currency": "USD"},
            "debtor": {"account": "000123456789"},
            "creditor": {"account": "000987654321"},
        }
    }
    async with AsyncClient(
        gateway,
        cert=mtls_cert,
        key=mtls_key,
        signing_key=sign_key,
        signing_cert=sign_cert,
        verify=str(ca),
        timeout=30,
    ) as signed:
        _step(
            7,
            "Initiate a payment with a signed body (JWS RS256, application/jose)",
            f"twofold call {gateway}/tsapi/v1/payments -d @payment.json --cert {work}/mtls.crt --key "
            f"{work}/mtls.key --sign-key {work}/sign.key --cacert {ca}",
        )
        response = await signed.post("/tsapi/v1/payments", json=payment)
        out.print(f"HTTP {response.status_code}")
        _show(response.json())
        _step(
            8,
            "Query the payment's status",
            f"twofold call '{gateway}/tsapi/v1/payments/status?endToEndId={e2e}' …",
        )
        response = await signed.get("/tsapi/v1/payments/status", params={"endToEndId": e2e})
        out.print(f"HTTP {response.status_code}")
        _show(response.json())
    await asyncio.sleep(1.5)  # the gateway stores its calls about once a second
    async with httpx.AsyncClient(base_url=portal, verify=str(ca), headers=headers, timeout=30) as api:
        _step(
            9,
            "The dashboard: the onboarding checklist and the recent gateway calls",
            f"open {portal}/dashboard",
        )
        board = (await api.get("/api/v1/dashboard", params={"env": "cat"})).json()
        for item in board["checklist"]:
            out.print(f"  {'✓' if item['done'] else '○'} {item['label']}")
        for call in board["calls"][:5]:
            out.print(
                f"  {call['at'][11:19]} {call['method']:<5} {call['path']:<32} {call['status']} {call['outcome']}"
            )
    out.print(
        f"\n[bold green]Demo complete.[/] Credentials are in {work}; the organisation {org} stays in the registry."
    )


@click.command(
    "demo",
    help="Walk the seed flow against a running `twofold serve` (or start one for the walk): "
    "create an organisation and invite its API Security user (the mail goes where the serve's mail "
    "goes), activate the account through the link as the person would (password, authenticator "
    "app, API token), generate credentials, register them through the portal API, call the balance "
    "API, initiate a signed payment, query its status, and show the dashboard."
    + examples("twofold demo", "twofold demo --data /var/lib/twofold"),
)
@click.option("--data", default="data", show_default=True, help="Data directory of the serve to use.")
@click.option("--db", envvar="TWOFOLD_DB", help="Database URL, if not SQLite in --data.")
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="The serve's TOML settings (ports)."
)
@click.option(
    "--out", "out_dir", help="Where to write the demo credentials (default: a temporary directory)."
)
def demo(data: str, db: str | None, config_file: str | None, out_dir: str | None) -> None:
    config = ServeConfig.load(config_file, data=data, db=db, access_log=False)
    work = Path(out_dir or tempfile.mkdtemp(prefix="twofold-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    portal = f"https://localhost:{config.portal_port}"

    async def main() -> None:
        if await _portal_up(portal, config.data / "ca" / "ca.crt"):
            err.print(f"[cyan]twofold:[/] using the running portal at {portal}")
            await demo_flow(config, portal, work)
            return
        err.print("[cyan]twofold:[/] no portal is running; starting `twofold serve` for the demo")
        stop = asyncio.Event()
        started = asyncio.Event()
        server = asyncio.create_task(run(config, _announce, ready=lambda _f: started.set(), stop=stop))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()
        try:
            await demo_flow(config, portal, work)
        finally:
            stop.set()
            await server

    asyncio.run(main())
