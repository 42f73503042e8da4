"""One TLS listener per environment: connections accepted, the client certificate taken
from the handshake into :class:`~twofold.gateway.facts.ConnectionFacts`, and each request
handed to the gateway's pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from twofold.gateway import pipeline
from twofold.gateway.core import Gateway
from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.forward import Response


def _aiohttp_response(response: Response) -> web.Response:
    return web.Response(status=response.status, body=response.body, headers=response.headers)


def _server(gateway: Gateway, env: str) -> web.Server:
    """aiohttp's low-level server for one environment's listener: every path goes to the
    pipeline (an application router would only add work per request)."""
    max_body = gateway.config.max_body

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        facts = ConnectionFacts.of(env, request.remote or "", der)
        head = RequestHead.parse_target(
            request.method,
            request.rel_url.raw_path,
            request.rel_url.raw_query_string,
            list(request.headers.items()),
        )
        if request.body_exists and not head.has_body:
            head.chunked = True

        async def read_body() -> bytes:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise pipeline.body_too_large(max_body) from None
            except ConnectionResetError:  # the client hung up mid-body: its fault, not an internal error
                raise pipeline.client_disconnected() from None

        return _aiohttp_response(await gateway.handle(facts, head, read_body))

    def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, asyncio.get_running_loop(), client_max_size=max_body
        )

    return _GatewayServer(handle, request_factory=make_request, max_field_size=16384)


class _JSONProtocolErrors(RequestHandler):
    """aiohttp answers requests it cannot parse (a header over the size limit, a malformed
    request line) itself, before the gateway sees them; answer those as JSON too."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; refuses if a response began
        code = {400: "bad_request", 413: "body_too_large", 431: "headers_too_large"}.get(
            status, f"http_{status}"
        )
        text = message if message and status < 500 else HTTPStatus(status).phrase
        response = web.json_response(
            {"error": {"code": code, "message": f"the request could not be read as HTTP/1.1: {text}"}},
            status=status,
        )
        response.force_close()
        return response


class _GatewayServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONProtocolErrors(self, loop=self._loop, **self._kwargs)


class _HandshakeWatch(asyncio.Protocol):
    """Wraps the HTTP protocol of one accepted connection. The loop creates it at accept
    time but calls ``connection_made`` only once the TLS handshake succeeded; if the
    connection is dropped before that (untrusted or missing client certificate, protocol
    error), the wrapper is released unconnected and counts a handshake failure."""

    __slots__ = ("_connected", "_inner", "_on_failure")

    def __init__(self, inner: asyncio.Protocol, on_failure: Callable[[], None]) -> None:
        self._inner = inner
        self._on_failure = on_failure
        self._connected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connected = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def __del__(self) -> None:
        if not self._connected:
            self._on_failure()


async def serve_environment(
    gateway: Gateway, env: str, host: str, port: int, *, reuse_port: bool = False
) -> tuple[web.BaseRunner, asyncio.Server]:
    """Start the TLS listener of one environment; returns what :func:`close_listener` needs."""
    runner = web.ServerRunner(_server(gateway, env), access_log=None, handle_signals=False)
    await runner.setup()
    server_factory = runner.server
    assert server_factory is not None
    failures = gateway.metrics.handshake_failures.labels(env)

    def factory() -> asyncio.Protocol:
        return _HandshakeWatch(server_factory(), failures.inc)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory,
        host,
        port,
        ssl=gateway.listening_context(env),
        reuse_port=reuse_port or None,
        backlog=1024,
        ssl_handshake_timeout=10,
    )
    return runner, server


async def close_listener(runner: web.BaseRunner, server: asyncio.Server) -> None:
    server.close()
    await runner.shutdown()
    await runner.cleanup()
