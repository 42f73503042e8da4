"""The portal application: wiring only (see pages.py and api.py for the handlers)."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from twofold.errors import TwofoldError
from twofold.portal import api, csr, notices, pages, pages_account, pages_dashboard
from twofold.portal.web import (
    CONFIG,
    CSRF,
    LIMITER,
    MAX_BODY,
    PRINCIPAL,
    REGISTRY,
    SESSION_COOKIE,
    Handler,
    LoginLimiter,
    PortalConfig,
    check_text,
    error_status,
    is_api,
    json_error,
    log_unexpected,
    render_error_json,
    security_headers,
)
from twofold.registry.service import Registry

HERE = Path(__file__).parent
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "file_too_large",
    415: "unsupported_media_type",
}


def sentence(text: object) -> str:
    """A message as a sentence on a page: capital first letter (the codes and messages of the
    API stay as they are)."""
    value = str(text)
    return value[:1].upper() + value[1:]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals become JSON (API) or a page (browser) with a 4xx; nothing leaks a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, f"http_{exc.status}")
        message = {
            413: f"the request body is larger than {MAX_BODY // 1024} KB; a certificate is a few KB",
            404: "no such page or endpoint",
            405: "method not allowed here",
            408: "the request body did not arrive in time; send the whole body at once",
        }.get(exc.status, exc.reason)
        if is_api(request):
            return json_error(exc.status, code, message)
        return await pages.render(
            request,
            "error.html",
            {},
            status=exc.status,
            error=TwofoldError(message, code=code, status=exc.status),
        )
    except TwofoldError as error:
        if is_api(request):
            return render_error_json(error)
        return await pages.render(request, "error.html", {}, status=error_status(error), error=error)
    except Exception as exc:
        log_unexpected(request, exc)
        if is_api(request):
            return json_error(500, "internal_error", "something went wrong on our side; it has been logged")
        return web.Response(status=500, text="Something went wrong on our side; it has been logged.")


def _printable_ascii(value: str) -> bool:
    """Tokens and session ids are URL-safe ASCII; header bytes beyond ASCII reach Python as
    lone surrogates (aiohttp decodes with surrogateescape), which nothing can hash or store."""
    return value.isascii() and value.isprintable()


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API: bearer tokens only (no cookies, so no CSRF). Pages: the session cookie."""
    registry = request.app[REGISTRY]
    for name, value in (*request.query.items(), *request.match_info.items()):
        check_text(value, f"the URL parameter {name[:40]!r}")
    if is_api(request):
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token or not _printable_ascii(token):
                return json_error(401, "token_invalid", "send the token as 'Authorization: Bearer <token>'")
            request[PRINCIPAL] = await registry.token_principal(token)
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and _printable_ascii(cookie):
            found = await registry.session_principal(cookie)
            if found is not None:
                request[PRINCIPAL], request[CSRF] = found
    return await handler(request)


def init_app(registry: Registry, config: PortalConfig | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[security_headers, errors, authenticate])
    app[REGISTRY] = registry
    app[CONFIG] = config or PortalConfig()
    app[LIMITER] = LoginLimiter()
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.globals["static"] = lambda name: f"/static/{name}"
    env.filters["sentence"] = sentence
    api.add_routes(app)
    app.router.add_routes(pages.routes)
    app.router.add_routes(csr.routes)
    app.router.add_routes(notices.routes)
    app.router.add_routes(pages_account.routes)
    app.router.add_routes(pages_dashboard.routes)
    app.router.add_static("/static", HERE / "static", append_version=True)
    return app
