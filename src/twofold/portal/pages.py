"""Server-rendered pages. Forms post back with a CSRF token; a refusal re-renders the page
with the message and a 4xx status, a success redirects with a flash message."""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp_jinja2
from aiohttp import web

from twofold.errors import TwofoldError
from twofold.portal import notices
from twofold.portal.web import (
    CONFIG,
    CSRF,
    FLASH_COOKIE,
    LIMITER,
    REGISTRY,
    SESSION_COOKIE,
    client_address,
    error_status,
    principal,
    read_form,
    with_retry_after,
)
from twofold.registry.auth import ROLE_LABELS, Principal
from twofold.registry.rules import Forbidden, RegistryError
from twofold.registry.service import Registry

routes = web.RouteTableDef()


def _registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


PASSWORD_PAGE = "/account/password"
CODE_PAGE = "/login/code"
ENROL_PAGE = "/account/mfa"


def _signed_in(
    request: web.Request, *, allow_one_time: bool = False, allow_second_factor_pending: bool = False
) -> Principal:
    """The signed-in user, or a redirect to the step their sign-in still needs: the
    authenticator code (enrolled), then a new password (one-time password), then setting
    up the second factor (API Security users and operators who have none yet)."""
    who = principal(request)
    if who is None:
        raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs)}")
    if allow_second_factor_pending:
        return who
    if who.mfa_enrolled and not who.mfa_passed:
        raise web.HTTPSeeOther(CODE_PAGE)
    if who.must_change_password and not allow_one_time:
        raise web.HTTPSeeOther(PASSWORD_PAGE)  # a one-time password opens this page only
    if who.needs_second_factor and not allow_one_time:
        raise web.HTTPSeeOther(ENROL_PAGE)
    return who


def start_session(
    request: web.Request, cookie: str, location: str, flash: str | None = None
) -> web.HTTPSeeOther:
    """A redirect that sets the new session's cookie."""
    response = _redirect(request, location, flash)
    _set_session_cookie(request, response, cookie)
    return response


def same_site_form(request: web.Request, what: str) -> None:
    """Forms that work without a session (sign-in, links): browsers say where a form came
    from; another site must not post them for a visitor. Scripts send no Sec-Fetch-Site."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden(what, code="cross_site_login")


async def _form(request: web.Request) -> dict[str, Any]:
    """The posted form, after checking its CSRF token against the session's."""
    form = await read_form(request)
    sent = str(form.get("csrf_token", ""))
    expected = request.get(CSRF, "")
    if not expected or not hmac.compare_digest(sent, expected):
        raise Forbidden(
            "the form expired or did not come from this portal; reload the page and try again",
            code="csrf_failed",
        )
    return dict(form)


def _redirect(request: web.Request, location: str, flash: str | None = None) -> web.HTTPSeeOther:
    response = web.HTTPSeeOther(location)
    if flash:
        response.set_cookie(
            FLASH_COOKIE,
            quote(flash),
            max_age=60,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=request.app[CONFIG].secure_cookies,
        )
    return response


async def render(
    request: web.Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    error: TwofoldError | None = None,
) -> web.Response:
    who = principal(request)
    flash = request.cookies.get(FLASH_COOKIE)
    base = {
        "who": who,
        "role_labels": ROLE_LABELS,
        "csrf_token": request.get(CSRF, ""),
        "title": request.app[CONFIG].title,
        "flash": _unquote(flash) if flash else None,
        "error": error,
        "path": request.path,
        "expiring": await notices.expiring(request),  # the expiry banner (_expiry_banner.html)
    }
    response = aiohttp_jinja2.render_template(template, request, {**base, **context}, status=status)
    if flash:
        response.del_cookie(FLASH_COOKIE, path="/")
    return with_retry_after(response, error)


def _unquote(value: str) -> str:
    return unquote(value)[:300]


# --- sign in / out ---------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this portal, else home ("/"), which sends
    operators to their pages and organisation users to Security."""
    # Browsers read "/\\host" as "//host" and drop tabs and newlines from URLs ("/\t/host"):
    # a local path starts with one slash and holds no backslash, space or control character.
    if not value or not value.startswith("/") or value.startswith("//"):
        return "/"
    if any(c == "\\" or ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


@routes.get("/login")
async def login_page(request: web.Request) -> web.Response:
    return await render(request, "login.html", {"next": _safe_next(request.query.get("next")), "email": ""})


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    # Login CSRF: another site must not sign a visitor in to an account of its choosing (whose
    # organisation would then receive the visitor's certificates).
    same_site_form(request, "sign in from the portal's own sign-in page")
    form = await read_form(request)
    email = str(form.get("email", "")).strip()
    password = str(form.get("password", ""))
    next_url = _safe_next(str(form.get("next", "")))
    limiter = request.app[LIMITER]
    address = client_address(request)
    wait = limiter.begin(address, email)
    context = {"next": next_url, "email": email}
    if wait:
        error = RegistryError(
            f"too many failed sign-ins; try again in {wait} seconds", code="login_rate_limited", status=429
        )
        response = await render(request, "login.html", context, status=429, error=error)
        response.headers["Retry-After"] = str(wait)
        return response
    try:
        who = await _registry(request).authenticate(email, password)
    except TwofoldError as error:
        if error.status >= 500:  # the registry could not decide: not a failed sign-in
            limiter.cancel(address, email)
            return await render(request, "login.html", context, status=error.status, error=error)
        return await render(request, "login.html", context, status=401, error=error)
    cookie, _csrf = await _registry(request).create_session(who)
    if who.mfa_enrolled:
        # Earlier failures are forgiven only once the code passes: wrong codes count with wrong
        # passwords, so the password cannot be used to reset the count for code guessing.
        limiter.cancel(address, email)  # this attempt passed; the earlier failures stay
        raise start_session(request, cookie, f"{CODE_PAGE}?next={quote(next_url)}")
    limiter.succeeded(address, email)
    raise start_session(request, cookie, next_url)


def _set_session_cookie(request: web.Request, response: web.StreamResponse, cookie: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=request.app[CONFIG].secure_cookies,
        max_age=8 * 3600,
    )


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    await _form(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        await _registry(request).end_session(cookie)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


@routes.get("/")
async def home(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    raise web.HTTPSeeOther("/admin/overview" if who.is_operator else "/dashboard")


# --- security: certificates ----------------------------------------------------------------------


async def _security(
    request: web.Request,
    env_id: str | None,
    *,
    status: int = 200,
    error: TwofoldError | None = None,
    use: str = "mtls",
    upload_error: bool = False,
    **extra: Any,
) -> web.Response:
    """The Security page; ``extra`` goes to the template (e.g. which form an error is about)."""
    who = _signed_in(request)
    registry = _registry(request)
    envs = await registry.list_environments()
    if not envs:
        raise RegistryError("no environments are configured yet", code="environment_not_found")
    current = next((e for e in envs if e["id"] == env_id), envs[0])
    org = request.query.get("org") if who.is_operator else None
    rows = (
        await registry.list_certificates(who, current["id"], org=org)
        if (who.org_id or who.is_operator)
        else []
    )
    gateway = dict(request.app[CONFIG].gateway_urls).get(current["id"])
    return await render(
        request,
        "security.html",
        {
            "envs": envs,
            "env": current,
            "certificates": rows,
            "can_manage": who.manages_certificates,
            "use": use,
            "gateway": gateway,
            # An upload (or a CSR) refused: the dialog opens again and shows why — not the page
            # banner too.
            "error_in_dialog": error is not None
            and who.manages_certificates
            and (upload_error or extra.get("form") == "csr"),
            "issued": await _issued(request, rows),
            **extra,
        },
        status=status,
        error=error,
    )


async def _issued(request: web.Request, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The certificate just issued from a CSR (``?issued=<fingerprint>``), to offer its download."""
    wanted = request.query.get("issued", "").lower()
    return next((row for row in rows if wanted and row["fingerprint"] == wanted), None)


@routes.get("/security")
async def security(request: web.Request) -> web.Response:
    return await _security(request, request.query.get("env"))


@routes.post("/security/certificates")
async def add_certificate(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    form = await _form(request)
    env_id, use = str(form.get("environment", "")), str(form.get("use", ""))
    upload = form.get("file")
    data = upload.file.read() if isinstance(upload, web.FileField) else b""
    try:
        row = await _registry(request).add_certificate(who, env_id, use, data)
    except TwofoldError as error:
        return await _security(
            request, env_id, status=error_status(error), error=error, use=use, upload_error=True
        )
    raise _redirect(
        request,
        f"/security?env={quote(env_id)}",
        f"Added {row['use_label']} certificate {row['common_name']} ({row['fingerprint'][:16]}…)",
    )


@routes.post("/security/certificates/remove")
async def remove_certificate(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    form = await _form(request)
    env_id, fingerprint = str(form.get("environment", "")), str(form.get("fingerprint", ""))
    try:
        row = await _registry(request).remove_certificate(who, env_id, fingerprint)
    except TwofoldError as error:
        return await _security(request, env_id, status=error_status(error), error=error)
    raise _redirect(request, f"/security?env={quote(env_id)}", f"Removed certificate {row['common_name']}")


# --- projects ----------------------------------------------------------------------------------


async def _projects(
    request: web.Request, *, status: int = 200, error: TwofoldError | None = None
) -> web.Response:
    who = _signed_in(request)
    registry = _registry(request)
    projects = (
        await registry.list_projects(who, request.query.get("org")) if (who.org_id or who.is_operator) else []
    )
    return await render(
        request,
        "projects.html",
        {
            "projects": projects,
            "products": await registry.list_products(),
            "envs": await registry.list_environments(),
            "can_manage": who.manages_projects,
        },
        status=status,
        error=error,
    )


@routes.get("/projects")
async def projects(request: web.Request) -> web.Response:
    return await _projects(request)


@routes.post("/projects")
async def create_project(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    form = await _form(request)
    try:
        project = await _registry(request).create_project(who, str(form.get("name", "")))
    except TwofoldError as error:
        return await _projects(request, status=error_status(error), error=error)
    raise _redirect(request, "/projects", f"Created project {project['name']}")


@routes.post("/projects/{project}/products")
async def project_product(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    form = await _form(request)
    try:
        project_id = int(request.match_info["project"])
        present = form.get("action", "add") == "add"
        await _registry(request).set_project_product(
            who, project_id, str(form.get("product", "")), str(form.get("environment", "")), present=present
        )
    except ValueError:
        return await _projects(
            request, status=404, error=RegistryError("no such project", code="project_not_found")
        )
    except TwofoldError as error:
        return await _projects(request, status=error_status(error), error=error)
    raise _redirect(request, "/projects", "Project updated")


@routes.post("/projects/{project}/delete")
async def delete_project(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    await _form(request)
    try:
        await _registry(request).delete_project(who, int(request.match_info["project"]))
    except ValueError:
        return await _projects(
            request, status=404, error=RegistryError("no such project", code="project_not_found")
        )
    except TwofoldError as error:
        return await _projects(request, status=error_status(error), error=error)
    raise _redirect(request, "/projects", "Project deleted")


# --- account ---------------------------------------------------------------------------------------


async def _password_page(
    request: web.Request, *, status: int = 200, error: TwofoldError | None = None
) -> web.Response:
    who = _signed_in(request, allow_one_time=True)
    return await render(
        request, "password.html", {"one_time": who.must_change_password}, status=status, error=error
    )


@routes.get(PASSWORD_PAGE)
async def password_page(request: web.Request) -> web.Response:
    return await _password_page(request)


@routes.post(PASSWORD_PAGE)
async def change_password(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request, allow_one_time=True)
    form = await _form(request)
    new, confirm = str(form.get("new_password", "")), str(form.get("confirm_password", ""))
    registry = _registry(request)
    try:
        if new != confirm:
            raise RegistryError(
                "the two new passwords differ; type the same one twice", code="password_mismatch"
            )
        if who.must_change_password:
            await registry.replace_one_time_password(who, new)
        else:
            await registry.change_own_password(who, str(form.get("current_password", "")), new)
    except TwofoldError as error:
        status = (
            400 if error.status == 401 else error_status(error)
        )  # a wrong current password is a form error
        return await _password_page(request, status=status, error=error)
    if not who.must_change_password:
        # set_password ended every session, this one included: sign in again with the new password.
        response = _redirect(request, "/login", "Password changed; sign in with the new one")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response
    # The first sign-in: every session ended, and this browser goes on in a new one.
    cookie, _csrf = await registry.create_session(who)
    response = _redirect(request, "/", "Your password is set. Welcome!")
    _set_session_cookie(request, response, cookie)
    raise response


# --- API tokens ------------------------------------------------------------------------------------


@routes.get("/tokens")
async def tokens(request: web.Request) -> web.Response:
    who = _signed_in(request)
    return await render(
        request, "tokens.html", {"tokens": await _registry(request).list_tokens(who), "new_token": None}
    )


@routes.post("/tokens")
async def create_token(request: web.Request) -> web.Response:
    who = _signed_in(request)
    form = await _form(request)
    token = await _registry(request).create_token(who, str(form.get("name", "")).strip() or "api")
    return await render(
        request,
        "tokens.html",
        {"tokens": await _registry(request).list_tokens(who), "new_token": token},
        status=201,
    )


@routes.post("/tokens/{token}/revoke")
async def revoke_token(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    await _form(request)
    try:
        await _registry(request).revoke_token(who, int(request.match_info["token"]))
    except ValueError:
        raise RegistryError("no such token", code="token_not_found", status=404) from None
    raise _redirect(request, "/tokens", "Token revoked")


# --- operators -------------------------------------------------------------------------------------


def _operator(request: web.Request) -> Principal:
    who = _signed_in(request)
    if not who.is_operator:
        raise Forbidden("only platform operators may open this page", code="operator_only")
    return who


async def _admin(
    request: web.Request, template: str, *, status: int = 200, error: TwofoldError | None = None
) -> web.Response:
    who = _operator(request)
    registry = _registry(request)
    context: dict[str, Any] = {
        "orgs": await registry.list_orgs(who),
        "users": await registry.list_users(who),
        "invitations": await registry.list_invitations(who),
        "envs": await registry.list_environments(),
        "products": await registry.list_products(),
    }
    return await render(request, template, context, status=status, error=error)


@routes.get("/admin/organisations")
async def admin_orgs(request: web.Request) -> web.Response:
    return await _admin(request, "admin_orgs.html")


@routes.post("/admin/organisations")
async def admin_add_org(request: web.Request) -> web.StreamResponse:
    who = _operator(request)
    form = await _form(request)
    try:
        org = await _registry(request).add_org(
            who, str(form.get("slug", "")), str(form.get("name", "")) or None
        )
    except TwofoldError as error:
        return await _admin(request, "admin_orgs.html", status=error_status(error), error=error)
    raise _redirect(request, "/admin/organisations", f"Created organisation {org['slug']}")


@routes.get("/admin/users")
async def admin_users(request: web.Request) -> web.Response:
    return await _admin(request, "admin_users.html")


@routes.post("/admin/users")
async def admin_add_user(request: web.Request) -> web.StreamResponse:
    who = _operator(request)
    form = await read_form(request)
    await _form(request)
    roles = [str(r) for r in form.getall("roles", [])]
    try:
        user = await _registry(request).add_user(
            who,
            str(form.get("email", "")),
            org=str(form.get("organisation", "")) or None,
            roles=roles,
            password=str(form.get("password", "")) or None,
            one_time=True,  # the operator knows it: the user chooses their own at first sign-in
        )
    except TwofoldError as error:
        return await _admin(request, "admin_users.html", status=error_status(error), error=error)
    raise _redirect(request, "/admin/users", f"Created user {user['email']}")


@routes.get("/admin/environments")
async def admin_envs(request: web.Request) -> web.Response:
    return await _admin(request, "admin_envs.html")


@routes.post("/admin/environments")
async def admin_save_env(request: web.Request) -> web.StreamResponse:
    who = _operator(request)
    form = await _form(request)
    upload = form.get("ca_file")
    ca_pem = (
        upload.file.read().decode("ascii", "replace")
        if upload is not None and hasattr(upload, "file")
        else None
    )
    port = str(form.get("gateway_port", "")).strip()
    try:
        env = await _registry(request).save_environment(
            who,
            str(form.get("id", "")),
            name=str(form.get("name", "")) or None,
            allow_self_signed=form.get("allow_self_signed") == "on",
            ca_pem=ca_pem or None,
            gateway_port=int(port) if port.isdigit() else None,
        )
    except TwofoldError as error:
        return await _admin(request, "admin_envs.html", status=error_status(error), error=error)
    raise _redirect(request, "/admin/environments", f"Saved environment {env['id']}")


@routes.get("/admin/products")
async def admin_products(request: web.Request) -> web.Response:
    return await _admin(request, "admin_products.html")


@routes.post("/admin/products")
async def admin_save_product(request: web.Request) -> web.StreamResponse:
    who = _operator(request)
    form = await read_form(request)
    await _form(request)
    try:
        product = await _registry(request).save_product(
            who,
            str(form.get("id", "")),
            name=str(form.get("name", "")),
            path_prefix=str(form.get("path_prefix", "")),
            upstream=str(form.get("upstream", "")),
            signature=str(form.get("signature", "required")),
            content_types=[str(c) for c in form.getall("content_types", [])] or None,
            **_product_protection(form),
        )
    except TwofoldError as error:
        return await _admin(request, "admin_products.html", status=error_status(error), error=error)
    raise _redirect(request, "/admin/products", f"Saved API product {product['id']}")


def _product_protection(form: Any) -> dict[str, Any]:
    """Replay protection and signed responses as the product form sets them (the whole form
    is the product: an empty window turns replay protection off)."""
    window = str(form.get("replay_window", "")).strip()
    if window and not window.isdigit():
        raise RegistryError("the replay window is a whole number of seconds", code="product_invalid")
    return {
        "replay_window": int(window) if window else 0,
        "replay_iat": str(form.get("replay_iat", "")).strip() or "iat",
        "replay_id": str(form.get("replay_id", "")).strip() or "jti",
        "sign_responses": form.get("sign_responses") == "on",
    }


@routes.get("/audit")
async def audit_page(request: web.Request) -> web.Response:
    who = _signed_in(request)
    registry = _registry(request)
    entries = await registry.audit_entries(who, limit=300)
    report = await registry.verify_audit() if who.is_operator else None
    return await render(request, "audit.html", {"entries": entries, "report": report})
