"""What the portal shows of the certificate lifecycle outside the Security page: the expiry
banner (a context value and the ``_expiry_banner.html`` include, for any page) and the JWKS
that verifies the signed expiry notices sent to webhooks."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from twofold.lifecycle import JWKS_PATH
from twofold.portal.web import CONFIG, REGISTRY, principal

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
    keys = request.app[CONFIG].notice_jwks or {"keys": []}
    return web.json_response(keys, headers={"Cache-Control": "public, max-age=300"})
