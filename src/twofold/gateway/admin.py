"""The admin listener: health, readiness and Prometheus metrics (bind it to loopback).

With ``workers`` (the extra gateway processes of `serve --workers N`), readiness and metrics
are the node's: every process ready, every process's metrics merged
(:mod:`twofold.gateway.fleet`); ``/metrics?process=main`` is this process's alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from twofold.gateway.core import Gateway
    from twofold.gateway.fleet import Workers


def admin_app(
    gateway: Gateway,
    *,
    extra_ready: Callable[[], bool] | None = None,
    workers: Workers | None = None,
) -> web.Application:
    async def healthz(_request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.BaseRequest) -> web.Response:
        ok = gateway.ready and (extra_ready() if extra_ready else True)
        body: dict[str, Any] = {
            "ready": ok,
            "registry_version": gateway.snapshot.version if gateway.snapshot else None,
            # The registry's last answer; past the grace period requests are refused (503).
            "registry": {
                "last_answer_seconds_ago": round(gateway.registry_age, 1),
                "grace_seconds": gateway.config.registry_grace,
                "serving": gateway.serving,
            },
        }
        if workers is not None and workers.sockets:
            states = await workers.readiness()
            body["workers"] = states
            body["ready"] = ok = ok and all(state["ready"] for state in states)
            versions = [body["registry_version"], *(state["registry_version"] for state in states)]
            body["registry_version"] = None if None in versions else min(v for v in versions if v is not None)
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(request: web.BaseRequest) -> web.Response:
        own = gateway.metrics.render()
        if workers is not None and workers.sockets and request.query.get("process") != "main":
            own = await workers.metrics(own)
        return web.Response(body=own, headers={"Content-Type": gateway.metrics.content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
