""" "Submit a CSR" in a real browser (Chromium through Playwright, as tests/test_portal_browser.py
drives it): the API Security user submits a CSR in the Add Security dialog of Production, the
environment's CA issues the certificate, it is registered and offered for download with its
chain; a CSR for another organisation's Common Name is refused in the dialog."""

# The portal suite's fixtures are imported by name, so pytest finds them here; tests take them
# as arguments, which ruff reads as redefinitions.
# ruff: noqa: F401, F811

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from portalkit import PROD_ISSUER, PortalServer, pem, self_signed
from test_portal_browser import (  # the browser fixtures and sign-in of the portal suite
    NewTab,
    browser,
    new_tab,
    org_with_users,
    portal,
    sign_in,
    tabs,
)
from twofold.crypto import certs, keys

pytestmark = pytest.mark.browser

with contextlib.suppress(ImportError):  # without Playwright the browser fixture reports NOT RUN
    from playwright.sync_api import Page, expect


def submit_csr(page: Page, path: Path, *, use: str = "MTLS", days: str = "") -> int:
    page.get_by_role("button", name="Add Security").click()
    form = page.locator("#csr-form")
    expect(form.get_by_role("heading", name="Or submit a CSR")).to_be_visible()
    form.get_by_label("Certificate use").select_option(label=use)
    form.get_by_label("CSR file").set_input_files(str(path))
    if days:
        form.get_by_label(re.compile("Validity in days")).fill(days)
    with page.expect_response(lambda r: r.url.endswith("/security/certificates/request")) as info:
        form.get_by_role("button", name="Submit CSR").click()
    page.wait_for_load_state()
    return info.value.status


def test_submit_a_csr_and_download_the_issued_certificate(
    portal: PortalServer, new_tab: NewTab, tmp_path: Path
) -> None:
    security, _ = org_with_users(portal, "acme")
    key = keys.generate_private_key("ec")
    (tmp_path / "acme.csr").write_bytes(certs.csr_pem(certs.build_csr(key, "/O=Acme/CN=acme-prod-web")))
    tab = new_tab()
    page = tab.page
    sign_in(tab, security, next_path="/security")  # users land on the dashboard
    # Client Testing has no issuing CA: its dialog offers the upload only.
    page.get_by_role("button", name="Add Security").click()
    expect(page.get_by_role("dialog", name="Add certificate")).to_be_visible()
    expect(page.locator("#csr-form")).to_have_count(0)
    page.goto("/security?env=prod")

    assert submit_csr(page, tmp_path / "acme.csr", days="30") == 303
    expect(page).to_have_url(re.compile(r"env=prod&issued=[0-9a-f]{64}$"))
    notice = page.locator("#issued")
    expect(notice).to_contain_text("acme-prod-web")
    expect(notice).to_contain_text("serial")
    row = page.locator("#certificates tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("acme-prod-web")
    expect(row).to_contain_text("(30 days left)")

    with page.expect_download() as info:
        notice.get_by_role("link", name="certificate (PEM)").click()
    issued = certs.load_certificate(Path(info.value.path()).read_bytes())
    assert info.value.suggested_filename == "acme-prod-web.pem"
    assert keys.public_key_bytes(issued.public_key()) == keys.public_key_bytes(key)  # type: ignore[arg-type]
    issued.verify_directly_issued_by(PROD_ISSUER.certificate)
    with page.expect_download() as info:
        notice.get_by_role("link", name="CA chain (PEM)").click()
    assert Path(info.value.path()).read_bytes() == pem(PROD_ISSUER.certificate)


def test_a_csr_for_another_organisation_s_name_is_refused_in_the_dialog(
    portal: PortalServer, new_tab: NewTab, tmp_path: Path
) -> None:
    security, _ = org_with_users(portal, "acme")
    globex, _ = org_with_users(portal, "globex")
    portal.register(portal.principal(globex), "cat", "mtls", self_signed("globex-client"))
    csr = certs.build_csr(keys.generate_private_key("ec"), "/O=Acme/CN=globex-client")
    (tmp_path / "taken.csr").write_bytes(certs.csr_pem(csr))
    tab = new_tab()
    tab.expected_problem("status of 409")
    page = tab.page
    sign_in(tab, security)
    page.goto("/security?env=prod")
    assert submit_csr(page, tmp_path / "taken.csr") == 409
    dialog = page.get_by_role("dialog", name="Add certificate")
    expect(dialog).to_be_visible()  # opened again, with the reason next to the CSR form
    expect(dialog.locator("#csr-error")).to_contain_text("belongs to another organisation")
    expect(dialog.locator("#add-error")).to_have_count(0)
    assert portal.certificates(org="acme", env="prod") == []
