"""The gateway: one TLS listener per environment, each request taken through
identify → route → authorise → read → verify → forward, against a live snapshot of the
registry. Nothing unverified is forwarded; every refusal is JSON with a stable code."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from cryptography import x509
from multidict import CIMultiDict
from yarl import URL

from twofold.crypto.certs import fingerprint_sha256
from twofold.crypto.keys import PrivateKey
from twofold.errors import JWSError, TwofoldError
from twofold.gateway.calls import CallRecorder
from twofold.gateway.metrics import Metrics
from twofold.gateway.sandbox import SANDBOXES, Forwarded
from twofold.gateway.snapshot import ClientCert, Product, Snapshot, load_snapshot
from twofold.gateway.upstream import MAX_RESPONSE, UpstreamError, UpstreamPool, serialise
from twofold.registry.db import is_sqlite, normalise_url
from twofold.registry.service import Registry
from twofold.tls import server_context

log = logging.getLogger("twofold.gateway")
access_log = logging.getLogger("twofold.access")

SIGNED_TYPES = ("application/jose", "text/xml")
_COMPACT_JWS = re.compile(rb"\s*[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\s*")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "expect",
    }
)
# Headers an upstream may trust for identity: only the gateway sets them.
_TRUST_HEADERS = frozenset(
    {
        "x-request-id",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "client-cert",
        "client-cert-chain",
        "x-forwarded-client-cert",
        "x-ssl-client-cert",
        "x-client-cert",
        "ssl-client-cert",
    }
)


def _forwardable(name: str) -> bool:
    """A client header the upstream may see. Names with '_' are dropped (as nginx does):
    CGI-style upstreams read ``X_Twofold_Organisation`` as the gateway's own header."""
    lower = name.lower()
    return (
        "_" not in lower
        and lower not in _HOP_BY_HOP
        and lower not in _TRUST_HEADERS
        and not lower.startswith(("x-twofold-", "x-ssl-", "x-client-"))
    )


_RESPONSE_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
HEADER_ORG = "X-Twofold-Organisation"
HEADER_ENV = "X-Twofold-Environment"
HEADER_CLIENT_CERT = "X-Twofold-Client-Cert-Sha256"
HEADER_SIGNATURE_CERT = "X-Twofold-Signature-Cert-Sha256"
_JWS_STATUS = {"jws_signature_invalid": 401, "jws_no_key": 401, "jws_too_large": 413}


# Request ids: unique per process start and cheap (uuid4 costs more than the rest of the headers).
_REQUEST_ID_PREFIX = secrets.token_hex(6)
_request_ids = itertools.count(1)


class GatewayError(TwofoldError):
    code = "gateway_error"


@dataclass(frozen=True)
class GatewayConfig:
    max_body: int = 1024 * 1024
    upstream_timeout: float = 30.0
    poll_interval: float = 0.25
    access_log: bool = True


@dataclass
class _Outcome:
    """What the access log and metrics record about one request (never bodies or headers)."""

    org: str | None = None
    org_id: int | None = None
    fingerprint: str | None = None
    product: str | None = None
    signature_fingerprint: str | None = None
    code: str = "ok"
    message: str | None = None  # the refusal message (recent calls on the dashboard)


class Gateway:
    def __init__(
        self,
        registry: Registry,
        *,
        key: PrivateKey,
        certificate: x509.Certificate,
        chain: tuple[x509.Certificate, ...] = (),
        config: GatewayConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.key, self.certificate, self.chain = key, certificate, chain
        self.config = config or GatewayConfig()
        self.metrics = metrics or Metrics()
        self.snapshot: Snapshot | None = None
        self.listening: dict[str, ssl.SSLContext] = {}
        self._newest: dict[str, ssl.SSLContext] = {}
        self._trust: dict[str, frozenset[str]] = {}
        self._session: aiohttp.ClientSession | None = None  # HTTPS upstreams
        self._pool = UpstreamPool()  # plain-HTTP upstreams
        self._targets: dict[str, _Target] = {}
        self._last_poll = 0.0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.calls = CallRecorder(registry.record_calls)  # recent calls for the dashboards

    # --- snapshot and TLS trust -----------------------------------------------------------

    async def refresh(self) -> Snapshot:
        snapshot = await load_snapshot(self.registry)
        for env in snapshot.environments:
            trusted = snapshot.trusted_certificates(env)
            marker = frozenset(fingerprint_sha256(c) for c in trusted)
            if self._trust.get(env) != marker or env not in self._newest:
                self._newest[env] = self._context(trusted)
                self._trust[env] = marker
            self.metrics.expiring.labels(env).set(snapshot.expiring(env, dt.timedelta(days=30)))
        self.snapshot = snapshot
        self.metrics.registry_version.set(snapshot.version)
        self.metrics.snapshot_reloads.inc()
        self._last_poll = time.monotonic()
        return snapshot

    def _context(self, trusted: list[x509.Certificate]) -> ssl.SSLContext:
        return server_context(self.key, self.certificate, chain=self.chain, trusted=trusted)

    def listening_context(self, env: str) -> ssl.SSLContext:
        """The context a listener is created with. Each new connection is switched to the
        newest context for its environment in the SNI callback (called on every ClientHello,
        with or without SNI), so removed certificates stop completing handshakes at once."""
        if env in self.listening:
            return self.listening[env]
        assert self.snapshot is not None, "refresh() first"
        context = self._context(self.snapshot.trusted_certificates(env))

        def switch(ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            newest = self._newest.get(env)
            if newest is not None:
                ssl_object.context = newest

        context.sni_callback = switch
        self.listening[env] = context
        return context

    async def watch(self) -> None:
        """Reload the snapshot whenever the registry version moves (polled; woken at once by
        PostgreSQL NOTIFY where available)."""
        seen = self.snapshot.version if self.snapshot else -1
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
            self._wake.clear()
            try:
                version = await self.registry.version()
                self._last_poll = time.monotonic()
                if version != seen:
                    snapshot = await self.refresh()
                    seen = snapshot.version
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be restarting: keep serving the last snapshot
                log.warning("registry poll failed (%s); serving the last snapshot", type(exc).__name__)

    async def listen_notifications(self) -> None:
        """PostgreSQL only: wake the watcher on NOTIFY twofold_registry."""
        import asyncpg

        from twofold.registry.service import NOTIFY_CHANNEL

        dsn = normalise_url(self.registry.url).replace("postgresql+asyncpg://", "postgresql://", 1)
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(dsn)
                await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())
                while True:
                    await asyncio.sleep(30)
                    await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN failed (%s); polling only, retrying in 5 s", type(exc).__name__)
            finally:  # on stop too: do not leave the LISTEN connection open
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            await asyncio.sleep(5)

    @property
    def ready(self) -> bool:
        return self.snapshot is not None and time.monotonic() - self._last_poll < max(
            5.0, 20 * self.config.poll_interval
        )

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # shared by every organisation: never keep cookies
        )
        self._tasks.append(asyncio.create_task(self.watch()))
        self.calls.start()
        if not is_sqlite(self.registry.url):
            self._tasks.append(asyncio.create_task(self.listen_notifications()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.calls.stop()
        if self._session is not None:
            await self._session.close()
        self._pool.close()

    def server(self, env: str) -> web.Server:
        """aiohttp's low-level server for one environment's listener: every path goes to
        :meth:`handle` (an application router would only add work per request)."""
        max_body = self.config.max_body

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await self.handle(request, env)

        def make_request(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            return web.BaseRequest(
                message, payload, protocol, writer, task, asyncio.get_running_loop(), client_max_size=max_body
            )

        return _GatewayServer(handle, request_factory=make_request, max_field_size=16384)

    # --- one request --------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest, env: str) -> web.StreamResponse:
        started = time.perf_counter()
        outcome = _Outcome()
        try:
            response = await self._process(request, env, outcome)
        except TwofoldError as error:
            outcome.code, outcome.message = error.code, error.message
            response = _json_error(error.status, error.code, error.message)
        except web.HTTPRequestEntityTooLarge:
            outcome.code = "body_too_large"
            response = _json_error(
                413, "body_too_large", f"the body is larger than {self.config.max_body} bytes"
            )
        except Exception as exc:
            outcome.code = "internal_error"
            log.error(
                "unexpected %s on %s %s",
                type(exc).__name__,
                request.method,
                request.path,
                exc_info=(type(exc), exc, exc.__traceback__) if log.isEnabledFor(logging.DEBUG) else None,
            )
            response = _json_error(500, "internal_error", "the gateway failed; it has been logged")
        elapsed = time.perf_counter() - started
        product = outcome.product or "-"
        self.metrics.requests.labels(env, product, outcome.code).inc()
        self.metrics.latency.labels(env).observe(elapsed)
        self.calls.record(env, outcome, request.method, request.path, response.status)
        if self.config.access_log:
            access_log.info(
                json.dumps(
                    {
                        "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                        "env": env,
                        "org": outcome.org,
                        "cert": outcome.fingerprint,
                        "product": outcome.product,
                        "method": request.method,
                        "path": request.path,
                        "status": response.status,
                        "outcome": outcome.code,
                        "signed_by": outcome.signature_fingerprint,
                        "ms": round(elapsed * 1000, 2),
                    },
                    separators=(",", ":"),
                )
            )
        return response

    async def _process(self, request: web.BaseRequest, env: str, outcome: _Outcome) -> web.StreamResponse:
        snapshot = self.snapshot
        assert snapshot is not None
        client = self._identify(request, env, snapshot)
        outcome.org, outcome.org_id, outcome.fingerprint = client.org, client.org_id, client.fingerprint
        _check_path(request.path, request.rel_url.raw_path)
        product = snapshot.product_for(request.path)
        if product is None:
            raise GatewayError(
                f"no API product serves {request.path} in environment {env}", code="no_such_api", status=404
            )
        outcome.product = product.id
        if product.id not in snapshot.access.get((client.org_id, env), ()):
            raise GatewayError(
                f"organisation {client.org} has no project with API product {product.id} in environment {env}; "
                "add the product to a project on the portal's Projects page",
                code="product_not_in_project",
                status=403,
            )
        try:
            body = await request.read() if request.body_exists else b""
        except ConnectionResetError:  # the client hung up mid-body: its fault, not an internal error
            raise GatewayError(
                "the client closed the connection before it sent the whole body",
                code="client_disconnected",
                status=400,
            ) from None
        media = request.content_type if body else ""
        payload, content_type = body, request.headers.get("Content-Type", "")
        signed = self._expects_signature(product, request.method, body, media)
        if body and media not in product.content_types:
            raise GatewayError(
                f"{product.name} does not accept {media or 'a body without Content-Type'}; send "
                f"{' or '.join(sorted(product.content_types))}",
                code="content_type_not_accepted",
                status=415,
            )
        if signed:
            payload, outcome.signature_fingerprint = self._verify(snapshot, client, env, product, body)
            content_type = "application/json"
        headers = self._upstream_headers(request, client, env, outcome.signature_fingerprint, content_type)
        forwarded = Forwarded(
            request.method,
            request.path,
            request.rel_url.raw_path,
            request.rel_url.raw_query_string,  # as sent: the decoded form can change its meaning
            headers,
            payload,
            client.org_id,
            client.org,
            env,
        )
        return await self._forward(product, forwarded, outcome)

    def _identify(self, request: web.BaseRequest, env: str, snapshot: Snapshot) -> ClientCert:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise GatewayError(
                "no client certificate was presented; call with your mTLS certificate and key",
                code="client_certificate_required",
                status=401,
            )
        fingerprint = hashlib.sha256(der).hexdigest()
        client = snapshot.mtls.get(env, {}).get(fingerprint)
        if client is None:
            elsewhere = [e for e, certs in snapshot.mtls.items() if fingerprint in certs]
            hint = (
                f" (it is registered for {', '.join(elsewhere)})"
                if elsewhere
                else ("; register it as MTLS on the portal's Security page")
            )
            raise GatewayError(
                f"certificate not registered for environment {env}{hint}",
                code="certificate_not_registered",
                status=401,
            )
        now = dt.datetime.now(dt.UTC)
        if client.not_after <= now:
            raise GatewayError(
                f"the client certificate expired on {client.not_after:%Y-%m-%d}",
                code="certificate_expired",
                status=401,
            )
        if client.not_before > now:
            raise GatewayError(
                "the client certificate is not valid yet", code="certificate_not_yet_valid", status=401
            )
        return client

    @staticmethod
    def _expects_signature(product: Product, method: str, body: bytes, media: str) -> bool:
        if product.signature == "none":
            return False
        if not body:
            if product.signature == "required" and method in ("POST", "PUT", "PATCH"):
                raise GatewayError(
                    "this API requires a signed body: send the payload as a compact JWS "
                    "(Content-Type: application/jose)",
                    code="signature_required",
                    status=400,
                )
            return False
        if media == "application/jose":
            return True
        if media == "text/xml":  # legacy clients send the JWS as text/xml
            return product.signature == "required" or _COMPACT_JWS.fullmatch(body) is not None
        if product.signature == "required":
            raise GatewayError(
                f"this API requires a signed body; send the compact JWS as application/jose, not {media}",
                code="signature_required",
                status=415,
            )
        return False

    def _verify(
        self, snapshot: Snapshot, client: ClientCert, env: str, product: Product, body: bytes
    ) -> tuple[bytes, str | None]:
        verifier = snapshot.verifier(client.org_id, env, product.algorithms, self.config.max_body)
        if verifier is None:
            raise GatewayError(
                f"organisation {client.org} has no Digital Signature certificate in environment {env}; register "
                "one on the portal's Security page",
                code="no_signature_certificate",
                status=401,
            )
        try:
            verified = verifier.verify(body)
        except JWSError as error:
            status = _JWS_STATUS.get(error.code, 400)
            message = error.message
            if error.code == "jws_signature_invalid":
                message = (
                    f"signature does not verify against any Digital Signature certificate of organisation "
                    f"{client.org} in environment {env}"
                )
                known = verifier.signed_by_a_known_key(body)
                if known is False:
                    message += (
                        ": the signing key belongs to none of them. Register its certificate on the "
                        "portal's Security page (Add Security, Digital Signature), or sign with the key of "
                        "a registered one"
                    )
                elif known is True:
                    message += (
                        ": a registered key signed it, but not these bytes; send exactly what was signed"
                    )
            raise GatewayError(message, code=error.code, status=status) from None
        try:
            json.loads(verified.payload, parse_constant=_not_json)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
            raise GatewayError(
                "the signed payload is not JSON (or is nested too deeply); sign the JSON request body",
                code="payload_not_json",
                status=400,
            ) from None
        return verified.payload, verified.key.label

    @staticmethod
    def _upstream_headers(
        request: web.BaseRequest, client: ClientCert, env: str, signature_fp: str | None, content_type: str
    ) -> dict[str, str]:
        headers = {name: value for name, value in request.headers.items() if _forwardable(name)}
        headers["X-Forwarded-For"] = request.remote or ""
        headers["X-Forwarded-Proto"] = "https"
        sent_id = request.headers.get("X-Request-Id", "")
        if sent_id and len(sent_id) <= 128 and sent_id.isprintable():
            headers["X-Request-Id"] = sent_id
        else:
            headers["X-Request-Id"] = f"{_REQUEST_ID_PREFIX}-{next(_request_ids):x}"
        if content_type:
            headers["Content-Type"] = content_type
        headers[HEADER_ORG] = client.org
        headers[HEADER_ENV] = env
        headers[HEADER_CLIENT_CERT] = client.fingerprint
        if signature_fp:
            headers[HEADER_SIGNATURE_CERT] = signature_fp
        return headers

    async def _forward(self, product: Product, forwarded: Forwarded, outcome: _Outcome) -> web.StreamResponse:
        if product.upstream.startswith("sandbox:"):
            sandbox = SANDBOXES.get(product.upstream.split(":", 1)[1])
            if sandbox is None:
                raise GatewayError(
                    f"{product.id} points to an unknown sandbox", code="upstream_unavailable", status=502
                )
            status, data = await sandbox(self.registry, forwarded, forwarded.path[len(product.prefix) :])
            if status >= 400 and isinstance(data, dict):
                outcome.code = str(data.get("error", {}).get("code", f"upstream_{status}"))
                outcome.message = str(data.get("error", {}).get("message", "")) or None
            return web.json_response(
                data, status=status, headers={"X-Request-Id": forwarded.headers["X-Request-Id"]}
            )
        target = self._targets.get(product.upstream)
        if target is None:
            target = self._targets[product.upstream] = _Target.parse(product.upstream)
        path = target.base_path + forwarded.raw_path
        if forwarded.query_string:
            path = f"{path}?{forwarded.query_string}"
        try:
            async with asyncio.timeout(self.config.upstream_timeout):
                if target.lean and forwarded.method != "HEAD":
                    request = serialise(
                        forwarded.method, path, target.host_header, forwarded.headers, forwarded.body
                    )
                    answer = await self._pool.request(target.host, target.port, request)
                    status, upstream_headers, content = answer.status, answer.headers, answer.body
                else:
                    assert self._session is not None
                    async with self._session.request(
                        forwarded.method,
                        URL(target.origin + path, encoded=True),
                        headers=forwarded.headers,
                        data=forwarded.body or None,
                        allow_redirects=False,
                    ) as upstream:
                        content = await _read_limited(upstream)
                        status, upstream_headers = upstream.status, list(upstream.headers.items())
        except TimeoutError:
            raise GatewayError(
                f"the {product.name} API did not answer within {self.config.upstream_timeout:g} s",
                code="upstream_timeout",
                status=504,
            ) from None
        except (UpstreamError, aiohttp.ClientError) as exc:
            raise GatewayError(
                f"the {product.name} API is unavailable ({exc if isinstance(exc, UpstreamError) else type(exc).__name__})",
                code="upstream_unavailable",
                status=502,
            ) from None
        headers = CIMultiDict((k, v) for k, v in upstream_headers if k.lower() not in _RESPONSE_HOP_BY_HOP)
        if "Content-Type" not in headers:
            headers["Content-Type"] = "application/json"
        if status >= 500:
            outcome.code = f"upstream_{status}"
        return web.Response(status=status, body=content, headers=headers)


async def _read_limited(upstream: aiohttp.ClientResponse) -> bytes:
    if (upstream.content_length or 0) > MAX_RESPONSE:
        raise UpstreamError(f"the upstream's response is larger than {MAX_RESPONSE} bytes")
    chunks, size = [], 0
    async for chunk in upstream.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise UpstreamError(f"the upstream's response is larger than {MAX_RESPONSE} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class _Target:
    """A parsed upstream URL (parsed once per product, not per request)."""

    origin: str  # scheme://host:port
    host: str
    port: int
    host_header: str
    base_path: str
    lean: bool  # plain HTTP: the pooled HTTP/1.1 client; HTTPS: aiohttp

    @classmethod
    def parse(cls, upstream: str) -> _Target:
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


_ENCODED_SEPARATORS = re.compile(r"%(2f|5c|00)", re.IGNORECASE)


def _check_path(path: str, raw_path: str) -> None:
    """Refuse paths that the gateway would match as one product while an upstream normalises
    them into another (``/bank//payments``, ``/bank/payments;x``, ``/a/%2e%2e/b``, ``%2F`` …):
    the product decides whether a signature is required, so the path must be unambiguous."""
    segments = path.split("/")[1:]
    if (
        any(segment in (".", "..") for segment in segments)
        or "" in segments[:-1]  # an empty segment: '//' (a trailing '/' is fine)
        or ";" in path
        or "\\" in path
        or "\x00" in path
        or _ENCODED_SEPARATORS.search(raw_path)
    ):
        raise GatewayError(
            "the path is not in normal form (it has '.', '..' or empty segments, ';' parameters, "
            "backslashes or encoded slashes); send the normalised path",
            code="path_invalid",
            status=400,
        )


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def admin_app(gateway: Gateway, *, extra_ready: Callable[[], bool] | None = None) -> web.Application:
    """Health, readiness and Prometheus metrics (bind it to loopback)."""

    async def healthz(_request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.BaseRequest) -> web.Response:
        ok = gateway.ready and (extra_ready() if extra_ready else True)
        body: dict[str, Any] = {
            "ready": ok,
            "registry_version": gateway.snapshot.version if gateway.snapshot else None,
        }
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_request: web.BaseRequest) -> web.Response:
        return web.Response(
            body=gateway.metrics.render(), headers={"Content-Type": gateway.metrics.content_type}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


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
        response = _json_error(status, code, f"the request could not be read as HTTP/1.1: {text}")
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
    runner = web.ServerRunner(gateway.server(env), access_log=None, handle_signals=False)
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


__all__ = ["Gateway", "GatewayConfig", "GatewayError", "admin_app", "close_listener", "serve_environment"]
