"""The dashboard people land on (the onboarding checklist, expiring certificates and recent
gateway calls per environment), the Team page where API Security users invite colleagues,
and the operators' overview, invitations and second-factor resets."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from twofold.errors import TwofoldError
from twofold.portal.mails import require_mailer, send_link
from twofold.portal.pages import _admin, _form, _operator, _redirect, _registry, _signed_in, render
from twofold.portal.web import CONFIG, error_status, read_form
from twofold.registry.auth import Principal
from twofold.registry.rules import RegistryError

routes = web.RouteTableDef()


@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.Response:
    who = _signed_in(request)
    registry = _registry(request)
    envs = await registry.list_environments()
    if not envs:
        raise RegistryError("no environments are configured yet", code="environment_not_found")
    current = next((e for e in envs if e["id"] == request.query.get("env")), envs[0])
    org = request.query.get("org") if who.is_operator else None
    if who.is_operator and not org:
        raise web.HTTPSeeOther("/admin/overview")
    board = await registry.dashboard(who, current["id"], org=org)
    gateway = dict(request.app[CONFIG].gateway_urls).get(current["id"])
    context = {"envs": envs, "env": current, "board": board, "gateway": gateway, "org": org or who.org_slug}
    return await render(request, "dashboard.html", context)


# --- invitations ---------------------------------------------------------------------------


async def _invite(request: web.Request, who: Principal, form: dict[str, Any], roles: list[str]) -> str:
    """Create the invitation and send its mail; returns the flash message."""
    config = request.app[CONFIG]
    require_mailer(config.mailer)
    link = await _registry(request).invite(
        who,
        str(form.get("email", "")),
        org=str(form.get("organisation", "")) or None,
        roles=roles,
        lifetime=config.link_lifetime,
    )
    await send_link(config.mailer, config.public_url, link)
    hours = round(config.link_lifetime.total_seconds() / 3600)
    return f"Invitation sent to {link.email} (the link works once, for {hours} hours)"


async def _team(
    request: web.Request, *, status: int = 200, error: TwofoldError | None = None
) -> web.Response:
    who = _signed_in(request)
    if who.org_id is None:
        raise web.HTTPSeeOther("/admin/users")
    registry = _registry(request)
    context = {
        "users": await registry.list_users(who),
        "invitations": await registry.list_invitations(who),
        "can_invite": who.manages_certificates,
        "invitable": sorted(who.roles),
    }
    return await render(request, "team.html", context, status=status, error=error)


@routes.get("/team")
async def team(request: web.Request) -> web.Response:
    return await _team(request)


@routes.post("/team/invitations")
async def team_invite(request: web.Request) -> web.StreamResponse:
    who = _signed_in(request)
    form = await _form(request)
    raw = await read_form(request)
    try:
        flash = await _invite(
            request, who, {**form, "organisation": who.org_slug}, [str(r) for r in raw.getall("roles", [])]
        )
    except TwofoldError as error:
        return await _team(request, status=error_status(error), error=error)
    raise _redirect(request, "/team", flash)


@routes.post("/admin/users/invite")
async def admin_invite(request: web.Request) -> web.StreamResponse:
    who = _operator(request)
    form = await _form(request)
    raw = await read_form(request)
    try:
        flash = await _invite(request, who, form, [str(r) for r in raw.getall("roles", [])])
    except TwofoldError as error:
        return await _admin(request, "admin_users.html", status=error_status(error), error=error)
    raise _redirect(request, "/admin/users", flash)


@routes.post("/admin/users/mfa-reset")
async def admin_mfa_reset(request: web.Request) -> web.StreamResponse:
    who = _operator(request)
    form = await _form(request)
    try:
        done = await _registry(request).mfa_reset(who, str(form.get("email", "")))
    except TwofoldError as error:
        return await _admin(request, "admin_users.html", status=error_status(error), error=error)
    raise _redirect(
        request,
        "/admin/users",
        f"Second factor of {done['email']} reset: signed out everywhere; they set up a new one at the next sign-in",
    )


# --- operators -----------------------------------------------------------------------------


@routes.get("/admin/overview")
async def admin_overview(request: web.Request) -> web.Response:
    who = _operator(request)
    registry = _registry(request)
    overview = await registry.overview(who)
    orgs = await registry.list_orgs(who)
    return await render(request, "admin_overview.html", {"overview": overview, "orgs": orgs, "quote": quote})
