"""`twofold demo`: the whole flow against a running `twofold serve`, step by step."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
import pyotp

from twofold.cli._common import err, examples, make_directory, out, self_command
from twofold.cli._registry import open_existing
from twofold.client import AsyncClient, client_context
from twofold.crypto import certs, keys
from twofold.errors import TwofoldError, UsageError
from twofold.mail import Mailer, make_mailer
from twofold.portal.mails import send_link
from twofold.registry.auth import SYSTEM
from twofold.running import RunningServe, running_serves, serve_for

if TYPE_CHECKING:
    from twofold.settings import ServeConfig


@dataclass(frozen=True)
class Target:
    """The serve the demo talks to."""

    data: str | None
    db: str | None
    portal: str
    gateway: str  # the cat environment's gateway
    ca: Path


def _say(message: str) -> None:
    err.print(f"[cyan]twofold:[/] {message}")


def _step(number: int, title: str, command: str | None = None) -> None:
    out.print(f"\n[bold]{number}. {title}[/]")
    if command:
        out.print(f"$ {command}", style="dim", markup=False, highlight=False)


def _show(value: Any) -> None:
    out.print(json.dumps(value, indent=2)[:1500], markup=False, highlight=False)


def _from_running(serve: RunningServe, db: str | None) -> Target:
    if serve.db_has_password and not db:
        raise UsageError(
            f"the serve with its data in {serve.data} keeps its registry in a database whose URL holds a "
            "password: give it with --db or TWOFOLD_DB",
            code="registry_not_found",
        )
    if "cat" not in serve.gateways or serve.ca is None:
        raise UsageError(
            f"the serve with its data in {serve.data} runs no gateway for the cat environment, which the "
            "demo calls",
            code="environment_not_found",
        )
    return Target(str(serve.data), db or serve.db, serve.portal, serve.gateways["cat"], serve.ca)


def find_serve(config: ServeConfig, *, explicit: bool, db: str | None) -> Target | None:
    """The running serve: the one of the configured data directory (default ./data), else —
    unless a data directory or configuration was named — the only one running. None when
    none runs (the caller may start one)."""
    serve = serve_for(config.data)
    if serve is None and not explicit:
        serves = running_serves()
        if len(serves) > 1:
            places = "; ".join(f"--data {s.data} (portal {s.portal})" for s in serves[:5])
            raise UsageError(f"several twofold serves are running; say which: {places}", code="usage")
        serve = serves[0] if serves else None
        if serve is not None:
            _say(f"using the running serve with its data in {serve.data}")
    return _from_running(serve, db) if serve else None


def _data_option(target: Target) -> str:
    """``--data DIR`` for the hints, when the serve's data directory is not ./data."""
    if target.data is None or Path(target.data).resolve() == Path("data").resolve():
        return ""
    return f" --data {target.data}"


async def _portal_answers(portal: str, ca: Path) -> bool:
    try:
        async with httpx.AsyncClient(verify=client_context(verify=ca), timeout=3) as client:
            await client.get(f"{portal}/api/v1/openapi.json")
        return True
    except (httpx.HTTPError, OSError):
        return False


def _payment(e2e: str) -> dict[str, Any]:
    return {
        "payments": {
            "paymentIdentifiers": {"endToEndId": e2e},
            "value": {"amount": "125.50", "currency": "USD"},
            "debtor": {"account": "000123456789"},
            "creditor": {"account": "000987654321"},
        }
    }


async def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            raise TwofoldError(str(error["message"]), code=str(error["code"]))
        except (ValueError, KeyError, TypeError):
            raise TwofoldError(
                f"the portal answered HTTP {response.status_code}", code="portal_unexpected"
            ) from None
    return response.json()


def _html_value(html: str, pattern: str) -> str:
    match = re.search(pattern, html)
    if match is None:
        raise UsageError("the portal's page did not look as expected; is it the same twofold version?")
    return match.group(1)


async def _activate(target: Target, link_path: str, email: str) -> str:
    """What the invited person does in the browser, over the portal's pages: open the link,
    choose a password, set up the authenticator (the code computed from the key the page
    shows), and create an API token on the API tokens page. Returns the token."""
    password = secrets.token_urlsafe(16)
    trust = client_context(verify=target.ca)
    async with httpx.AsyncClient(base_url=target.portal, verify=trust, timeout=30) as browser:
        (await browser.get(link_path)).raise_for_status()
        chosen = await browser.post(link_path, data={"new_password": password, "confirm_password": password})
        if chosen.status_code != 303:
            raise TwofoldError(
                f"activating {email} failed: HTTP {chosen.status_code}", code="portal_unexpected"
            )
        enrol = await browser.get("/account/mfa")
        secret = _html_value(enrol.text, r'id="mfa-secret"[^>]*>([A-Z2-7]+)<')
        csrf = _html_value(enrol.text, r'name="csrf_token" value="([^"]+)"')
        codes = await browser.post(
            "/account/mfa", data={"csrf_token": csrf, "code": pyotp.TOTP(secret).now()}
        )
        if codes.status_code != 201:
            raise TwofoldError(
                f"setting up the second factor failed: HTTP {codes.status_code}", code="portal_unexpected"
            )
        out.print(
            f"password chosen, authenticator set up (key {secret[:4]}…), 10 recovery codes shown once",
            markup=False,
        )
        page = await browser.post("/tokens", data={"csrf_token": csrf, "name": "demo"})
        return _html_value(page.text, r'id="new-token"[^>]*>([^<]+)<')


async def demo_flow(target: Target, work: Path, *, keep: bool, mailer: Mailer) -> None:
    tf = self_command()
    ca = target.ca
    org = f"demo-{secrets.token_hex(3)}"
    email = f"security@{org}.example"
    registry = await open_existing(target.data, target.db, migrate=False)
    try:
        _step(
            1,
            f"The operator creates the organisation {org} and invites its API Security user",
            f"{tf} admin org add {org} && {tf} admin user invite --org {org} --email {email} "
            "--role api_security --role developer",
        )
        await registry.add_org(SYSTEM, org, f"Demo {org}")
        link = await registry.invite(SYSTEM, email, org=org, roles=["api_security", "developer"])
        where = await send_link(mailer, target.portal, link)
        out.print(f"invitation for {email}: {where}", markup=False)
    finally:
        await registry.close()
    _step(
        2,
        "The invited user opens the link: chooses a password, sets up the authenticator app, creates "
        "an API token",
        f"open the link from the mail ({target.portal}/account/link/…) in a browser",
    )
    token = await _activate(target, link.path, email)
    out.print(f"signed in as {email}; API token {token[:10]}…", markup=False)

    _step(3, "Generate mTLS and Digital Signature credentials", f"{tf} init --cn {org}-cat --out {work}")
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
        out.print(f"{work / name}.crt  CN={cn}  SHA-256 {certs.fingerprint_sha256(cert)}", markup=False)

    headers = {"Authorization": f"Bearer {token}"}
    portal_env = f"TWOFOLD_PORTAL={target.portal} TWOFOLD_CACERT={ca} TWOFOLD_TOKEN=…"
    trust = client_context(verify=ca)
    async with httpx.AsyncClient(base_url=target.portal, verify=trust, headers=headers, timeout=30) as api:
        _step(
            4,
            "Register both certificates through the portal API",
            f"{portal_env} {tf} portal cert add --env cat --use mtls {work}/mtls.crt   (and --use signature "
            f"{work}/sign.crt)",
        )
        fingerprints = []
        for use, (_key, cert) in material.items():
            row = await _check(
                await api.post(
                    "/api/v1/certificates",
                    json={
                        "environment": "cat",
                        "use": use,
                        "certificate": certs.certificate_pem(cert).decode(),
                    },
                )
            )
            fingerprints.append(row["fingerprint"])
            out.print(
                f"registered {row['use_label']}: {row['common_name']} ({row['fingerprint'][:16]}…)",
                markup=False,
            )
        _step(
            5,
            "Create a project with the balance and payments API products in Client Testing",
            f"{tf} portal project add 'Treasury integration' && {tf} portal project product add "
            "'Treasury integration' --env cat balance payments",
        )
        project = await _check(await api.post("/api/v1/projects", json={"name": "Treasury integration"}))
        for product in ("balance", "payments"):
            await _check(await api.put(f"/api/v1/projects/{project['id']}/products/cat/{product}"))
        out.print(f"project {project['name']!r}: balance, payments (cat)", markup=False)

        await asyncio.sleep(0.6)  # registry changes reach the gateway within a second
        await _calls(target, work, material, tf)
        await asyncio.sleep(1.5)  # the gateway stores its calls about once a second
        _step(
            9,
            "The dashboard: the onboarding checklist and the recent gateway calls",
            f"open {target.portal}/dashboard",
        )
        board = await _check(await api.get("/api/v1/dashboard", params={"env": "cat"}))
        for item in board["checklist"]:
            out.print(f"  {'✓' if item['done'] else '○'} {item['label']}", markup=False)
        for call in board["calls"][:5]:
            out.print(
                f"  {call['at'][11:19]} {call['method']:<5} {call['path']:<32} {call['status']} {call['outcome']}",
                markup=False,
            )
        if keep:
            out.print(
                f"\n[bold green]Demo complete.[/] Credentials are in {work}. Left in the registry: the "
                f"organisation {org} with the user {email}, 2 certificates in cat and the project "
                f"'Treasury integration'. Delete them with `{tf} admin org rm {org}{_data_option(target)} "
                "--remove-certificates`, "
                f"or run `{tf} demo --cleanup`, which deletes what it creates."
            )
            return
        for fingerprint in fingerprints:
            await _check(await api.delete(f"/api/v1/certificates/{fingerprint}", params={"env": "cat"}))
    registry = await open_existing(target.data, target.db, migrate=False)
    try:
        await registry.delete_org(SYSTEM, org)
    finally:
        await registry.close()
    out.print(
        f"\n[bold green]Demo complete.[/] Cleaned up: removed its 2 certificates and deleted the organisation "
        f"{org} with its user and project (the audit log keeps the story). Credentials are in {work}."
    )


async def _calls(target: Target, work: Path, material: dict[str, Any], tf: str) -> None:
    gateway, ca = target.gateway, target.ca
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
    payment = work / "payment.json"
    payment.write_text(json.dumps(_payment(e2e), indent=2) + "\n")
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
            f"{tf} call {gateway}/tsapi/v1/payments -d @{payment} --cert {work}/mtls.crt --key "
            f"{work}/mtls.key --sign-key {work}/sign.key --sign-cert {work}/sign.crt --cacert {ca}",
        )
        response = await signed.post("/tsapi/v1/payments", content=payment.read_bytes())
        out.print(f"HTTP {response.status_code}")
        _show(response.json())
        _step(
            8,
            "Query the payment's status",
            f"{tf} call '{gateway}/tsapi/v1/payments/status?endToEndId={e2e}' --cert {work}/mtls.crt "
            f"--key {work}/mtls.key --cacert {ca}",
        )
        response = await signed.get("/tsapi/v1/payments/status", params={"endToEndId": e2e})
        out.print(f"HTTP {response.status_code}")
        _show(response.json())


@click.command(
    "demo",
    help="Walk the whole flow against a running `twofold serve`: create an organisation and invite its "
    "API Security user (the mail goes where the serve's mail goes), activate the account through the "
    "link as the person would (password, authenticator app, API token), generate credentials, register them through the portal API, add API products to "
    "a project, call the balance API, initiate a signed payment, query its status and show the "
    "dashboard. It finds the "
    "serve by itself (the one of ./data, else the only one running); --data names another, --start "
    "runs one just for the demo."
    + examples("twofold demo", "twofold demo --cleanup", "twofold demo --data /var/lib/twofold"),
)
@click.option("--data", envvar="TWOFOLD_DATA", help="Data directory of the serve to use. Env: TWOFOLD_DATA.")
@click.option("--db", envvar="TWOFOLD_DB", help="Its registry database URL, if not SQLite in --data.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="The serve's TOML settings, for --start (ports, data).",
)
@click.option(
    "--start", is_flag=True, help="When no serve is running, start one for the demo and stop it after."
)
@click.option(
    "--out", "out_dir", help="Where to write the demo credentials (default: a temporary directory)."
)
@click.option(
    "--keep/--cleanup",
    default=True,
    show_default=True,
    help="Keep what the demo creates in the registry (and say what), or delete it at the end.",
)
def demo(
    data: str | None, db: str | None, config_file: str | None, start: bool, out_dir: str | None, keep: bool
) -> None:
    from twofold.serve import run  # the servers' modules, only when a demo runs
    from twofold.settings import ServeConfig

    config = ServeConfig.load(config_file, data=data, db=db, access_log=False)
    target = find_serve(config, explicit=data is not None or config_file is not None, db=db)
    work = Path(out_dir or tempfile.mkdtemp(prefix="twofold-demo-"))
    make_directory(work)
    # The invitation goes where the serve's mail goes: its SMTP settings, else its outbox.
    outbox_data = Path(target.data) if target is not None and target.data else config.data
    mailer = make_mailer(config.mail_settings(), outbox_data)

    async def main() -> None:
        if target is not None:
            if not await _portal_answers(target.portal, target.ca):
                raise TwofoldError(
                    f"the serve with its data in {target.data} announced the portal {target.portal}, "
                    "which does not answer; is it still starting?",
                    code="connect_refused",
                )
            _say(f"using the running portal at {target.portal}")
            await demo_flow(target, work, keep=keep, mailer=mailer)
            return
        if not start:
            named = f" with the data directory {config.data.resolve()}" if data or config_file else ""
            raise UsageError(
                f"no running twofold serve found{named}. Start one in another terminal — "
                f"`{self_command()} serve`{' --data ' + str(config.data) if named else ''} or `make run` — and "
                "run the demo again, or pass --start to run one just for the demo",
                code="serve_not_running",
            )
        _say(f"no serve is running; starting `twofold serve` with its data in {config.data} for the demo")
        stop = asyncio.Event()
        facts: dict[str, Any] = {}
        started = asyncio.Event()

        def ready(found: dict[str, Any]) -> None:
            facts.update(found)
            started.set()

        server = asyncio.create_task(run(config, _say, ready=ready, stop=stop, register=True))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            waiter.cancel()
            server.result()
            return
        try:
            if "cat" not in facts["gateways"]:
                raise UsageError("the serve runs no gateway for the cat environment, which the demo calls")
            own = Target(str(config.data), db, facts["portal"], facts["gateways"]["cat"], Path(facts["ca"]))
            await demo_flow(own, work, keep=keep, mailer=mailer)
        finally:
            stop.set()
            await server

    asyncio.run(main())
