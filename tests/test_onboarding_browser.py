"""The whole onboarding in Chromium against `twofold serve` (portal, gateway, sandbox), with
its mail going to a real SMTP server on loopback: the operator invites → the message
arrives → its link → a password → the authenticator set up → the dashboard with nothing
checked → certificates, a project and one call through the gateway → every item checked
and the call listed. A Developer of another organisation sees none of it."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyotp
import pytest

from conftest import require, require_binary
from gatewaykit import World, ec_pair, rsa_pair, running_world
from mailkit import SMTPServer, body, links
from test_portal_browser import CHROMIUM_ARGS, sync_playwright
from twofold.registry.auth import SYSTEM, Principal, parse_roles
from twofold.registry.models import utcnow

pytestmark = pytest.mark.browser
PASSWORD = "the operator's passphrase"

if sync_playwright is not None:
    from playwright.sync_api import Page, expect


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SMTPServer]:
    with SMTPServer(tmp_path_factory.mktemp("smtp")) as server:
        yield server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, smtp: SMTPServer) -> Iterator[World]:
    with running_world(
        tmp_path_factory.mktemp("onboarding"), smtp=smtp.address, smtp_security="none"
    ) as running:
        yield running


def _operator(world: World) -> str:
    """An operator with a password and an authenticator (enrolled a few steps in the past, so
    that the code of this minute is a later one). Returns the TOTP secret."""
    view = world.call(
        world.registry.add_user(SYSTEM, "ops@bank.test", org=None, roles="operator", password=PASSWORD)
    )
    who = Principal("ops@bank.test", view["id"], roles=parse_roles("operator"))
    world.registry.clock = lambda: utcnow() - dt.timedelta(minutes=2)
    secret = world.call(world.registry.mfa_begin(who))["secret"]
    world.call(world.registry.mfa_confirm(who, pyotp.TOTP(secret).at(world.registry.clock())))
    return str(secret)


def _checked(page: Page) -> dict[str, str]:
    items = page.locator("#checklist li")
    return {
        str(items.nth(i).get_attribute("data-item")): str(items.nth(i).get_attribute("data-done"))
        for i in range(items.count())
    }


def test_invitation_to_a_complete_checklist(
    world: World, smtp: SMTPServer, request: pytest.FixtureRequest
) -> None:
    chromium = require_binary("chromium", request)
    require("playwright (pip)", sync_playwright is not None, request.node.nodeid)
    world.call(world.registry.add_org(SYSTEM, "walk", "Walk Payments"))
    secret = _operator(world)
    email = "lead@walk.test"
    pairs = world.base / "walk"
    mtls, sign = ec_pair(pairs, "mtls", "walk-cat"), rsa_pair(pairs, "sign", "walk-cat-sign")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            ops = browser.new_context(ignore_https_errors=True, base_url=world.portal).new_page()
            ops.goto("/login")
            ops.get_by_label("Email").fill("ops@bank.test")
            ops.get_by_label("Password").fill(PASSWORD)
            ops.get_by_role("button", name="Sign in").click()
            ops.get_by_label("Code").fill(pyotp.TOTP(secret).now())
            ops.get_by_role("button", name="Continue").click()
            expect(ops).to_have_url(re.compile(r"/admin/overview$"))
            ops.get_by_role("link", name="Users").click()
            form = ops.locator("#invite-form")
            form.get_by_label("Email").fill(email)
            form.get_by_label("Organisation").select_option("walk")
            form.get_by_label("API Security").check()
            form.get_by_label("Developer").check()
            form.get_by_role("button", name="Send invitation").click()
            expect(ops.get_by_role("status")).to_contain_text(f"Invitation sent to {email}")
            expect(ops.locator("#invitations")).to_contain_text(email)

            (message,) = [m for m in smtp.wait_for(1) if m["To"] == email]
            assert "Walk Payments" in body(message)
            (link,) = [u for u in links(message) if "/account/link/" in u]
            assert link.startswith(world.portal)

            page = browser.new_context(ignore_https_errors=True, base_url=world.portal).new_page()
            page.goto(urlsplit(link).path)
            expect(page.get_by_role("heading", name="Activate your account")).to_be_visible()
            page.get_by_label("Password (10 or more characters)").fill("lead's own passphrase")
            page.get_by_label("Password again").fill("lead's own passphrase")
            page.get_by_role("button", name="Activate").click()
            expect(page).to_have_url(re.compile(r"/account/mfa$"))
            key = page.locator("#mfa-secret").inner_text().strip()
            page.get_by_label("Code from the app").fill(pyotp.TOTP(key).now())
            page.get_by_role("button", name="Turn on").click()
            expect(page.locator("#recovery-codes li")).to_have_count(10)
            page.get_by_role("link", name="Continue").click()
            expect(page).to_have_url(re.compile(r"/dashboard$"))
            assert _checked(page) == {"project": "no", "mtls": "no", "signature": "no", "call": "no"}
            expect(page.locator("#no-calls")).to_be_visible()

            # Each unchecked item links to where it is done.
            page.locator('#checklist li[data-item="mtls"] a').click()
            expect(page).to_have_url(re.compile(r"/security\?env=cat$"))
            for use, pair in (("MTLS", mtls), ("Digital Signature", sign)):
                page.get_by_role("button", name="Add Security").click()
                page.get_by_label("Certificate use").select_option(label=use)
                page.set_input_files("#file", str(pair.cert_path))
                page.get_by_role("button", name="Add Certificate").click()
                expect(page.get_by_role("status")).to_contain_text(f"Added {use} certificate")
            page.goto("/dashboard")
            page.locator('#checklist li[data-item="project"] a').click()
            page.get_by_label("Project name").fill("Treasury")
            page.get_by_role("button", name="Create project").click()
            project = page.locator("section.project", has=page.get_by_role("heading", name="Treasury"))
            for product in ("balance", "payments"):
                project.get_by_label("API product").select_option(product)
                project.get_by_label("Environment").select_option(label="Client Testing")
                project.get_by_role("button", name="Add API product").click()
                expect(page.get_by_role("status")).to_have_text("Project updated")
                project = page.locator("section.project", has=page.get_by_role("heading", name="Treasury"))
            page.goto("/dashboard")
            assert _checked(page) == {"project": "yes", "mtls": "yes", "signature": "yes", "call": "no"}

            world.sync()
            with world.client(mtls) as client:
                assert client.get("/accessapi/balance").status_code == 200
            for _ in range(40):  # the gateway stores its calls about once a second
                page.goto("/dashboard")
                if _checked(page)["call"] == "yes":
                    break
                page.wait_for_timeout(250)
            assert set(_checked(page).values()) == {"yes"}
            expect(page.locator("#checklist-done")).to_be_visible()
            row = page.locator("#recent-calls tbody tr").first
            expect(row).to_contain_text("/accessapi/balance")
            expect(row).to_contain_text("200")
            Path(__file__).with_name("artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(Path(__file__).with_name("artifacts") / "dashboard.png"), full_page=True)

            # A Developer of another organisation sees none of it, whatever the URL says.
            world.call(world.registry.set_password(SYSTEM, "security@globex.example", PASSWORD))
            world.call(world.registry.set_roles(SYSTEM, "security@globex.example", ["developer"]))
            other = browser.new_context(ignore_https_errors=True, base_url=world.portal).new_page()
            other.goto("/login?next=/dashboard%3Forg%3Dwalk")
            other.get_by_label("Email").fill("security@globex.example")
            other.get_by_label("Password").fill(PASSWORD)
            other.get_by_role("button", name="Sign in").click()
            expect(other.get_by_role("heading", name="Dashboard")).to_be_visible()
            for path in ("/dashboard?org=walk", "/team", "/security", "/audit"):
                other.goto(path)
                text = other.content()
                for secret_of_walk in ("walk-cat", "lead@walk.test", "Walk Payments", mtls.fingerprint):
                    assert secret_of_walk not in text, (path, secret_of_walk)
        finally:
            browser.close()
