"""What the portal shows of the certificate lifecycle outside the Security page: the expiry
banner (a context value and the ``_expiry_banner.html`` include, for any page) and the JWKS
that verifies what the provider signs: expiry notices sent to webhooks, gateway responses."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from twofold.errors import TwofoldError
from twofold.portal.web import CONFIG, REGISTRY, principal
from twofold.provider_keys import JWKS_PATH, merge_jwks

routes = web.RouteTableDef()


async def expiring(request: web.Request) -> list[dict[str, Any]]:
    """The signed-in organisation user's certificates expiring within 30 days (or expired and
    still registered), soonest first; nothing for operators and visitors."""
    who = principal(request)
    if who is None or who.org_id is None or who.must_change_password:
        return []
    try:
        return await request.app[REGISTRY].expiring_certificates(who, dt.datetime.now(dt.UTC))
    except Exception:  # a banner never stands in the way of a page (error pages included)
        return []


@routes.get(JWKS_PATH)
async def jwks(request: web.Request) -> web.Response:
    """The provider's JWKS: every signing key published in the registry (the notice key, each
    gateway's response key — see :mod:`twofold.provider_keys`), and this portal's notice key."""
    try:
        published = await request.app[REGISTRY].signing_jwks()
    except TwofoldError as error:  # incomplete would be worse than unavailable: clients cache it
        return web.json_response(
            error.to_dict(),
            status=error.status,
            headers={"Retry-After": str(error.retry_after)} if error.retry_after else None,
        )
    keys = merge_jwks(request.app[CONFIG].notice_jwks, published)
    return web.json_response(keys, headers={"Cache-Control": "public, max-age=300"})
