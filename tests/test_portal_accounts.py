"""Account flows over the portal's pages, as a person's browser drives them (httpx, real
HTTPS), with mail delivered to a real SMTP server on loopback (aiosmtpd) and each link
followed out of the received message: invitation → password → TOTP enrolment → dashboard;
sign-in with a code (wrong codes rate-limited with the passwords, replays refused),
password reset, used / expired / tampered links, the Team page's role ceiling, and
`twofold admin user invite` / `reset-mfa` from the CLI."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from click.testing import CliRunner

from mailkit import SMTPServer, body, links, outbox
from portalkit import PASSWORD, PortalServer, csrf_of
from twofold.cli import main
from twofold.mail import MailSettings, SMTPMailer
from twofold.portal.web import PortalConfig
from twofold.registry.auth import SYSTEM
from twofold.registry.db import migrate

PUBLIC = "https://portal.example.test"
NEW_PASSWORD = "my very own passphrase"


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SMTPServer]:
    with SMTPServer(tmp_path_factory.mktemp("smtp")) as server:
        yield server


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory, smtp: SMTPServer) -> Iterator[PortalServer]:
    mailer = SMTPMailer(MailSettings(smtp=smtp.address, security="none"))
    config = PortalConfig(public_url=PUBLIC, mailer=mailer, link_lifetime=dt.timedelta(hours=72))
    with PortalServer(tmp_path_factory.mktemp("accounts") / "registry.db", config=config) as server:
        server.add_org("acme")
        server.add_org("globex")
        server.add_user("ops@platform.test", org=None, roles="operator")
        yield server


def _browser(portal: PortalServer) -> httpx.Client:
    return httpx.Client(base_url=portal.url, verify=portal.client_verify(), timeout=30)


def _mail_to(smtp: SMTPServer, email: str, count: int) -> EmailMessage:
    """The newest message to ``email``, once ``count`` messages arrived for it."""
    for _ in range(50):
        mine = [m for m in smtp.wait_for(len(smtp.messages) or 1) if m["To"] == email]
        if len(mine) >= count:
            return mine[-1]
        smtp.wait_for(len(smtp.messages) + 1)
    raise AssertionError(f"no message {count} for {email}")


def _link_path(message: EmailMessage) -> str:
    (link,) = [u for u in links(message) if "/account/link/" in u]
    assert link.startswith(PUBLIC + "/account/link/")
    return urlsplit(link).path


def _activate(portal: PortalServer, browser: httpx.Client, path: str) -> httpx.Response:
    page = browser.get(path)
    assert page.status_code == 200
    return browser.post(path, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD})


def _enrol(portal: PortalServer, browser: httpx.Client, email: str) -> list[str]:
    page = browser.get("/account/mfa")
    assert page.status_code == 200
    secret = re.search(r'id="mfa-secret"[^>]*>([A-Z2-7]+)<', page.text)
    assert secret
    assert 'src="data:image/svg+xml' in page.text  # the QR code, made on the server
    portal.totp_secrets[email] = secret.group(1)
    wrong = browser.post("/account/mfa", data={"csrf_token": csrf_of(page.text), "code": "12345"})
    assert wrong.status_code == 400 or wrong.status_code == 401
    done = browser.post("/account/mfa", data={"csrf_token": csrf_of(page.text), "code": portal.totp(email)})
    assert done.status_code == 201
    return re.findall(r"<li><code>([a-z0-9]{5}-[a-z0-9]{5})</code></li>", done.text)


def test_invitation_to_dashboard(portal: PortalServer, smtp: SMTPServer) -> None:
    email = "first@acme.test"
    with _browser(portal) as ops:
        csrf = portal.sign_in(ops, "ops@platform.test")
        sent = ops.post(
            "/admin/users/invite",
            data={
                "csrf_token": csrf,
                "email": email,
                "organisation": "acme",
                "roles": ["api_security", "developer"],
            },
        )
        assert sent.status_code == 303
        assert "Invitation sent" in ops.get("/admin/users").text
    message = _mail_to(smtp, email, 1)
    assert "invited you" in body(message)
    assert "72" in body(message) or "until" in body(message)
    path = _link_path(message)
    with _browser(portal) as person:
        assert person.get("/dashboard").headers["location"].startswith("/login")
        activated = _activate(portal, person, path)
        assert activated.status_code == 303
        # An API Security user sets up the second factor before anything else.
        assert person.get("/dashboard").headers["location"] == "/account/mfa"
        assert person.get("/tokens").headers["location"] == "/account/mfa"
        codes = _enrol(portal, person, email)
        assert len(codes) == 10
        dashboard = person.get("/dashboard")
        assert dashboard.status_code == 200
        assert dashboard.text.count('data-done="no"') == 4  # nothing set up yet
        assert "No calls yet" in dashboard.text
    with _browser(portal) as again:  # the link is used up
        used = again.get(path)
        assert used.status_code == 410
        assert "This link cannot be used" in used.text
        assert email not in used.text
    audit = [e["action"] for e in portal.call(portal.reg.audit_entries(SYSTEM, org="acme"))]
    assert {"user.invite", "user.activate_link", "user.mfa_enrol"} <= set(audit)


def test_sign_in_with_a_code_rate_limits_and_refuses_replays(portal: PortalServer, smtp: SMTPServer) -> None:
    email = "coder@acme.test"
    portal.add_user(email, org="acme", roles="api_security")  # enrolled
    with _browser(portal) as browser:
        for _ in range(2):  # wrong passwords…
            assert (
                browser.post("/login", data={"email": email, "password": "not the password"}).status_code
                == 401
            )
        login = browser.post("/login", data={"email": email, "password": PASSWORD, "next": "/security"})
        assert login.headers["location"] == "/login/code?next=/security"
        assert browser.get("/security").headers["location"] == "/login/code"
        csrf = csrf_of(browser.get("/login/code").text)
        code = portal.totp(email)
        for _ in range(2):  # …and wrong codes count together
            wrong = browser.post(
                "/login/code", data={"csrf_token": csrf, "code": "000000" if code != "000000" else "999999"}
            )
            assert wrong.status_code == 401
            assert "mfa_failed" in wrong.text
        ok = browser.post("/login/code", data={"csrf_token": csrf, "code": code, "next": "/security"})
        assert ok.status_code == 303
        assert ok.headers["location"] == "/security"
        assert browser.get("/security").status_code == 200
    with _browser(portal) as other:  # the same code, within its window, in another session
        other.post("/login", data={"email": email, "password": PASSWORD})
        csrf = csrf_of(other.get("/login/code").text)
        assert other.post("/login/code", data={"csrf_token": csrf, "code": code}).status_code == 401
        for _ in range(4):
            assert other.post("/login/code", data={"csrf_token": csrf, "code": "123456"}).status_code == 401
        limited = other.post("/login/code", data={"csrf_token": csrf, "code": portal.totp(email)})
        assert limited.status_code == 429  # 5 failures for this address and account
        assert "login_rate_limited" in limited.text


def test_password_reset_by_mail(portal: PortalServer, smtp: SMTPServer) -> None:
    email = "forgetful@acme.test"
    portal.add_user(email, org="acme", roles="developer")
    with _browser(portal) as old:
        portal.sign_in(old, email)
        with _browser(portal) as browser:
            unknown = browser.post("/account/recover", data={"email": "nobody@acme.test"})
            known = browser.post("/account/recover", data={"email": email})
            assert unknown.status_code == known.status_code == 200
            assert unknown.text.replace("nobody@acme.test", "X") == known.text.replace(email, "X")
            message = _mail_to(smtp, email, 1)
            assert "reset the password" in body(message)
            changed = _activate(portal, browser, _link_path(message))
            assert changed.status_code == 303
            flash = changed.headers["set-cookie"]
            assert "signed%20out" in flash
            assert browser.get("/dashboard").status_code == 200
        assert old.get("/dashboard").headers["location"].startswith("/login")  # signed out everywhere
    assert not [m for m in smtp.messages if m["To"] == "nobody@acme.test"]


def test_expired_and_tampered_links_get_one_page(portal: PortalServer, smtp: SMTPServer) -> None:
    email = "slow@acme.test"
    link = portal.call(portal.reg.invite(SYSTEM, email, org="acme", roles=["developer"]))
    with _browser(portal) as browser:
        tampered = browser.get(link.path[:-3] + "xyz")
        portal.offset += dt.timedelta(hours=72, minutes=1)
        expired = browser.get(link.path)
        posted = browser.post(
            link.path, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD}
        )
        for page in (tampered, expired, posted):
            assert page.status_code == 410
            assert "Send a new link" in page.text
            assert email not in page.text
        assert tampered.text == expired.text
        again = browser.post("/account/recover", data={"email": email})
        assert "is on its way" in again.text
    message = _mail_to(smtp, email, 1)
    assert "invited" in body(message)
    with _browser(portal) as browser:
        assert _activate(portal, browser, _link_path(message)).status_code == 303
        assert browser.get("/dashboard").status_code == 200  # a Developer: no second factor needed


def test_team_invitations_respect_the_role_ceiling(portal: PortalServer, smtp: SMTPServer) -> None:
    portal.add_user("lead@globex.test", org="globex", roles="api_security")
    with _browser(portal) as lead:
        csrf = portal.sign_in(lead, "lead@globex.test")
        team = lead.get("/team")
        assert 'value="api_security"' in team.text
        assert 'value="developer"' not in team.text
        above = lead.post(
            "/team/invitations", data={"csrf_token": csrf, "email": "x@globex.test", "roles": ["developer"]}
        )
        assert above.status_code == 403
        assert "role_ceiling" in above.text
        ok = lead.post(
            "/team/invitations",
            data={"csrf_token": csrf, "email": "mate@globex.test", "roles": ["api_security"]},
        )
        assert ok.status_code == 303
        assert "mate@globex.test" in lead.get("/team").text
    assert _mail_to(smtp, "mate@globex.test", 1)["Subject"].startswith("You are invited")
    with _browser(portal) as dev:
        portal.add_user("dev@globex.test", org="globex", roles="developer")
        csrf = portal.sign_in(dev, "dev@globex.test")
        refused = dev.post(
            "/team/invitations", data={"csrf_token": csrf, "email": "y@globex.test", "roles": ["developer"]}
        )
        assert refused.status_code == 403
        assert "api_security_only" in refused.text


def test_operator_resets_a_second_factor_from_the_page(portal: PortalServer) -> None:
    portal.add_user("lost@acme.test", org="acme", roles="api_security")
    with _browser(portal) as ops:
        csrf = portal.sign_in(ops, "ops@platform.test")
        reset = ops.post("/admin/users/mfa-reset", data={"csrf_token": csrf, "email": "lost@acme.test"})
        assert reset.status_code == 303
    with _browser(portal) as person:
        login = person.post("/login", data={"email": "lost@acme.test", "password": PASSWORD})
        assert login.headers["location"] == "/"
        assert person.get("/").headers["location"] == "/account/mfa"  # enrols anew
        assert person.get("/dashboard").headers["location"] == "/account/mfa"
    (entry,) = [e for e in portal.call(portal.reg.audit_entries(SYSTEM)) if e["action"] == "user.mfa_reset"]
    assert entry["actor"] == "ops@platform.test"


def test_cli_invite_writes_the_mail_to_the_outbox_and_resets_a_factor(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    migrate(str(data / "twofold.db"))  # the serve's registry (admin commands never create one)
    assert runner.invoke(main, ["admin", "org", "add", "acme", "--data", str(data)]).exit_code == 0
    config = tmp_path / "twofold.toml"
    config.write_text(f'data = "{data}"\nportal_url = "{PUBLIC}"\nlink_lifetime_hours = 24\n')
    invited = runner.invoke(
        main,
        [
            "admin",
            "user",
            "invite",
            "--org",
            "acme",
            "--email",
            "cli@acme.test",
            "--role",
            "api_security",
            "--config",
            str(config),
            "--json",
        ],
    )
    assert invited.exit_code == 0, invited.output
    result = json.loads(invited.stdout)
    assert result["roles"] == ["api_security"]
    (message,) = outbox(data / "outbox")
    assert message["To"] == "cli@acme.test"
    (link,) = [u for u in links(message) if "/account/link/" in u]
    assert link.startswith(PUBLIC)
    expires = dt.datetime.fromisoformat(result["expires_at"])
    assert dt.timedelta(hours=23.9) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=24)
    listed = runner.invoke(main, ["admin", "user", "list", "--data", str(data)])
    assert "invited" in listed.stdout
    above = runner.invoke(
        main,
        ["admin", "user", "invite", "--email", "x@acme.test", "--role", "developer", "--config", str(config)],
    )
    assert above.exit_code != 0
    assert "Traceback" not in above.output
    reset = runner.invoke(
        main, ["admin", "user", "reset-mfa", "--email", "cli@acme.test", "--data", str(data)]
    )
    assert reset.exit_code == 0, reset.output
    log = runner.invoke(main, ["admin", "audit", "log", "--data", str(data)])
    assert "user.invite" in log.stdout
    assert "user.mfa_reset" in log.stdout


SESSION_FORMS = ["/login/code", "/account/mfa", "/team/invitations"]
OPERATOR_FORMS = ["/admin/users/invite", "/admin/users/mfa-reset"]


def test_the_new_pages_ask_who_is_there_and_check_their_forms(portal: PortalServer) -> None:
    """Every new page: anonymous visitors are sent to sign in; session forms need the
    session's CSRF token; operator pages refuse others; forms without a session refuse
    cross-site posts."""
    with _browser(portal) as anonymous:
        for path in ("/dashboard", "/team", "/account/mfa", "/login/code", "/admin/overview"):
            response = anonymous.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/login?next="), path
        for path in ("/account/recover", "/account/link/whatever"):
            forged = anonymous.post(
                path, data={"email": "x@acme.test"}, headers={"Sec-Fetch-Site": "cross-site"}
            )
            assert forged.status_code == 403, path
            assert "cross_site_login" in forged.text
    portal.add_user("member@acme.test", org="acme", roles="api_security,developer")
    with _browser(portal) as member:
        csrf = portal.sign_in(member, "member@acme.test")
        for path in SESSION_FORMS:
            response = member.post(path, data={"csrf_token": "forged", "email": "x@acme.test", "code": "1"})
            assert response.status_code == 403, path
            assert "csrf_failed" in response.text, path
        for path in OPERATOR_FORMS:
            refused = member.post(
                path, data={"csrf_token": csrf, "email": "member@acme.test", "roles": ["developer"]}
            )
            assert refused.status_code == 403, path
            assert "operator_only" in refused.text
        assert member.get("/admin/overview").status_code == 403
        overview = member.get("/dashboard?org=globex")  # ?org= is for operators: their own
        assert overview.status_code == 200
        assert "Where acme stands" in overview.text
    with _browser(portal) as ops:
        portal.sign_in(ops, "ops@platform.test")
        for path in OPERATOR_FORMS:
            response = ops.post(path, data={"csrf_token": "forged", "email": "member@acme.test"})
            assert response.status_code == 403, path
            assert "csrf_failed" in response.text, path
