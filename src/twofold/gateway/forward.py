"""The pipeline's last step: hand the verified request to the product's upstream and relay
its answer — the sandbox in process, plain-HTTP upstreams over the lean pooled client
(:mod:`twofold.gateway.upstream`), HTTPS upstreams and HEAD requests over aiohttp."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from yarl import URL

from twofold.gateway.pipeline import GatewayError, Outcome
from twofold.gateway.sandbox import SANDBOXES, Forwarded, retry_after_header
from twofold.gateway.snapshot import Product
from twofold.gateway.upstream import (
    MAX_RESPONSE,
    ResponseHead,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    serialise,
)
from twofold.registry.service import Registry


@dataclass(slots=True)
class Response:
    """An answer to relay: the status, headers without framing (the server adds
    Content-Length), and the whole body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    head_length: int | None = None  # answering HEAD: the length the upstream declared
    relayed: bytes = b""  # header lines relayed from an upstream as received, before `headers`
    dated: bool = False  # `relayed` has a Date


def json_response(status: int, data: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(data).encode()
    return Response(status, [("Content-Type", "application/json; charset=utf-8"), *(headers or ())], body)


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}})


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


@dataclass(frozen=True)
class Target:
    """A parsed upstream URL (parsed once per product, not per request)."""

    origin: str  # scheme://host:port
    host: str
    port: int
    host_header: str
    base_path: str
    lean: bool  # plain HTTP: the pooled HTTP/1.1 client; HTTPS: aiohttp

    @classmethod
    def parse(cls, upstream: str) -> Target:
        url = URL(upstream)
        host = url.raw_host or "localhost"
        port = url.port or (443 if url.scheme == "https" else 80)
        default = port == (443 if url.scheme == "https" else 80)
        host_header = (f"[{host}]" if ":" in host else host) + ("" if default else f":{port}")
        return cls(
            f"{url.scheme}://{host_header}",
            host,
            port,
            host_header,
            url.raw_path.rstrip("/"),
            url.scheme == "http",
        )


class Forwarder:
    def __init__(self, registry: Registry, timeout: float) -> None:
        self.registry = registry
        self.timeout = timeout
        self.pool = UpstreamPool()  # plain-HTTP upstreams
        self._session: aiohttp.ClientSession | None = None  # HTTPS upstreams, HEAD
        self._targets: dict[str, Target] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # shared by every organisation: never keep cookies
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self.pool.close()

    def _target(self, product: Product) -> Target:
        target = self._targets.get(product.upstream)
        if target is None:
            target = self._targets[product.upstream] = Target.parse(product.upstream)
        return target

    @staticmethod
    def _path(target: Target, forwarded: Forwarded) -> str:
        path = target.base_path + forwarded.raw_path
        return f"{path}?{forwarded.query_string}" if forwarded.query_string else path

    def send(self, product: Product, forwarded: Forwarded) -> asyncio.Future[UpstreamResponse] | None:
        """The hot path, without a task: a plain-HTTP upstream with an idle pooled connection
        gets the request at once; :meth:`relay` turns the future's outcome into the answer.
        None: take :meth:`forward` instead."""
        if forwarded.method == "HEAD" or product.upstream.startswith("sandbox:"):
            return None
        target = self._target(product)
        if not target.lean:
            return None
        request = serialise(
            forwarded.method,
            self._path(target, forwarded),
            target.host_header,
            forwarded.headers,
            forwarded.body,
        )
        return self.pool.send(target.host, target.port, request, self.timeout)

    def relay(
        self,
        product: Product,
        forwarded: Forwarded,
        outcome: Outcome,
        waiter: asyncio.Future[UpstreamResponse],
    ) -> Response:
        """The answer to relay once :meth:`send`'s future is done (raises GatewayError)."""
        try:
            answer = waiter.result()
        except (TimeoutError, UpstreamError) as exc:
            raise self._failed(product, exc) from None
        return self._answer(answer, forwarded, outcome)

    async def forward(self, product: Product, forwarded: Forwarded, outcome: Outcome) -> Response:
        if product.upstream.startswith("sandbox:"):
            return await self._sandbox(product, forwarded, outcome)
        target = self._target(product)
        path = self._path(target, forwarded)
        try:
            async with asyncio.timeout(self.timeout):
                if target.lean and forwarded.method != "HEAD":
                    request = serialise(
                        forwarded.method, path, target.host_header, forwarded.headers, forwarded.body
                    )
                    answer = await self.pool.request(target.host, target.port, request)
                else:
                    answer = await self._aiohttp(target, path, forwarded)
        except (TimeoutError, UpstreamError, aiohttp.ClientError) as exc:
            raise self._failed(product, exc) from None
        return self._answer(answer, forwarded, outcome)

    def _failed(self, product: Product, exc: Exception) -> GatewayError:
        if isinstance(exc, TimeoutError):
            return GatewayError(
                f"the {product.name} API did not answer within {self.timeout:g} s",
                code="upstream_timeout",
                status=504,
            )
        return GatewayError(
            f"the {product.name} API is unavailable ({exc if isinstance(exc, UpstreamError) else type(exc).__name__})",
            code="upstream_unavailable",
            status=502,
        )

    @staticmethod
    def _answer(answer: UpstreamResponse, forwarded: Forwarded, outcome: Outcome) -> Response:
        """The upstream's answer to relay: its header lines as received, without framing."""
        status, head = answer.status, answer.head
        if status >= 500:
            outcome.code = f"upstream_{status}"
        head_length = None
        if forwarded.method == "HEAD":  # no body, but the length a GET would have
            head_length = int(head.length) if head.length.isdigit() else None
        headers = [] if head.typed else [("Content-Type", "application/json")]
        return Response(status, headers, answer.body, head_length, b"".join(head.lines), head.dated)

    async def _sandbox(self, product: Product, forwarded: Forwarded, outcome: Outcome) -> Response:
        sandbox = SANDBOXES.get(product.upstream.split(":", 1)[1])
        if sandbox is None:
            raise GatewayError(
                f"{product.id} points to an unknown sandbox", code="upstream_unavailable", status=502
            )
        status, data = await sandbox(self.registry, forwarded, forwarded.path[len(product.prefix) :])
        if status >= 400 and isinstance(data, dict):
            outcome.code = str(data.get("error", {}).get("code", f"upstream_{status}"))
            outcome.message = str(data.get("error", {}).get("message", "")) or None
        headers = [("X-Request-Id", forwarded.headers["X-Request-Id"]), *retry_after_header(data)]
        return json_response(status, data, headers)

    async def _aiohttp(self, target: Target, path: str, forwarded: Forwarded) -> UpstreamResponse:
        assert self._session is not None
        async with self._session.request(
            forwarded.method,
            URL(target.origin + path, encoded=True),
            headers=forwarded.headers,
            data=forwarded.body or None,
            allow_redirects=False,
        ) as upstream:
            if (upstream.content_length or 0) > MAX_RESPONSE:
                raise UpstreamError(f"the upstream's response is larger than {MAX_RESPONSE} bytes")
            head = ResponseHead()
            for name, value in upstream.raw_headers:
                if not head.add(name, value):
                    raise UpstreamError("the upstream's response headers are too many or too large")
            chunks, size = [], 0
            async for chunk in upstream.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_RESPONSE:
                    raise UpstreamError(f"the upstream's response is larger than {MAX_RESPONSE} bytes")
                chunks.append(chunk)
            return UpstreamResponse(upstream.status, head, b"".join(chunks))
