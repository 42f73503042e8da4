"""Account pages: the second factor (sign-in code, enrolment with a QR code and recovery
codes), e-mailed links (activation of an invited account, password reset) and asking for a
new link."""

from __future__ import annotations

from typing import Any

import segno
from aiohttp import web

from twofold.errors import TwofoldError
from twofold.portal.mails import send_in_background
from twofold.portal.pages import (
    CODE_PAGE,
    ENROL_PAGE,
    _form,
    _redirect,
    _registry,
    _safe_next,
    _signed_in,
    render,
    same_site_form,
    start_session,
)
from twofold.portal.web import CONFIG, LIMITER, SESSION_COOKIE, client_address, error_status, read_form
from twofold.registry.rules import RegistryError
from twofold.registry.service import LinkInvalid

routes = web.RouteTableDef()


def _qr_svg(uri: str) -> str:
    """The otpauth:// URI as an SVG QR code, made here (no external service sees the secret)."""
    return str(segno.make(uri, error="m").svg_data_uri(scale=5, border=2))


# --- the sign-in code ----------------------------------------------------------------------


@routes.get(CODE_PAGE)
async def code_page(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request, allow_second_factor_pending=True)
    if not who.mfa_enrolled or who.mfa_passed:
        raise web.HTTPSeeOther("/")
    return await render(request, "login_code.html", {"next": _safe_next(request.query.get("next"))})


@routes.post(CODE_PAGE)
async def check_code(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request, allow_second_factor_pending=True)
    form = await _form(request)
    next_url = _safe_next(str(form.get("next", "")))
    limiter, address = request.app[LIMITER], client_address(request)
    wait = limiter.begin(address, who.name)  # counted with the password attempts
    if wait:
        error = RegistryError(
            f"too many failed sign-ins; try again in {wait} seconds", code="login_rate_limited", status=429
        )
        response = await render(request, "login_code.html", {"next": next_url}, status=429, error=error)
        response.headers["Retry-After"] = str(wait)
        return response
    try:
        result = await _registry(request).mfa_verify(
            request.cookies.get(SESSION_COOKIE, ""), str(form.get("code", ""))
        )
    except TwofoldError as error:
        return await render(
            request, "login_code.html", {"next": next_url}, status=error_status(error), error=error
        )
    limiter.succeeded(address, who.name)
    flash = None
    if result["method"] == "recovery_code":
        flash = f"Signed in with a recovery code; {result['recovery_codes_left']} left."
    raise _redirect(request, next_url, flash)


# --- enrolment -----------------------------------------------------------------------------


@routes.get(ENROL_PAGE)
async def enrol_page(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request, allow_second_factor_pending=True)
    if who.mfa_enrolled:
        return await render(request, "mfa.html", {"enrolled": True})
    started = await _registry(request).mfa_begin(who)
    return await render(
        request,
        "mfa.html",
        {
            "enrolled": False,
            "secret": started["secret"],
            "qr": _qr_svg(started["uri"]),
            "uri": started["uri"],
        },
    )


@routes.post(ENROL_PAGE)
async def enrol(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request, allow_second_factor_pending=True)
    form = await _form(request)
    registry = _registry(request)
    try:
        codes = await registry.mfa_confirm(
            who, str(form.get("code", "")), cookie=request.cookies.get(SESSION_COOKIE)
        )
    except TwofoldError as error:
        started = await registry.mfa_begin(who) if not who.mfa_enrolled else None
        context: dict[str, Any] = {"enrolled": who.mfa_enrolled}
        if started:
            context |= {"secret": started["secret"], "qr": _qr_svg(started["uri"]), "uri": started["uri"]}
        return await render(request, "mfa.html", context, status=error_status(error), error=error)
    return await render(request, "mfa_codes.html", {"codes": codes}, status=201)


# --- e-mailed links ------------------------------------------------------------------------


@routes.get("/account/recover")
async def recover_page(request: web.Request) -> web.Response:
    return await render(request, "recover.html", {"sent": False, "email": ""})


@routes.post("/account/recover")
async def recover(request: web.Request) -> web.Response:
    """One answer whatever the address: whether an account exists is not revealed, and the
    mail goes out in the background so the answer's timing does not tell either."""
    same_site_form(request, "ask for a link from the portal's own page")
    form = await read_form(request)
    email = str(form.get("email", "")).strip()
    limiter, address = request.app[LIMITER], client_address(request)
    wait = limiter.begin(address, f"link:{email.lower()}")
    if wait:
        error = RegistryError(
            f"too many requests; try again in {wait} seconds", code="link_rate_limited", status=429
        )
        return await render(request, "recover.html", {"sent": False, "email": email}, status=429, error=error)
    config = request.app[CONFIG]
    link = await _registry(request).request_link(email, config.link_lifetime) if "@" in email else None
    if link is not None:
        send_in_background(config.mailer, config.public_url, link)
    return await render(request, "recover.html", {"sent": True, "email": email})


async def _link_page(
    request: web.Request, token: str, *, status: int = 200, error: TwofoldError | None = None
) -> web.Response:
    try:
        link = await _registry(request).check_link(token)
    except LinkInvalid as invalid:
        return await render(request, "link_invalid.html", {}, status=invalid.status, error=invalid)
    return await render(request, "link.html", {"link": link, "token": token}, status=status, error=error)


@routes.get("/account/link/{token}")
async def link_page(request: web.Request) -> web.Response:
    return await _link_page(request, request.match_info["token"])


@routes.post("/account/link/{token}")
async def use_link(request: web.Request) -> web.StreamResponse:
    same_site_form(request, "choose the password on the portal's own page")
    token = request.match_info["token"]
    form = await read_form(request)
    new, confirm = str(form.get("new_password", "")), str(form.get("confirm_password", ""))
    registry = _registry(request)
    try:
        if new != confirm:
            raise RegistryError("the two passwords differ; type the same one twice", code="password_mismatch")
        who, done = await registry.use_link(token, new)
    except LinkInvalid as invalid:
        return await render(request, "link_invalid.html", {}, status=invalid.status, error=invalid)
    except TwofoldError as error:
        return await _link_page(request, token, status=error_status(error), error=error)
    cookie, _csrf = await registry.create_session(who)
    if done["purpose"] == "activate":
        flash = "Your account is active."
        if who.mfa_required:
            flash += " Set up your second factor to continue."
    else:
        kept = []
        if done["tokens_kept"]:
            kept.append(
                f"your {done['tokens_kept']} API token(s) still work — revoke them on API tokens if they leaked"
            )
        if done["second_factor_kept"]:
            kept.append("your second factor is unchanged")
        flash = (
            "Password changed; every other session was signed out"
            + (f"; {'; '.join(kept)}" if kept else "")
            + "."
        )
    raise start_session(request, cookie, "/", flash)
