"""The gateway's public names, for callers that start it (``twofold serve``, tests, benches).

The package, along its domain:

* :mod:`~twofold.gateway.facts` — the pipeline's inputs: how a request arrived
  (:class:`ConnectionFacts`) and its head;
* :mod:`~twofold.gateway.pipeline` — the steps identify → route → authorise → read → verify;
* :mod:`~twofold.gateway.forward` and :mod:`~twofold.gateway.upstream` — forwarding;
* :mod:`~twofold.gateway.core` — the gateway of a process: live snapshot, trust, metrics, log;
* :mod:`~twofold.gateway.listeners` — the TLS listeners: accepting, connection caps, deadlines;
* :mod:`~twofold.gateway.protocol` and :mod:`~twofold.gateway.wire` — the HTTP/1.1 protocol
  (httptools) that takes each request through the pipeline;
* :mod:`~twofold.gateway.trust` — TLS trust that follows the registry;
* :mod:`~twofold.gateway.admin` — health, readiness and metrics;
* :mod:`~twofold.gateway.snapshot`, :mod:`~twofold.gateway.sandbox`, :mod:`~twofold.gateway.metrics`.
"""

from __future__ import annotations

from twofold.gateway.admin import admin_app
from twofold.gateway.core import Gateway, GatewayConfig
from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.listeners import close_listener, serve_environment
from twofold.gateway.pipeline import GatewayError

__all__ = [
    "ConnectionFacts",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "RequestHead",
    "admin_app",
    "close_listener",
    "serve_environment",
]
