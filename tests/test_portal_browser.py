"""The portal in a real browser: Playwright driving Debian's Chromium against the portal
served the way production serves it (HTTPS from a local CA, secure session cookies) on a
temporary SQLite registry. One browser per module, a new browser context per test.

Every page a test visits is watched for JavaScript errors and Content-Security-Policy
violations (console errors): a test fails if any shows up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from conftest import require, require_binary
from portalkit import PASSWORD, PortalServer, ec_pem_private_key, pem, prod_issued, self_signed
from twofold.crypto import certs
from twofold.registry.auth import SYSTEM

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Imported lazily so that a machine without Playwright reports the suite as NOT RUN.
try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        Dialog,
        Locator,
        Page,
        Response,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - reported by the fixture below
    sync_playwright = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    chromium = require_binary("chromium", request)
    require("playwright (pip)", sync_playwright is not None, request.node.nodeid)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[PortalServer]:
    with PortalServer(tmp_path / "registry.db") as server:
        yield server


class Tab:
    """A page plus the errors it logged."""

    def __init__(self, context: BrowserContext, server: PortalServer) -> None:
        self.context = context
        self.server = server
        self.page = context.new_page()
        self._problems: list[str] = []
        self._expected: list[str] = []
        self.page.on("pageerror", lambda exc: self._problems.append(f"pageerror: {exc}"))
        self.page.on(
            "console",
            lambda msg: (
                self._problems.append(f"console {msg.type}: {msg.text} ({msg.location.get('url')})")
                if msg.type == "error"
                else None
            ),
        )

    def expected_problem(self, pattern: str) -> None:
        """Console errors the test provokes on purpose (e.g. a refused request); they may be
        logged after this call, so they are filtered when the problems are read."""
        self._expected.append(pattern)

    @property
    def problems(self) -> list[str]:
        return [p for p in self._problems if not any(re.search(e, p) for e in self._expected)]


@pytest.fixture
def tabs(browser: Browser, portal: PortalServer) -> Iterator[list[Tab]]:
    opened: list[Tab] = []
    yield opened
    problems = [p for tab in opened for p in tab.problems]
    for tab in opened:
        tab.context.close()
    assert not problems, "the pages logged errors:\n" + "\n".join(problems)


@pytest.fixture
def new_tab(browser: Browser, portal: PortalServer, tabs: list[Tab]) -> Callable[[], Tab]:
    def make() -> Tab:
        context = browser.new_context(ignore_https_errors=True, base_url=portal.url)
        context.set_default_timeout(10_000)
        tab = Tab(context, portal)
        tabs.append(tab)
        return tab

    return make


NewTab = Callable[[], Tab]

# --- helpers ------------------------------------------------------------------------------------


def org_with_users(server: PortalServer, slug: str) -> tuple[str, str]:
    """An organisation with an API Security user and a Developer; returns their emails."""
    server.add_org(slug)
    security, developer = f"security@{slug}.test", f"dev@{slug}.test"
    server.add_user(security, org=slug, roles="api_security")
    server.add_user(developer, org=slug, roles="developer")
    return security, developer


def sign_in(tab: Tab, email: str, password: str = PASSWORD, next_path: str | None = None) -> Response:
    page = tab.page
    page.goto(f"/login?next={next_path}" if next_path else "/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as info:
        page.get_by_role("button", name="Sign in").click()
    response = info.value
    page.wait_for_load_state()
    if "/login/code" in page.url:  # a second factor: the code from the authenticator app
        page.get_by_label("Code").fill(tab.server.totp(email))
        page.get_by_role("button", name="Continue").click()
        page.wait_for_load_state()
    return response


def enrol(tab: Tab, email: str) -> list[str]:
    """On the second-factor page: scan (read the key), type the code; returns the recovery codes."""
    page = tab.page
    expect(page).to_have_url(re.compile(r"/account/mfa$"))
    expect(page.locator("#mfa-qr")).to_be_visible()
    tab.server.totp_secrets[email] = page.locator("#mfa-secret").inner_text().strip()
    page.get_by_label("Code from the app").fill(tab.server.totp(email))
    page.get_by_role("button", name="Turn on").click()
    expect(page.get_by_role("heading", name="Recovery codes")).to_be_visible()
    codes = page.locator("#recovery-codes li").all_inner_texts()
    page.get_by_role("link", name="Continue").click()
    return codes


def rows(page: Page) -> Locator:
    return page.locator("#certificates tbody tr")


def row_for(page: Page, certificate: x509.Certificate) -> Locator:
    fingerprint = certs.fingerprint_sha256(certificate)
    return page.locator(f'#certificates tr[data-fingerprint="{fingerprint}"]')


def open_add_dialog(page: Page) -> None:
    page.get_by_role("button", name="Add Security").click()
    dialog = page.get_by_role("dialog", name="Add certificate")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("heading", name="Add certificate")).to_be_visible()


def drop_file(page: Page, name: str, text: str) -> None:
    """Drag and drop a file onto #dropzone: a DataTransfer carrying a File built in the page."""
    transfer = page.evaluate_handle(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, {type: "application/x-pem-file"}));
            return transfer;
        }""",
        [name, text],
    )
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": transfer})
    page.dispatch_event("#dropzone", "dragover", {"dataTransfer": transfer})
    expect(page.locator("#dropzone")).to_have_class(re.compile(r"\bdragging\b"))
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#dropzone")).not_to_have_class(re.compile(r"\bdragging\b"))


def submit_certificate(page: Page) -> Response:
    with page.expect_response(
        lambda r: r.url.endswith("/security/certificates") and r.request.method == "POST"
    ) as info:
        page.get_by_role("button", name="Add Certificate").click()
    page.wait_for_load_state()
    return info.value


def alert_text(page: Page) -> str:
    return page.locator("main > .notice.err").inner_text()


# --- stories ----------------------------------------------------------------------------------------


def test_add_certificates_by_drag_and_drop_and_by_browse(portal: PortalServer, new_tab: NewTab) -> None:
    security, _ = org_with_users(portal, "acme")
    already_in_prod = prod_issued("acme-prod-client")
    portal.register(portal.principal(security), "prod", "mtls", already_in_prod)
    tab = new_tab()
    page = tab.page
    response = sign_in(tab, security, next_path="/security")
    assert response.status == 303
    expect(page).to_have_url(re.compile(r"/security$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Security")

    # The session cookie is what production needs: Secure, HttpOnly, SameSite=Strict.
    (session,) = [c for c in tab.context.cookies() if c["name"] == "twofold_session"]
    assert session["secure"]
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"

    # Environment tabs switch the list. They are links to one page per environment.
    environments = page.get_by_role("navigation", name="Environments")
    cat_tab = environments.get_by_role("link", name="Client Testing")
    prod_tab = environments.get_by_role("link", name="Production")
    expect(cat_tab).to_have_attribute("aria-current", "page")
    expect(prod_tab).not_to_have_attribute("aria-current", "page")
    expect(page.locator("#no-certificates")).to_contain_text("No certificates registered in Client Testing")
    prod_tab.click()
    expect(page).to_have_url(re.compile(r"env=prod"))
    expect(prod_tab).to_have_attribute("aria-current", "page")
    expect(cat_tab).not_to_have_attribute("aria-current", "page")
    expect(page.get_by_role("region", name="Production certificates")).to_be_visible()
    expect(rows(page)).to_have_count(1)
    expect(row_for(page, already_in_prod)).to_contain_text("acme-prod-client")
    cat_tab.click()
    expect(page).to_have_url(re.compile(r"env=cat"))
    expect(page.locator("#certificates")).to_have_count(0)

    # Add Security → the "Add certificate" dialog; MTLS; drag and drop the file.
    mtls = self_signed("acme-cat-client")
    open_add_dialog(page)
    page.get_by_label("Certificate use").select_option(label="MTLS")
    drop_file(page, "acme-cat-client.pem", pem(mtls).decode())
    expect(page.locator("#file-name")).to_have_text("Selected: acme-cat-client.pem")
    assert page.evaluate("document.getElementById('file').files.length") == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "security-add-dialog.png"))
    response = submit_certificate(page)
    assert response.status == 303

    fingerprint = certs.fingerprint_sha256(mtls)
    expect(page.get_by_role("status")).to_contain_text("Added MTLS certificate acme-cat-client")
    row = row_for(page, mtls)
    expect(row).to_have_count(1)
    cells = row.locator("td")
    expect(cells.nth(0)).to_have_text("acme-cat-client")
    expect(cells.nth(1)).to_have_text("MTLS")
    # The whole fingerprint is in the page, shown cut to fit, and Copy puts all of it on the clipboard.
    expect(cells.nth(2).locator("code")).to_have_text(fingerprint)
    expect(cells.nth(2).locator("code")).to_have_attribute("title", fingerprint)
    shown = (
        cells.nth(2)
        .locator("code")
        .evaluate("e => [e.scrollWidth > e.clientWidth, getComputedStyle(e).textOverflow]")
    )
    assert shown == [True, "ellipsis"]
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
    copy = cells.nth(2).get_by_role("button", name="Copy the SHA-256 fingerprint of acme-cat-client (MTLS)")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == fingerprint
    days = certs.days_left(mtls.not_valid_after_utc)
    expect(cells.nth(3)).to_contain_text(f"({days} days left)")
    expect(cells.nth(3)).not_to_have_class(re.compile(r"\bwarn\b"))
    expect(cells.nth(4)).to_contain_text(security)

    # Browse as Digital Signature: the "browse" link opens the file chooser; the browser's raw
    # "Choose File / No file chosen" control is not shown beside it.
    signing = self_signed("acme-signing", usage="signature")
    open_add_dialog(page)
    page.get_by_label("Certificate use").select_option(label="Digital Signature")
    box = page.locator("#file").bounding_box()
    assert box is not None
    assert box["width"] <= 1, box
    assert box["height"] <= 1, box
    expect(page.locator("#add-dialog")).not_to_contain_text("No file chosen")
    with page.expect_file_chooser() as chooser:
        page.locator("#dropzone").get_by_text("browse", exact=True).click()
    chooser.value.set_files(
        files=[{"name": "signing.crt", "mimeType": "application/x-pem-file", "buffer": pem(signing)}]
    )
    expect(page.locator("#file-name")).to_have_text("Selected: signing.crt")
    assert submit_certificate(page).status == 303
    expect(row_for(page, signing).locator("td").nth(1)).to_have_text("Digital Signature")
    expect(rows(page)).to_have_count(2)

    registered = {(c["fingerprint"], c["use"]) for c in portal.certificates("acme", "cat")}
    assert registered == {(fingerprint, "mtls"), (certs.fingerprint_sha256(signing), "signature")}


def test_third_mtls_certificate_with_the_same_cn_is_refused(portal: PortalServer, new_tab: NewTab) -> None:
    security, _ = org_with_users(portal, "acme")
    who = portal.principal(security)
    for _ in range(2):
        portal.register(who, "cat", "mtls", self_signed("acme-shared-cn"))
    tab = new_tab()
    page = tab.page
    sign_in(tab, security, next_path="/security")
    expect(rows(page)).to_have_count(2)

    open_add_dialog(page)
    page.get_by_label("Certificate use").select_option("mtls")
    drop_file(page, "third.pem", pem(self_signed("acme-shared-cn")).decode())
    response = submit_certificate(page)
    assert response.status == 409
    tab.expected_problem(r"status of 409")
    message = "At most two mTLS certificates may share the Common Name 'acme-shared-cn'"
    # The dialog opens again with the message, so the user sees why and can pick another file —
    # said once, there: not in a page banner behind it too; a sentence, without the raw code.
    dialog = page.get_by_role("dialog", name="Add certificate")
    expect(dialog).to_be_visible()
    expect(dialog).to_have_accessible_description(re.compile(re.escape(message)))
    expect(page.locator("#add-error")).to_have_text(re.compile("^" + re.escape(message)))
    expect(page.locator("main > .notice.err")).to_have_count(0)
    expect(page.locator("body")).not_to_contain_text("mtls_cn_limit")
    expect(page.locator("body")).not_to_contain_text("cn_limit")
    expect(rows(page)).to_have_count(2)
    assert len(portal.certificates("acme", "cat")) == 2


def test_private_key_upload_is_refused_and_nothing_is_added(portal: PortalServer, new_tab: NewTab) -> None:
    security, _ = org_with_users(portal, "acme")
    audit_before = portal.audit_count()
    tab = new_tab()
    page = tab.page
    sign_in(tab, security, next_path="/security")
    audit_before += 2  # the sign-in itself is audited, and its second factor
    open_add_dialog(page)
    page.set_input_files(
        "#file",
        files=[{"name": "client.pem", "mimeType": "application/x-pem-file", "buffer": ec_pem_private_key()}],
    )
    response = submit_certificate(page)
    assert response.status == 400
    tab.expected_problem(r"status of 400")
    expect(page.locator("#add-error")).to_contain_text("treat this key as exposed")
    expect(page.locator("#add-error")).to_contain_text("Nothing was stored")
    expect(page.locator("#add-error")).to_have_text(re.compile("^This file contains a PRIVATE KEY"))
    expect(page.locator("main > .notice.err")).to_have_count(0)
    expect(page.locator("body")).not_to_contain_text("private_key_uploaded")
    expect(page.locator("#no-certificates")).to_be_visible()
    assert portal.all_certificates() == []
    assert portal.audit_count() == audit_before
    # The key is not echoed back into the page.
    assert "PRIVATE KEY-----" not in page.content()


def test_developer_sees_the_list_but_cannot_change_it(portal: PortalServer, new_tab: NewTab) -> None:
    security, developer = org_with_users(portal, "acme")
    existing = self_signed("acme-cat-client")
    portal.register(portal.principal(security), "cat", "mtls", existing)
    tab = new_tab()
    page = tab.page
    sign_in(tab, developer, next_path="/security")
    expect(row_for(page, existing)).to_contain_text("acme-cat-client")
    expect(page.get_by_role("button", name="Add Security")).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("Remove"))).to_have_count(0)
    expect(page.locator("#add-dialog")).to_have_count(0)
    expect(page.locator("#read-only-note")).to_contain_text("only users with the API Security role")

    # The server refuses a forged upload and a forged removal from this session anyway.
    forged = page.evaluate(
        """async ([pemText, fingerprint]) => {
            const csrf = document.querySelector('input[name="csrf_token"]').value;
            const add = new FormData();
            add.append("csrf_token", csrf);
            add.append("environment", "cat");
            add.append("use", "mtls");
            add.append("file", new File([pemText], "forged.pem"));
            const added = await fetch("/security/certificates", {method: "POST", body: add, redirect: "manual"});
            const rm = new FormData();
            rm.append("csrf_token", csrf);
            rm.append("environment", "cat");
            rm.append("fingerprint", fingerprint);
            const removed = await fetch("/security/certificates/remove", {method: "POST", body: rm, redirect: "manual"});
            return [added.status, await added.text(), removed.status, await removed.text()];
        }""",
        [pem(self_signed("forged-client")).decode(), certs.fingerprint_sha256(existing)],
    )
    tab.expected_problem(r"status of 403")
    assert forged[0] == 403, forged[1][:300]
    assert "Only users with the API Security role may add certificates" in forged[1]
    assert forged[2] == 403, forged[3][:300]
    assert "Only users with the API Security role may remove certificates" in forged[3]
    assert [c["fingerprint"] for c in portal.certificates("acme")] == [certs.fingerprint_sha256(existing)]


def test_remove_asks_for_confirmation_in_the_portals_own_dialog(
    portal: PortalServer, new_tab: NewTab
) -> None:
    security, _ = org_with_users(portal, "acme")
    who = portal.principal(security)
    keep, drop = self_signed("acme-keep"), self_signed("acme-drop")
    portal.register(who, "cat", "mtls", keep)
    portal.register(who, "cat", "mtls", drop)
    tab = new_tab()
    page = tab.page
    sign_in(tab, security, next_path="/security")
    expect(rows(page)).to_have_count(2)
    native: list[str] = []

    def dismiss(dialog: Dialog) -> None:  # the browser's confirm box must not be used
        native.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    posted: list[str] = []
    page.on("request", lambda request: posted.append(request.url) if request.method == "POST" else None)
    row_for(page, drop).get_by_role("button", name="Remove acme-drop (MTLS)").click()
    confirm = page.get_by_role("dialog", name="Remove acme-drop?")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text(
        f"Calls using the MTLS certificate acme-drop ({certs.fingerprint_sha256(drop)[:16]}…) will be refused at once."
    )
    expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()  # the safe choice first
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    page.wait_for_timeout(300)  # a submission, had there been one, would be under way by now
    assert posted == [], "cancelling the confirmation must not submit the form"
    row_for(page, drop).get_by_role("button", name="Remove acme-drop (MTLS)").click()
    expect(confirm).to_be_visible()
    page.keyboard.press("Escape")  # Escape cancels too
    expect(confirm).to_be_hidden()
    page.wait_for_timeout(300)
    assert posted == []
    expect(rows(page)).to_have_count(2)
    assert len(portal.certificates("acme")) == 2

    row_for(page, drop).get_by_role("button", name="Remove acme-drop (MTLS)").click()
    with page.expect_response(lambda r: r.url.endswith("/security/certificates/remove")) as info:
        confirm.get_by_role("button", name="Remove").click()
    assert info.value.status == 303
    page.wait_for_load_state()
    expect(page.get_by_role("status")).to_have_text("Removed certificate acme-drop")
    expect(row_for(page, drop)).to_have_count(0)
    expect(row_for(page, keep)).to_have_count(1)
    assert [c["common_name"] for c in portal.certificates("acme")] == ["acme-keep"]
    assert native == []


def test_expiry_under_30_days_is_highlighted(portal: PortalServer, new_tab: NewTab) -> None:
    security, _ = org_with_users(portal, "acme")
    who = portal.principal(security)
    soon = self_signed("acme-expiring", days=10)
    later = self_signed("acme-fresh", days=200)
    portal.register(who, "cat", "mtls", soon)
    portal.register(who, "cat", "mtls", later)
    tab = new_tab()
    page = tab.page
    sign_in(tab, security, next_path="/security")
    soon_cell = row_for(page, soon).locator("td").nth(3)
    expect(soon_cell).to_have_class(re.compile(r"\bwarn\b"))
    expect(soon_cell).to_contain_text(f"({certs.days_left(soon.not_valid_after_utc)} days left)")
    later_cell = row_for(page, later).locator("td").nth(3)
    expect(later_cell).not_to_have_class(re.compile(r"\bwarn\b"))
    # The highlight is not carried by colour alone: the weight differs too.
    weights = [c.evaluate("e => getComputedStyle(e).fontWeight") for c in (soon_cell, later_cell)]
    assert int(weights[0]) > int(weights[1])


def test_pages_fit_a_narrow_screen(portal: PortalServer, new_tab: NewTab) -> None:
    """At 420 px wide no page scrolls sideways, and the certificates and tokens become cards:
    every Remove and Revoke button is on screen, the fingerprint with its Copy button."""
    security, _ = org_with_users(portal, "acme")
    who = portal.principal(security)
    portal.register(who, "cat", "mtls", self_signed("acme-a-rather-long-common-name.payments.example.com"))
    portal.register(who, "cat", "signature", self_signed("acme-signing", usage="signature"))
    portal.call(portal.reg.create_token(who, "ci"))
    tab = new_tab()
    page = tab.page
    page.set_viewport_size({"width": 420, "height": 800})
    sign_in(tab, security)
    for path in ("/security", "/projects", "/audit", "/tokens", "/account/password"):
        page.goto(path)
        sizes = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert sizes[0] <= sizes[1], f"{path} scrolls sideways: {sizes}"

    def on_screen(locator: Locator) -> None:
        expect(locator).to_be_visible()
        box = locator.bounding_box()
        assert box is not None
        assert box["x"] >= 0, box
        assert box["x"] + box["width"] <= 420, box

    page.goto("/security")
    for button in page.get_by_role("button", name=re.compile(r"^Remove ")).all():
        on_screen(button)
    for button in page.get_by_role("button", name=re.compile(r"^Copy the SHA-256 fingerprint")).all():
        on_screen(button)
    page.goto("/tokens")
    for button in page.get_by_role("button", name=re.compile(r"^Revoke token")).all():
        on_screen(button)


def test_the_header_stays_on_one_line_at_1280_px(portal: PortalServer, new_tab: NewTab) -> None:
    """An operator's header (the most links) on the password page, and an organisation user's."""
    portal.add_user("operations.team@platform-operations.test", org=None, roles="operator")
    security, _ = org_with_users(portal, "acme")
    for email in ("operations.team@platform-operations.test", security):
        tab = new_tab()
        tab.page.set_viewport_size({"width": 1280, "height": 800})
        sign_in(tab, email)
        tab.page.goto("/account/password")
        height = tab.page.locator("header.top").evaluate("e => e.getBoundingClientRect().height")
        brand = tab.page.locator("header.top .brand").evaluate("e => e.getBoundingClientRect().height")
        assert height < brand * 2.5, f"the header wraps for {email}: {height}px high"


def test_sign_out(portal: PortalServer, new_tab: NewTab) -> None:
    security, _ = org_with_users(portal, "acme")
    tab = new_tab()
    page = tab.page
    sign_in(tab, security)
    expect(page.locator(".whoami")).to_contain_text(security)
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    assert not [c for c in tab.context.cookies() if c["name"] == "twofold_session"]
    page.goto("/security")
    expect(page).to_have_url(re.compile(r"/login\?next=/security$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_login_is_rate_limited(portal: PortalServer, new_tab: NewTab) -> None:
    security, _ = org_with_users(portal, "acme")
    tab = new_tab()
    page = tab.page
    for _ in range(5):
        response = sign_in(tab, security, password="wrong password!")
        assert response.status == 401
        expect(page.locator("main > .notice.err")).to_contain_text("Wrong email or password")
        expect(page.get_by_label("Email")).to_have_value(security)
    # The sixth attempt is refused before the password is even checked — the right one too.
    response = sign_in(tab, security, password=PASSWORD)
    assert response.status == 429
    assert int(response.headers["retry-after"]) > 0
    expect(page.locator("main > .notice.err")).to_contain_text("Too many failed sign-ins")
    expect(page).to_have_url(re.compile(r"/login$"))
    assert not [c for c in tab.context.cookies() if c["name"] == "twofold_session"]
    tab.expected_problem(r"status of (401|429)")


def test_another_site_cannot_sign_a_visitor_in(portal: PortalServer, new_tab: NewTab) -> None:
    """Login CSRF: a form on another site that posts the attacker's credentials to /login is
    refused, so the visitor is not silently signed in to the attacker's organisation."""
    security, _ = org_with_users(portal, "mallory")
    tab = new_tab()
    page = tab.page
    attacker = "https://attacker.example/"
    page.route(
        attacker,
        lambda route: route.fulfill(
            content_type="text/html",
            body=f"""<form method="post" action="{portal.url}/login">
                <input name="email" value="{security}"><input name="password" value="{PASSWORD}">
                <button>win a prize</button></form>""",
        ),
    )
    page.goto(attacker)
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as info:
        page.get_by_role("button", name="win a prize").click()
    assert info.value.status == 403
    expect(page.locator("main > .notice.err")).to_contain_text("Sign in from the portal's own sign-in page")
    tab.expected_problem(r"status of 403")
    assert not [c for c in tab.context.cookies() if c["name"] == "twofold_session"]
    # The portal's own form still works in the same browser.
    assert sign_in(tab, security).status == 303


def test_operator_creates_an_organisation_and_a_user(portal: PortalServer, new_tab: NewTab) -> None:
    portal.add_user("ops@platform.test", org=None, roles="operator")
    tab = new_tab()
    page = tab.page
    sign_in(tab, "ops@platform.test")
    # Operators land on their overview, organisation users on the dashboard.
    expect(page).to_have_url(re.compile(r"/admin/overview$"))
    page.get_by_role("link", name="Organisations").click()
    page.get_by_label("Id").fill("globex")
    page.get_by_label("Name").fill("Globex Corporation")
    page.get_by_role("button", name="Create organisation").click()
    expect(page.get_by_role("status")).to_have_text("Created organisation globex")
    expect(page.locator("table.list tbody")).to_contain_text("Globex Corporation")

    page.get_by_role("link", name="Users").click()
    page.locator("summary").click()  # one-time passwords, for machines without mail
    form = page.locator("details form")
    form.get_by_label("Email").fill("Hank@Globex.test")
    form.get_by_label("Organisation").select_option("globex")
    form.get_by_label("API Security").check()
    form.get_by_label("Developer").check()
    form.get_by_label("Password (10+ characters)").fill("a long enough password")
    page.get_by_role("button", name="Create user").click()
    expect(page.get_by_role("status")).to_have_text("Created user hank@globex.test")
    user_row = page.locator("#users tbody tr", has_text="hank@globex.test")
    expect(user_row).to_contain_text("globex")
    expect(user_row).to_contain_text("API Security, Developer")

    # The operator knows that password, so it is a one-time password: the new user's first
    # sign-in leads to choosing their own, and then to the Security page.
    other = new_tab()
    assert sign_in(other, "hank@globex.test", password="a long enough password").status == 303
    expect(other.page).to_have_url(re.compile(r"/account/password$"))
    expect(other.page.locator("#one-time-note")).to_be_visible()
    expect(other.page.get_by_label("Current password")).to_have_count(0)  # just typed: not asked again
    expect(other.page.get_by_role("navigation", name="Main")).to_have_count(0)  # nothing to go to yet
    other.page.get_by_label("New password (10 or more characters)").fill("hank's very own secret")
    other.page.get_by_label("New password again").fill("hank's very own secret")
    other.page.get_by_role("button", name="Set password").click()
    # Still signed in: an API Security user sets up the second factor next, then the Security page.
    expect(other.page.get_by_role("status")).to_have_text("Your password is set. Welcome!")
    assert len(enrol(other, "hank@globex.test")) == 10
    other.page.goto("/security")
    expect(other.page.get_by_role("button", name="Add Security")).to_be_visible()
    other.context.clear_cookies()
    assert sign_in(other, "hank@globex.test", password="hank's very own secret").status == 303  # + code
    expect(other.page).to_have_url(re.compile(r"/dashboard$"))

    # A refusal shows a message, not a stack trace.
    page.get_by_role("link", name="Organisations").click()
    page.get_by_label("Id").fill("globex")
    page.get_by_role("button", name="Create organisation").click()
    expect(page.locator("main > .notice.err")).to_contain_text("Organisation globex already exists")
    tab.expected_problem(r"status of 409")


def test_operator_turns_on_replay_protection_and_signed_responses(
    portal: PortalServer, new_tab: NewTab
) -> None:
    portal.add_user("ops-products@platform.test", org=None, roles="operator")
    tab = new_tab()
    page = tab.page
    sign_in(tab, "ops-products@platform.test", next_path="/admin/products")
    expect(page.get_by_role("heading", level=1)).to_have_text("API products")
    page.get_by_label("Id", exact=True).fill("ob-payments")
    page.get_by_label("Name", exact=True).fill("OB payments")
    page.get_by_label("Path prefix").fill("/ob/v3/payments")
    page.get_by_label("Upstream").fill("sandbox:payments")
    page.get_by_label("Signature", exact=True).select_option("required")
    page.get_by_label("Window (seconds; empty: off)").fill("120")
    page.get_by_label("Signing time field").fill("header:http://openbanking.org.uk/iat")
    page.get_by_label("Unique id field").fill("Data.Initiation.InstructionIdentification")
    page.get_by_label("The gateway signs JSON responses").check()
    page.get_by_role("button", name="Save API product").click()
    expect(page.get_by_role("status")).to_have_text("Saved API product ob-payments")
    row = page.locator("table.list tbody tr", has_text="ob-payments")
    expect(row).to_contain_text("± 120 s")
    expect(row).to_contain_text("header:http://openbanking.org.uk/iat")
    expect(row.locator("td").last).to_have_text("yes")
    saved = next(p for p in portal.call(portal.reg.list_products()) if p["id"] == "ob-payments")
    assert (saved["replay_window"], saved["replay_id"], saved["sign_responses"]) == (
        120,
        "Data.Initiation.InstructionIdentification",
        True,
    )
    # Replay protection without signed requests is refused with a message saying why.
    page.get_by_label("Id", exact=True).fill("ob-payments")
    page.get_by_label("Name", exact=True).fill("OB payments")
    page.get_by_label("Path prefix").fill("/ob/v3/payments")
    page.get_by_label("Upstream").fill("sandbox:payments")
    page.get_by_label("Signature", exact=True).select_option("none")
    page.get_by_label("Window (seconds; empty: off)").fill("120")
    page.get_by_role("button", name="Save API product").click()
    expect(page.locator("main > .notice.err")).to_contain_text(
        re.compile("replay protection needs signed requests", re.IGNORECASE)
    )
    tab.expected_problem(r"status of 400")


def test_developer_creates_a_project_and_adds_an_api_product(portal: PortalServer, new_tab: NewTab) -> None:
    _, developer = org_with_users(portal, "acme")
    portal.call(
        portal.reg.save_product(
            SYSTEM,
            "payments",
            name="Payments",
            path_prefix="/tsapi/v1/payments",
            upstream="sandbox:payments",
        )
    )
    tab = new_tab()
    page = tab.page
    sign_in(tab, developer, next_path="/projects")
    expect(page.get_by_role("heading", level=1)).to_have_text("Projects")
    page.get_by_label("Project name").fill("Treasury integration")
    page.get_by_role("button", name="Create project").click()
    expect(page.get_by_role("status")).to_have_text("Created project Treasury integration")
    project = page.locator("section.project", has=page.get_by_role("heading", name="Treasury integration"))
    expect(project.locator(".empty")).to_have_text("No API products yet.")
    project.get_by_label("API product").select_option("payments")
    project.get_by_label("Environment").select_option(label="Production")
    project.get_by_role("button", name="Add API product").click()
    expect(page.get_by_role("status")).to_have_text("Project updated")
    project = page.locator("section.project", has=page.get_by_role("heading", name="Treasury integration"))
    expect(project.locator("tbody tr")).to_have_count(1)
    expect(project.locator("tbody tr td").nth(0)).to_have_text("payments")
    expect(project.locator("tbody tr td").nth(1)).to_have_text("prod")
    (listed,) = portal.call(portal.reg.list_projects(portal.principal(developer)))
    assert listed["name"] == "Treasury integration"
    assert listed["products"] == [{"product": "payments", "environment": "prod"}]
