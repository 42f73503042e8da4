"""What pages and the JSON API share: app keys, who is calling, errors, security headers,
login rate limiting."""

from __future__ import annotations

import datetime as dt
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from twofold.crypto.ca import LocalCA
from twofold.errors import TwofoldError
from twofold.issuing import IssuingCAs
from twofold.mail import Mailer
from twofold.registry.auth import Principal
from twofold.registry.rules import Forbidden, RegistryError, Unauthorized
from twofold.registry.service import DEFAULT_LINK_LIFETIME, Registry

log = logging.getLogger("twofold.portal")

SESSION_COOKIE = "twofold_session"
FLASH_COOKIE = "twofold_flash"
MAX_BODY = 1024 * 1024  # uploads are certificates: a few KB


@dataclass(frozen=True)
class PortalConfig:
    secure_cookies: bool = True
    title: str = "twofold developer portal"
    gateway_urls: tuple[tuple[str, str], ...] = ()  # (environment id, base URL) shown to users
    public_url: str = "https://localhost:8000"  # the portal as people reach it: links in mail
    mailer: Mailer | None = None  # None: the portal sends no mail (tests of other things)
    link_lifetime: dt.timedelta = DEFAULT_LINK_LIFETIME  # activation and password-reset links
    issuers: IssuingCAs | None = None  # the environments' issuing CAs (None: the portal issues nothing)
    notice_jwks: dict[str, Any] | None = None  # verifies the portal's signed expiry notices


REGISTRY = web.AppKey("registry", Registry)
CONFIG = web.AppKey("config", PortalConfig)
PRINCIPAL = web.RequestKey("principal", Principal)
CSRF = web.RequestKey("csrf", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def principal(request: web.Request) -> Principal | None:
    value: Principal | None = request.get(PRINCIPAL)
    return value


def require_principal(request: web.Request) -> Principal:
    who = principal(request)
    if who is None:
        raise Unauthorized("sign in first, or send an API token as 'Authorization: Bearer <token>'")
    return who


def require_operator(request: web.Request) -> Principal:
    who = require_principal(request)
    if not who.is_operator:
        raise Forbidden("only platform operators may do this", code="operator_only")
    return who


async def issuer_for(request: web.Request, env_id: str) -> LocalCA | None:
    """The CA that issues for ``env_id`` as the registry names it, if this portal holds its key."""
    issuers = request.app[CONFIG].issuers
    if issuers is None:
        return None
    try:
        expected = await request.app[REGISTRY].issuing_ca_pem(env_id)
    except TwofoldError:
        return None  # the registry says "no such environment" when asked to issue
    return issuers.get(env_id, expected)


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    # The portal is HTTPS only: browsers must never try it over plain HTTP (two years, as
    # Mozilla's guidelines say; browsers ignore the header on a plain-HTTP response).
    "Strict-Transport-Security": "max-age=63072000",
}


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On every answer — redirects too, which aiohttp raises as exceptions."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _secure(request, exc)
        raise
    _secure(request, response)
    return response


def _secure(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/static/"):  # static files are versioned (append_version)
        response.headers.setdefault("Cache-Control", "no-store")


class LoginLimiter:
    """At most ``attempts`` sign-in attempts per (client address, email) per ``window`` seconds,
    and per client address overall (×4), so guessing is slow and spraying is too.

    An attempt is counted *before* the password is checked (and taken back if it succeeds):
    concurrent attempts cannot all slip past the check while the slow argon2 checks run."""

    MAX_KEYS = 10_000

    def __init__(self, attempts: int = 5, window: float = 300.0) -> None:
        self.attempts = attempts
        self.window = window
        self._attempts: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._attempts.setdefault(key, deque())
        while times and times[0] < now - self.window:
            times.popleft()
        return times

    def begin(self, address: str, email: str) -> int:
        """Seconds to wait before trying again, or 0 — then the attempt is counted."""
        now = time.monotonic()
        keys = (((address, email.lower()), self.attempts), ((address, "*"), self.attempts * 4))
        for key, limit in keys:
            times = self._recent(key, now)
            if len(times) >= limit:
                return int(times[0] + self.window - now) + 1
        for key, _limit in keys:
            self._attempts[key].append(now)
        if len(self._attempts) > self.MAX_KEYS:
            self._evict(now)
        return 0

    def cancel(self, address: str, email: str) -> None:
        """The attempt could not be decided (the registry was unavailable): it does not count."""
        for key in ((address, email.lower()), (address, "*")):
            times = self._attempts.get(key)
            if times:
                times.pop()

    def succeeded(self, address: str, email: str) -> None:
        """A correct password: its attempts no longer count."""
        self._attempts.pop((address, email.lower()), None)
        overall = self._attempts.get((address, "*"))
        if overall:
            overall.pop()

    def _evict(self, now: float) -> None:
        """Bounded memory under a flood of distinct keys: drop expired keys, then the oldest."""
        for key in [k for k, times in self._attempts.items() if not times or times[-1] < now - self.window]:
            del self._attempts[key]
        while len(self._attempts) > self.MAX_KEYS // 2:
            del self._attempts[next(iter(self._attempts))]


LIMITER = web.AppKey("limiter", LoginLimiter)


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


class BadInput(RegistryError):
    code = "bad_request"


def check_text(value: str, what: str) -> str:
    """Text the registry can store on every backend: no NUL (PostgreSQL refuses it in text) and
    no unpaired UTF-16 surrogate (JSON can spell one, "\\ud800", but it is not text)."""
    if "\x00" in value:
        raise BadInput(f"{what} contains a NUL character; send plain text", code="text_invalid")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(
            f"{what} contains an unpaired UTF-16 surrogate (such as \\ud800), which is not text; "
            "send valid Unicode",
            code="text_invalid",
        ) from None
    return value


def check_json_text(body: Any) -> None:
    """Every string of a parsed JSON body, keys included, is storable text (see check_text).
    Iterative: a body nested as deeply as the parser allows must not exhaust the stack here."""
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item, "the JSON body")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The posted form (urlencoded or multipart), or a 400 saying how to send one: a multipart
    body without its boundary, bytes that are not UTF-8 or an unknown charset are the client's
    mistake, not the server's. Text fields must be storable text (see check_text)."""
    try:
        form = await request.post()
    except web.HTTPException:
        raise
    except (ValueError, LookupError, HttpProcessingError) as exc:  # UnicodeDecodeError: a ValueError
        raise BadInput(
            "the form could not be read (" + _form_problem(exc) + "); send it as "
            "application/x-www-form-urlencoded or multipart/form-data with its boundary, in UTF-8",
            code="bad_form",
        ) from None
    for name, value in form.items():
        check_text(name, "a form field name")
        if isinstance(value, str):
            check_text(value, f"the form field {name[:40]!r}")
    return form


def _form_problem(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8"
    if isinstance(exc, LookupError):
        return "its charset is unknown"
    return "it is not a well-formed form"


def error_status(error: TwofoldError) -> int:
    return error.status if 400 <= error.status < 600 else 400


def render_error_json(error: TwofoldError) -> web.Response:
    return with_retry_after(json_error(error_status(error), error.code, error.message), error)


def with_retry_after(response: web.Response, error: TwofoldError | None) -> web.Response:
    """A refusal that will pass later (registry unavailable or busy) says when to try again."""
    if error is not None and error.retry_after:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def log_unexpected(request: web.Request, exc: BaseException) -> None:
    # The request line, the exception type and where it happened — not its message: database
    # errors quote statement parameters (certificate bytes, hashes), bodies may hold secrets.
    where = "".join(traceback.format_tb(exc.__traceback__)[-3:])
    log.error("unexpected %s on %s %s\n%s", type(exc).__name__, request.method, request.path, where)
