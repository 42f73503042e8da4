"""JSON API of invitations, second-factor resets and the dashboards."""

from __future__ import annotations

from aiohttp import web

from twofold.portal.api_base import _field, _json_body, _registry
from twofold.portal.mails import require_mailer, send_link
from twofold.portal.openapi import Route
from twofold.portal.web import CONFIG, require_operator, require_principal
from twofold.registry.rules import RegistryError

_STR = {"type": "string"}
_ROLES = {"type": "array", "items": {"type": "string", "enum": ["api_security", "developer", "operator"]}}


def _env(request: web.Request) -> str:
    env = request.query.get("env")
    if not env:
        raise RegistryError("say which environment: ?env=cat", code="field_missing")
    return env


async def invitations(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(await _registry(request).list_invitations(who, request.query.get("org")))


async def invite(request: web.Request) -> web.Response:
    who = require_principal(request)
    body = await _json_body(request)
    config = request.app[CONFIG]
    require_mailer(config.mailer)
    link = await _registry(request).invite(
        who,
        _field(body, "email"),
        org=_field(body, "organisation", required=False),
        roles=_field(body, "roles", list),
        lifetime=config.link_lifetime,
    )
    await send_link(config.mailer, config.public_url, link)
    return web.json_response(
        {
            "email": link.email,
            "organisation": link.organisation,
            "roles": list(link.roles),
            "expires_at": link.expires_at.isoformat(timespec="seconds"),
            "mail": "sent",
        },
        status=201,
    )


async def reset_second_factor(request: web.Request) -> web.Response:
    who = require_operator(request)
    return web.json_response(await _registry(request).mfa_reset(who, request.match_info["email"]))


async def dashboard(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(
        await _registry(request).dashboard(who, _env(request), org=request.query.get("org"))
    )


async def calls(request: web.Request) -> web.Response:
    who = require_principal(request)
    return web.json_response(
        await _registry(request).recent_calls(who, _env(request), org=request.query.get("org"))
    )


async def overview(request: web.Request) -> web.Response:
    who = require_operator(request)
    return web.json_response(await _registry(request).overview(who))


ACCOUNT_ROUTES: list[Route] = [
    Route(
        "GET",
        "/api/v1/invitations",
        invitations,
        "Invited users who have not activated yet (operators: all, ?org=; others: their organisation)",
        query=("org",),
        tags=("users",),
    ),
    Route(
        "POST",
        "/api/v1/invitations",
        invite,
        "Invite a user: an e-mail with a single-use activation link. Roles never above the inviter's own",
        "operators; API Security users (their own organisation)",
        {
            "type": "object",
            "required": ["email", "roles"],
            "properties": {"email": _STR, "organisation": _STR, "roles": _ROLES},
        },
        tags=("users",),
    ),
    Route(
        "DELETE",
        "/api/v1/users/{email}/mfa",
        reset_second_factor,
        "Reset a user's lost second factor (signed out everywhere; enrols again at the next sign-in)",
        "operators",
        tags=("users",),
    ),
    Route(
        "GET",
        "/api/v1/dashboard",
        dashboard,
        "Onboarding checklist, certificates expiring within 30 days and recent gateway calls",
        query=("env", "org"),
        tags=("dashboard",),
    ),
    Route(
        "GET",
        "/api/v1/calls",
        calls,
        "The organisation's last 100 gateway calls in an environment, newest first",
        query=("env", "org"),
        tags=("dashboard",),
    ),
    Route(
        "GET",
        "/api/v1/overview",
        overview,
        "Organisations, users, certificates per environment, calls refused in the last hour",
        "operators",
        tags=("dashboard",),
    ),
]
