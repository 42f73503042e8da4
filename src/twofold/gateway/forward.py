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

from twofold.errors import TwofoldError
from twofold.gateway.pipeline import GatewayError, Outcome
from twofold.gateway.replay import ReplayGuard
from twofold.gateway.sandbox import SANDBOXES, Forwarded, retry_after_header
from twofold.gateway.signing import JOSE, ResponseSigner, is_json
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


def refusal(error: TwofoldError) -> Response:
    """A refusal's JSON answer, with Retry-After when it passes with time (a 503)."""
    response = error_response(error.status, error.code, error.message)
    if error.retry_after:
        response.headers.append(("Retry-After", str(error.retry_after)))
    return response


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
    def __init__(
        self,
        registry: Registry,
        timeout: float,
        signer: ResponseSigner | None = None,
        *,
        replay_durable: bool = True,
    ) -> None:
        self.registry = registry
        self.timeout = timeout
        self.signer = signer  # signs the answers of products with sign_responses
        # Records the ids of replay-protected requests.
        self.replay = ReplayGuard(registry, durable=replay_durable)
        self.pool = UpstreamPool()  # plain-HTTP upstreams
        self._session: aiohttp.ClientSession | None = None  # HTTPS upstreams, HEAD
        self._targets: dict[str, Target] = {}

    async def start(self) -> None:
        self.replay.start()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # shared by every organisation: never keep cookies
        )

    async def close(self) -> None:
        await self.replay.close()
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
        if forwarded.method == "HEAD" or product.upstream.startswith("sandbox:") or forwarded.replay:
            return None  # a replay-protected request waits for its id to be recorded: forward()
        target = self._target(product)
        if not target.lean:
            return None
        if product.sign_responses:
            _identity_encoding(forwarded)
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
        return self._answer(answer, forwarded, outcome, self._signer(product))

    async def forward(self, product: Product, forwarded: Forwarded, outcome: Outcome) -> Response:
        if forwarded.replay is not None:
            await self.replay.admit(forwarded.replay)  # the database decides: 409 if seen before
        if product.upstream.startswith("sandbox:"):
            return await self._sandbox(product, forwarded, outcome)
        if product.sign_responses:
            _identity_encoding(forwarded)
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
        return self._answer(answer, forwarded, outcome, self._signer(product))

    def _signer(self, product: Product) -> ResponseSigner | None:
        return self.signer if product.sign_responses else None

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
    def _answer(
        answer: UpstreamResponse, forwarded: Forwarded, outcome: Outcome, signer: ResponseSigner | None = None
    ) -> Response:
        """The upstream's answer to relay: its header lines as received, without framing
        (with ``signer``: a JSON body signed, as application/jose)."""
        status, head, body = answer.status, answer.head, answer.body
        if signer is not None and body and forwarded.method != "HEAD":
            head, body = _signed(signer, head, body, forwarded)
        if status >= 500:
            outcome.code = f"upstream_{status}"
        head_length = None
        if forwarded.method == "HEAD":  # no body, but the length a GET would have
            head_length = int(head.length) if head.length.isdigit() else None
        headers = [] if head.typed else [("Content-Type", "application/json")]
        return Response(status, headers, body, head_length, b"".join(head.lines), head.dated)

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
        request_id = forwarded.headers["X-Request-Id"]
        response = json_response(status, data, [("X-Request-Id", request_id), *retry_after_header(data)])
        signer = self._signer(product)
        if signer is not None and forwarded.method != "HEAD":
            response.headers[0] = ("Content-Type", JOSE)
            response.body = signer.sign(response.body, request_id)
        return response

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


def _identity_encoding(forwarded: Forwarded) -> None:
    """Ask the upstream for an uncompressed answer: the signature covers the JSON itself."""
    for name in [n for n in forwarded.headers if n.lower() == "accept-encoding"]:
        del forwarded.headers[name]


def _signed(
    signer: ResponseSigner, head: ResponseHead, content: bytes, forwarded: Forwarded
) -> tuple[ResponseHead, bytes]:
    """The upstream's header lines and body with a JSON body signed: its Content-Type becomes
    application/jose. Anything else (not JSON, compressed) is left as it is."""
    json_body = False
    kept = ResponseHead()
    for line in head.lines:
        name, _, value = line.partition(b":")
        lower, value = name.lower(), value.strip()
        if lower == b"content-type":
            json_body = is_json(value)
        elif lower == b"content-encoding":
            if value.lower() not in (b"", b"identity"):
                return head, content
        else:
            kept.add(name, value)
    if not json_body:
        return head, content
    kept.add(b"Content-Type", JOSE.encode())
    kept.length, kept.framed = head.length, head.framed
    return kept, signer.sign(content, forwarded.headers.get("X-Request-Id", ""))
