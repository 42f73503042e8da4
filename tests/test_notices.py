"""Expiry notices at 30, 15, 7 and 1 days, once per threshold and certificate even with
several notifiers (in one process and in separate OS processes) on SQLite and PostgreSQL; mail
through a real SMTP server (aiosmtpd) and the outbox; a signed webhook verified by PyJWT with
the JWKS the portal serves; the portal's banner. Time moves by the notifier's clock — nothing
sleeps until a threshold."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest
from aiohttp import web

from clientkit import free_port
from mailkit import SMTPServer, body, outbox
from registry_helpers import Org, add_person, make_cert, make_org
from twofold.lifecycle import JWKS_PATH, ExpiryNotifier, NoticeSigner
from twofold.mail import MailSettings, OutboxMailer, SMTPMailer
from twofold.portal.app import init_app
from twofold.portal.web import PortalConfig
from twofold.registry.auth import SYSTEM
from twofold.registry.notices import threshold_for
from twofold.registry.service import Registry

WORKER = Path(__file__).with_name("notice_worker.py")
DAY = dt.timedelta(days=1)


@dataclass
class Clock:
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def __call__(self) -> dt.datetime:
        return self.now

    def at_days_left(self, not_after: dt.datetime, days: float) -> None:
        """Move to ``days`` before ``not_after`` (just inside that threshold)."""
        self.now = not_after - dt.timedelta(days=days) + dt.timedelta(seconds=1)


@dataclass
class Setup:
    registry: Registry
    acme: Org
    fingerprint: str
    not_after: dt.datetime
    clock: Clock
    box: Path


@pytest.fixture
async def setup(registry: Registry, tmp_path: Path) -> Setup:
    acme = await make_org(registry, "acme")  # security@acme.example (API Security) and a Developer
    await add_person(registry, "second@acme.example", org=acme, roles="api_security,developer")
    await add_person(registry, "gone@acme.example", org=acme, roles="api_security")
    await registry.set_active(SYSTEM, "gone@acme.example", active=False)
    row = await registry.add_certificate(
        acme.security, "cat", "mtls", make_cert("acme-expiring", days=40).pem
    )
    not_after = dt.datetime.fromisoformat(row["not_after"])
    return Setup(registry, acme, row["fingerprint"], not_after, Clock(), tmp_path / "outbox")


def notifier(setup: Setup, **kwargs: object) -> ExpiryNotifier:
    options: dict[str, object] = {
        "mailer": OutboxMailer(setup.box),
        "signer": None,
        "portal_url": "https://portal.test",
        "clock": setup.clock,
    }
    options.update(kwargs)
    return ExpiryNotifier(setup.registry, **options)  # type: ignore[arg-type]


def test_the_most_urgent_threshold_reached_is_the_one_due() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert threshold_for(now + 31 * DAY, now) is None
    assert threshold_for(now + 30 * DAY, now) == 30
    assert threshold_for(now + 9 * DAY, now) == 15
    assert threshold_for(now + 7 * DAY, now) == 7
    assert threshold_for(now + dt.timedelta(hours=3), now) == 1
    assert threshold_for(now, now) is None  # expired: no more notices


async def test_each_threshold_sends_one_mail_to_the_api_security_users(setup: Setup) -> None:
    notify = notifier(setup)
    assert await notify.run_once() == []  # 40 days left
    subjects = []
    for days in (30, 15, 7, 1):
        setup.clock.at_days_left(setup.not_after, days)
        sent = await notify.run_once()
        assert [s.notice.threshold_days for s in sent] == [days]
        assert await notify.run_once() == []  # once per threshold, however often it runs
        setup.clock.now += dt.timedelta(hours=6)
        assert await notify.run_once() == []
        subjects.append(outbox(setup.box)[-1]["Subject"])
    setup.clock.now = setup.not_after + dt.timedelta(seconds=1)
    assert await notify.run_once() == []  # expired
    messages = outbox(setup.box)
    assert len(messages) == 4
    for message in messages:
        assert (
            message["To"] == "second@acme.example, security@acme.example"
        )  # not the Developer, not the deactivated
    assert subjects[0] == "Certificate acme-expiring (MTLS, Client Testing) expires in 30 days"
    assert subjects[-1] == "Certificate acme-expiring (MTLS, Client Testing) expires in 1 day"
    text = body(messages[2])
    assert setup.fingerprint in text
    assert "twofold rotate --env cat --use mtls" in text
    assert "https://portal.test/security?env=cat" in text
    rows = await setup.registry.notices_of(setup.fingerprint)
    assert [(r["threshold_days"], r["status"], r["attempts"]) for r in rows] == [
        (30, "sent", 1),
        (15, "sent", 1),
        (7, "sent", 1),
        (1, "sent", 1),
    ]
    audited = [
        e
        for e in await setup.registry.audit_entries(SYSTEM, limit=20)
        if e["action"] == "certificate.expiry_notice"
    ]
    assert sorted(e["details"]["threshold_days"] for e in audited) == [1, 7, 15, 30]


async def test_a_certificate_registered_late_gets_only_the_notices_still_ahead(
    registry: Registry, tmp_path: Path
) -> None:
    acme = await make_org(registry, "acme")
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-late", days=9).pem)
    clock = Clock()
    notify = ExpiryNotifier(
        registry, mailer=OutboxMailer(tmp_path), signer=None, portal_url="https://p", clock=clock
    )
    assert [s.notice.threshold_days for s in await notify.run_once()] == [15]  # not 30 as well
    assert "expires in 9 days" in outbox(tmp_path)[0]["Subject"]
    clock.now += 6 * DAY  # 3 days left: the 7-day notice, once
    assert [s.notice.threshold_days for s in await notify.run_once()] == [7]
    clock.now += 2 * DAY + dt.timedelta(hours=1)
    assert [s.notice.threshold_days for s in await notify.run_once()] == [1]
    assert len(outbox(tmp_path)) == 3


async def test_several_notifiers_send_each_notice_once(setup: Setup, tmp_path: Path) -> None:
    """Three notifiers, each with a Registry (engine, connections) of its own on the same
    database, run at the same moment: the claims in the database let one of them send."""
    setup.clock.at_days_left(setup.not_after, 15)
    others = [await Registry.open(setup.registry.url, migrate=False) for _ in range(2)]
    try:
        notifiers = [notifier(setup)] + [
            ExpiryNotifier(
                r, mailer=OutboxMailer(setup.box), signer=None, portal_url="https://p", clock=setup.clock
            )
            for r in others
        ]
        for _round in range(3):
            results = await asyncio.gather(*(n.run_once() for n in notifiers))
            assert sum(len(r) for r in results) == (1 if _round == 0 else 0)
    finally:
        for other in others:
            await other.close()
    assert len(outbox(setup.box)) == 1


async def test_notifier_processes_send_each_notice_once(setup: Setup, tmp_path: Path) -> None:
    """The same race between separate OS processes, released together."""
    globex = await make_org(setup.registry, "globex")
    await setup.registry.add_certificate(
        globex.security, "cat", "mtls", make_cert("globex-expiring", days=45).pem
    )
    setup.clock.at_days_left(setup.not_after, 15)  # acme: the 15-day notice; globex (20 days left): 30
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                setup.registry.url,
                setup.clock.now.isoformat(),
                str(setup.box),
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready", (
                process.stderr.read() if process.stderr else ""
            )
        go.touch()
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
    counts = []
    for (stdout, stderr), process in zip(outputs, processes, strict=True):
        assert process.returncode == 0, stderr
        counts.append(int(stdout.strip().rsplit(" ", 1)[1]))
    assert sum(counts) == 2, counts
    assert sorted(m["Subject"].split()[1] for m in outbox(setup.box)) == ["acme-expiring", "globex-expiring"]


async def test_a_failed_mail_is_retried_after_the_lease_and_then_sent_once(
    setup: Setup, tmp_path: Path
) -> None:
    setup.clock.at_days_left(setup.not_after, 7)
    down = SMTPMailer(MailSettings(smtp=f"127.0.0.1:{free_port()}", security="none", timeout=2))
    assert await notifier(setup, mailer=down).run_once() == []
    (row,) = await setup.registry.notices_of(setup.fingerprint)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "cannot reach the SMTP server" in row["detail"]
    with SMTPServer(tmp_path) as smtp:
        mailer = SMTPMailer(MailSettings(smtp=smtp.address, security="none"))
        assert await notifier(setup, mailer=mailer).run_once() == []  # within the lease: not yet
        setup.clock.now += dt.timedelta(minutes=11)
        sent = await notifier(setup, mailer=mailer).run_once()
        assert [s.notice.threshold_days for s in sent] == [7]
        (message,) = smtp.wait_for(1)
        assert smtp.envelopes[0][1] == ["second@acme.example", "security@acme.example"]
        assert "expires in 7 days" in message["Subject"]
        setup.clock.now += dt.timedelta(hours=1)
        assert await notifier(setup, mailer=mailer).run_once() == []
    (row,) = await setup.registry.notices_of(setup.fingerprint)
    assert (row["status"], row["attempts"]) == ("sent", 2)


# --- the signed webhook, verified with the portal's JWKS ----------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[str, bytes]], list[int]]]:
    """An HTTP endpoint that records each POST (content type, body); ``status`` sets its answer."""
    seen: list[tuple[str, bytes]] = []
    status = [204]

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Content-Type", ""), await request.read()))
        return web.Response(status=status[0])

    app = web.Application()
    app.router.add_post("/hooks/twofold", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hooks/twofold?secret=s3cr3t", seen, status
    finally:
        await runner.cleanup()


async def test_a_signed_webhook_verifies_with_the_jwks_the_portal_serves(
    setup: Setup, receiver: tuple[str, list[tuple[str, bytes]], list[int]], tmp_path: Path
) -> None:
    url, seen, status = receiver
    signer = NoticeSigner.load_or_create(tmp_path / "portal" / "notice-signing.key")
    assert (tmp_path / "portal" / "notice-signing.key").stat().st_mode & 0o777 == 0o600
    await setup.registry.set_notice_webhook(SYSTEM, "acme", url)
    setup.clock.at_days_left(setup.not_after, 30)
    status[0] = 500  # the receiver is down at first: retried after the lease
    sent = await notifier(setup, signer=signer).run_once()
    assert [s.notice.channel for s in sent] == ["mail"]
    assert len(seen) == 1
    status[0] = 204
    setup.clock.now += dt.timedelta(minutes=11)
    sent = await notifier(setup, signer=signer).run_once()
    assert [(s.notice.channel, s.detail) for s in sent] == [("webhook", "webhook 127.0.0.1 (HTTP 204)")]
    assert len(seen) == 2
    content_type, token = seen[-1]
    assert content_type == "application/jose"

    # The portal serves the JWKS; PyJWT verifies the notice with it, as a receiver would.
    portal = web.AppRunner(init_app(setup.registry, PortalConfig(notice_jwks=signer.jwks())), access_log=None)
    await portal.setup()
    port = free_port()
    await web.TCPSite(portal, "127.0.0.1", port).start()
    try:
        async with httpx.AsyncClient() as client:
            jwks = (await client.get(f"http://127.0.0.1:{port}{JWKS_PATH}")).json()
    finally:
        await portal.cleanup()
    assert set(jwks["keys"][0]) == {"kty", "n", "e", "kid", "use", "alg"}  # public parts only (no "d")
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token.decode())["kid"]]
    # "iat" is the notifier's clock, moved 10 days ahead: PyJWT would call it not yet valid.
    claims = jwt.decode(token, key.key, algorithms=["RS256"], options={"verify_iat": False})
    assert claims["iat"] == int(setup.clock.now.timestamp())
    assert claims["type"] == "certificate.expiring"
    assert claims["organisation"] == "acme"
    assert claims["fingerprint"] == setup.fingerprint
    assert claims["threshold_days"] == 30
    assert claims["iss"] == "https://portal.test"
    header, _payload, signature = token.split(b".")
    forged = jwt.utils.base64url_encode(json.dumps({**claims, "threshold_days": 1}).encode())
    tampered = b".".join([header, forged, signature])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered, key.key, algorithms=["RS256"], options={"verify_iat": False})
    # Sent once: later runs and other thresholds' runs do not repeat it.
    assert await notifier(setup, signer=signer).run_once() == []
    assert len(seen) == 2
    rows = await setup.registry.notices_of(setup.fingerprint)
    assert [(r["channel"], r["status"]) for r in rows] == [("mail", "sent"), ("webhook", "sent")]
    assert all("s3cr3t" not in (r["detail"] or "") for r in rows)


async def test_only_operators_set_webhooks_and_only_to_http_urls(setup: Setup) -> None:
    from twofold.registry.rules import Forbidden, RegistryError

    with pytest.raises(Forbidden):
        await setup.registry.set_notice_webhook(setup.acme.security, "acme", "https://ops.acme.example/hook")
    for bad in ("ftp://ops.acme.example/x", "https://user:pw@ops.acme.example/x", "not a url"):
        with pytest.raises(RegistryError) as refused:
            await setup.registry.set_notice_webhook(SYSTEM, "acme", bad)
        assert refused.value.code == "webhook_invalid"
    assert (await setup.registry.set_notice_webhook(SYSTEM, "acme", None))["notice_webhook"] is None


# --- what the portal and the metric show ----------------------------------------------------------------


async def test_expiry_facts_and_the_banner_list(setup: Setup) -> None:
    sign = make_cert("acme-sign", days=300, usage="signature")
    await setup.registry.add_certificate(setup.acme.security, "cat", "signature", sign.pem)
    facts = {(f.environment, f.org, f.use): f.not_after for f in await setup.registry.expiry_facts()}
    assert facts[("cat", "acme", "mtls")] == setup.not_after
    assert ("cat", "acme", "signature") in facts
    notify = notifier(setup)
    await notify.refresh()
    (family,) = list(notify.collector().collect())
    samples = {tuple(s.labels.values()): s.value for s in family.samples}
    assert samples[("cat", "acme", "mtls")] == pytest.approx(
        (setup.not_after - setup.clock.now).total_seconds()
    )
    banner = await setup.registry.expiring_certificates(setup.acme.developer, setup.clock.now)
    assert banner == []  # 40 days left: not yet
    setup.clock.at_days_left(setup.not_after, 12)
    banner = await setup.registry.expiring_certificates(setup.acme.developer, setup.clock.now)
    assert [(c["common_name"], c["days_left"], c["expired"]) for c in banner] == [
        ("acme-expiring", 12, False)
    ]
    globex = await make_org(setup.registry, "globex")
    assert await setup.registry.expiring_certificates(globex.security, setup.clock.now) == []


def test_admin_org_webhook(tmp_path: Path) -> None:
    twofold = str(Path(sys.executable).with_name("twofold"))
    data = tmp_path / "data"

    async def seed() -> None:
        registry = await Registry.open(str(data / "twofold.db"))
        try:
            await registry.add_org(SYSTEM, "acme")
        finally:
            await registry.close()

    asyncio.run(seed())

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [twofold, "admin", "org", "webhook", *args, "--data", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run("acme", "https://ops.acme.example/twofold")
    assert done.returncode == 0, done.stderr
    assert "also POSTed to https://ops.acme.example/twofold" in done.stderr
    done = run("acme", "gopher://x")
    assert done.returncode == 1
    assert "[webhook_invalid]" in done.stderr
