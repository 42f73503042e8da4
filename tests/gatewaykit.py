"""Helpers for the gateway end-to-end suites: the whole system started the way `twofold serve`
starts it (``twofold.serve.run``: portal, one TLS gateway per environment, admin listener),
in a background thread with a uvloop event loop of its own, on free loopback ports, a
temporary data directory and SQLite (or a fresh PostgreSQL database); seeded through the
registry (operator steps) and the portal's JSON API with API tokens (what organisation
users do); and real clients on loopback — curl, `requests`, httpx, `twofold call`, raw
``ssl`` sockets.

A recording HTTP upstream (:class:`Upstream`) sits behind some products, so that tests can
see exactly what the gateway forwarded — and that it forwarded nothing when it refused.

Keys: mTLS certificates are EC P-256 (cheap); Digital Signature certificates are
RSA-2048, because the products verify RS256.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httptools
import httpx
from aiohttp import web
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from twofold.aio import LoopThread
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.crypto.keys import PrivateKey
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry
from twofold.serve import run
from twofold.settings import ServeConfig

T = TypeVar("T")

MAX_BODY = 64 * 1024  # small, so that "over the limit" tests stay cheap
UPSTREAM_TIMEOUT = 1.0  # the slow upstream sleeps longer than this
SLOW_SECONDS = 3.0
PROPAGATION = 1.0  # registry changes reach the gateway within one second (the issue's promise)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- a recording upstream -------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # decoded
    query: str  # raw, as it arrived
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


LARGE = 256 * 1024  # the size of the answers under /large


class Upstream:
    """A plain-HTTP API on loopback that records every request it receives and answers
    200 JSON; paths under ``/slow`` answer only after :data:`SLOW_SECONDS`, paths ending in
    ``/large`` with :data:`LARGE` bytes (their query string first)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._thread = LoopThread("twofold-test-upstream")
        self._runner: web.AppRunner | None = None
        self.port = self._thread.call(self._start())

    async def _start(self) -> int:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            seen = Seen(
                request.method,
                request.path,
                request.rel_url.raw_query_string,  # as sent, not decoded
                list(request.headers.items()),
                body,
            )
            with self._lock:
                self.seen.append(seen)
            if request.path.startswith("/slow"):
                await asyncio.sleep(SLOW_SECONDS)
            if request.path.endswith("/large"):
                query = request.rel_url.raw_query_string.encode()
                return web.Response(body=query + b" " * (LARGE - len(query)), content_type="text/plain")
            return web.json_response({"upstream": "recorder", "path": request.path, "received": len(body)})

        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def since(self, mark: int) -> list[Seen]:
        with self._lock:
            return list(self.seen[mark:])

    def close(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self._thread.call(self._runner.cleanup(), timeout=10)
        self._thread.close()


# --- credentials -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    key: PrivateKey
    certificate: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def fingerprint(self) -> str:
        return certs.fingerprint_sha256(self.certificate)

    @property
    def pem(self) -> str:
        return certs.certificate_pem(self.certificate).decode()


def save_pair(directory: Path, name: str, key: PrivateKey, certificate: x509.Certificate) -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(keys.private_key_bytes(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(certs.certificate_pem(certificate))
    return Pair(key, certificate, key_path, cert_path)


def ec_pair(directory: Path, name: str, cn: str, *, usage: certs.Usage = "client", days: int = 365) -> Pair:
    key = keys.generate_private_key("ec", curve="P-256")
    cert = certs.self_signed_certificate(key, f"/O=Test/CN={cn}", usage=usage, days=days)
    return save_pair(directory, name, key, cert)


def rsa_pair(directory: Path, name: str, cn: str) -> Pair:
    key = keys.generate_private_key("rsa", bits=2048)
    cert = certs.self_signed_certificate(key, f"/O=Test/CN={cn}", usage="signature")
    return save_pair(directory, name, key, cert)


@dataclass
class Org:
    slug: str
    email: str
    token: str
    mtls: Pair
    sign: Pair | None
    project_id: int = 0


# --- the running system ----------------------------------------------------------------------


class AccessLog(logging.Handler):
    """Collects the gateway's JSON access-log lines (logger ``twofold.access``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.lines.append(record.getMessage())

    def mark(self) -> int:
        with self._lock2:
            return len(self.lines)

    def since(self, mark: int) -> list[dict[str, Any]]:
        with self._lock2:
            return [json.loads(line) for line in self.lines[mark:]]

    def raw_since(self, mark: int) -> list[str]:
        with self._lock2:
            return list(self.lines[mark:])


@dataclass
class World:
    """One running `twofold serve`, seeded with acme, globex and initech."""

    base: Path
    config: ServeConfig
    server: LoopThread
    registry: Registry
    upstream: Upstream
    access: AccessLog
    facts: dict[str, Any]
    ca_path: Path
    issuing_ca: LocalCA
    down_port: int
    orgs: dict[str, Org] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    # -- addresses

    def port(self, env: str = "cat") -> int:
        return self.config.ports[env]

    def url(self, path: str = "", env: str = "cat") -> str:
        return f"https://localhost:{self.port(env)}{path}"

    @property
    def portal(self) -> str:
        return f"https://localhost:{self.config.portal_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.config.admin_port}"

    # -- the registry, directly (operator steps), on the server's own loop

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self.server.call(coroutine, timeout)

    def version(self) -> int:
        return self.call(self.registry.version())

    def readyz(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.admin}/readyz", timeout=5).json())

    def sync(self, deadline: float = 3.0) -> float:
        """Wait until the gateway's snapshot includes every registry change made so far;
        returns how long that took. Fails after ``deadline`` seconds."""
        want = self.version()
        started = time.monotonic()
        while True:
            seen = self.readyz().get("registry_version")
            if isinstance(seen, int) and seen >= want:
                return time.monotonic() - started
            if time.monotonic() - started > deadline:
                raise AssertionError(
                    f"the gateway is at registry version {seen}, not {want}, after {deadline} s"
                )
            time.sleep(0.02)

    # -- the portal's JSON API, as an organisation user

    def api(self, org: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.portal,
            verify=ssl.create_default_context(cafile=str(self.ca_path)),
            headers={"Authorization": f"Bearer {self.orgs[org].token}"},
            timeout=30,
        )

    def register(self, org: str, env: str, use: str, pair: Pair) -> dict[str, Any]:
        with self.api(org) as api:
            response = api.post(
                "/api/v1/certificates", json={"environment": env, "use": use, "certificate": pair.pem}
            )
        assert response.status_code == 201, response.text
        return dict(response.json())

    def remove(self, org: str, env: str, pair: Pair) -> dict[str, Any]:
        with self.api(org) as api:
            response = api.delete(f"/api/v1/certificates/{pair.fingerprint}", params={"env": env})
        assert response.status_code == 200, response.text
        return dict(response.json())

    # -- clients of the gateway

    def client_context(self, pair: Pair | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if pair is not None:
            context.load_cert_chain(str(pair.cert_path), str(pair.key_path))
        return context

    def client(self, pair: Pair | None, env: str = "cat", **kwargs: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.url("", env),
            verify=self.client_context(pair),
            timeout=kwargs.pop("timeout", 15),
            **kwargs,
        )

    # -- admin

    def metrics_text(self) -> str:
        return httpx.get(f"{self.admin}/metrics", timeout=5).text

    def assert_no_internal_errors(self) -> None:
        """Not one request of the module ended in the gateway's own 500, and it is alive."""
        assert httpx.get(f"{self.admin}/healthz", timeout=5).status_code == 200
        text = self.metrics_text()
        assert 'outcome="internal_error"' not in text, text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the gateway's /metrics (0 when absent)."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


def payment(e2e: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "payments": {
            "paymentIdentifiers": {"endToEndId": e2e or f"E2E-{uuid.uuid4().hex[:16].upper()}"},
            "value": {"amount": "125.50", "currency": "USD"},
            "debtor": {"account": "000123456789"},
            "creditor": {"account": "000987654321"},
            **extra,
        }
    }


def assert_refusal(
    response: httpx.Response, status: int, code: str | set[str] | None = None
) -> dict[str, Any]:
    """A refusal as the issue promises it: the status, JSON ``{"error": {"code", "message"}}``
    and nothing else, never a traceback. Returns the error object."""
    text = response.text
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {text[:500]}"
    assert "Traceback" not in text, text
    assert 'File "' not in text, text
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    error = body["error"]
    assert isinstance(error["code"], str), body
    assert error["code"], body
    assert isinstance(error["message"], str), body
    assert len(error["message"]) > 10, body
    if isinstance(code, str):
        assert error["code"] == code, body
    elif code is not None:
        assert error["code"] in code, body
    return dict(error)


def tls_outcome(
    port: int,
    pair: Pair | None,
    ca_path: Path,
    *,
    sni: str | None = "localhost",
    path: str = "/accessapi/balance",
    context: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
) -> tuple[str, ssl.SSLSession | None]:
    """One new connection with a raw ``ssl`` socket and one GET: ``("refused", None)`` when
    TLS refused the client (at the handshake, or on the first read under TLS 1.3), else
    the HTTP status line and the TLS session."""
    if context is None:
        context = ssl.create_default_context(cafile=str(ca_path))
        if pair is not None:
            context.load_cert_chain(str(pair.cert_path), str(pair.key_path))
    if sni is None:
        context.check_hostname = False  # no SNI is sent when server_hostname is None
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            tls = context.wrap_socket(raw, server_hostname=sni, session=session)
        except (ssl.SSLError, ConnectionError, OSError):
            return "refused", None
        with tls:
            try:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while b"\r\n" not in data:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except (ssl.SSLError, ConnectionError, OSError):
                return "refused", None
            if not data:
                return "refused", None
            return data.split(b"\r\n", 1)[0].decode(), tls.session
    finally:
        raw.close()


def post_at_once(
    clients: list[Callable[[], httpx.Client]], path: str, body: bytes, headers: dict[str, str]
) -> list[int]:
    """The same POST on one connection per client factory, all released at the same moment
    (each connection handshaken first, with a GET of the balance); the statuses, sorted."""
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(len(clients))

    def send(make: Callable[[], httpx.Client]) -> None:
        with make() as client:
            client.get("/accessapi/balance")
            start.wait()
            status = client.post(path, content=body, headers=headers).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send, args=(make,)) for make in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return sorted(statuses)


def wait_until(check: Callable[[], bool], deadline: float, interval: float = 0.02) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > deadline:
            raise AssertionError(f"not true within {deadline} s")
        time.sleep(interval)
    return time.monotonic() - started


# --- starting and seeding ---------------------------------------------------------------------


async def _operator_seed(registry: Registry, world: World) -> None:
    """What the platform operator does: a CA for CA-issued client certificates on both
    environments, extra products behind the recording upstream, and the organisations with
    one API Security + Developer user each (and an API token for the portal API)."""
    ca_pem = certs.certificate_pem(world.issuing_ca.certificate).decode()
    for env in ("cat", "prod"):
        await registry.save_environment(SYSTEM, env, ca_pem=ca_pem)
    up = world.upstream.url
    extra_products = [
        (
            "recorded",
            "Recorded (signature required)",
            "/recorded",
            up,
            "required",
            ["application/jose", "text/xml"],
        ),
        ("relay", "Relay (signature optional)", "/relay", up, "optional", None),
        ("plain", "Plain (no signature)", "/plain", up, "none", ["application/json", "text/xml"]),
        ("slow", "Slow API", "/slow", up, "none", ["application/json"]),
        ("down", "Down API", "/down", f"http://127.0.0.1:{world.down_port}", "none", ["application/json"]),
        (
            "ledger",
            "Ledger (in nobody's project)",
            "/ledger",
            "sandbox:balance",
            "none",
            ["application/json"],
        ),
    ]
    for pid, name, prefix, upstream, signature, types in extra_products:
        await registry.save_product(
            SYSTEM,
            pid,
            name=name,
            path_prefix=prefix,
            upstream=upstream,
            signature=signature,
            content_types=types,
        )
    for slug in ("acme", "globex", "initech"):
        email = f"security@{slug}.example"
        await registry.add_org(SYSTEM, slug, f"{slug.title()} Ltd")
        await registry.add_user(SYSTEM, email, org=slug, roles=["api_security", "developer"], password=None)
        world.extra[f"token:{slug}"] = await registry.create_token(SYSTEM, "e2e", for_email=email)


PRODUCTS = {
    "acme": ["balance", "payments", "echo", "recorded", "relay", "plain", "slow", "down"],
    "globex": ["balance", "payments", "echo"],
    "initech": ["balance", "payments", "echo"],
}


def _seed(world: World) -> None:
    world.call(_operator_seed(world.registry, world))
    clients = world.base / "clients"
    for slug in ("acme", "globex", "initech"):
        directory = clients / slug
        mtls = ec_pair(directory, "mtls", f"{slug}-cat")
        sign = rsa_pair(directory, "sign", f"{slug}-cat-sign") if slug != "initech" else None
        org = Org(slug, f"security@{slug}.example", world.extra[f"token:{slug}"], mtls, sign)
        world.orgs[slug] = org
        world.register(slug, "cat", "mtls", mtls)
        if sign is not None:
            world.register(slug, "cat", "signature", sign)
        with world.api(slug) as api:
            created = api.post("/api/v1/projects", json={"name": f"{slug} treasury"})
            assert created.status_code == 201, created.text
            org.project_id = int(created.json()["id"])
            for product in PRODUCTS[slug]:
                added = api.put(f"/api/v1/projects/{org.project_id}/products/cat/{product}")
                assert added.status_code == 200, added.text
    # acme also has a certificate from the shared issuing CA, registered in prod only.
    issued = world.issuing_ca.issue("acme-prod", usage="client")
    world.extra["acme_prod"] = save_pair(clients / "acme", "prod", issued.key, issued.certificate)
    world.register("acme", "prod", "mtls", world.extra["acme_prod"])
    world.sync()


@contextlib.contextmanager
def running_world(
    base: Path,
    *,
    db: str | None = None,
    after_stop: Callable[[], None] | None = None,
    **settings: Any,
) -> Iterator[World]:
    """`twofold.serve.run` on free ports, seeded; stopped and cleaned up afterwards.
    ``after_stop`` runs once `run` has returned, before its event loop is closed (which
    would close whatever it left open); ``settings`` are more `ServeConfig` settings."""
    base.mkdir(parents=True, exist_ok=True)
    config = ServeConfig(
        data=base / "data",
        db=db,
        portal_port=free_port(),
        admin_port=free_port(),
        ports={"cat": free_port(), "prod": free_port()},
        max_body=MAX_BODY,
        upstream_timeout=UPSTREAM_TIMEOUT,
        access_log=True,
        **settings,  # e.g. the timeouts, smtp
    )
    access = AccessLog()
    logger = logging.getLogger("twofold.access")
    previous_level = logger.level
    logger.addHandler(access)
    logger.setLevel(logging.INFO)
    upstream = Upstream()
    server = LoopThread("twofold-serve")
    stop: asyncio.Event | None = None
    started = threading.Event()
    facts: dict[str, Any] = {}
    announced: list[str] = []

    async def make_stop() -> asyncio.Event:
        return asyncio.Event()

    stop = server.call(make_stop())

    def ready(values: dict[str, Any]) -> None:
        facts.update(values)
        started.set()

    task = asyncio.run_coroutine_threadsafe(
        run(config, announced.append, ready=ready, stop=stop), server.loop
    )
    registry: Registry | None = None
    try:
        deadline = time.monotonic() + 60
        while not started.wait(0.05):
            if task.done():
                task.result()  # raises what stopped the start
                raise AssertionError("twofold serve stopped before it was ready")
            if time.monotonic() > deadline:
                raise AssertionError("twofold serve did not start within 60 s")
        registry = server.call(Registry.open(config.db_url, migrate=False))
        world = World(
            base=base,
            config=config,
            server=server,
            registry=registry,
            upstream=upstream,
            access=access,
            facts=facts,
            ca_path=Path(facts["ca"]),
            issuing_ca=LocalCA("twofold e2e issuing CA"),
            down_port=free_port(),
            extra={"announced": announced},
        )
        _seed(world)
        yield world
    finally:
        if registry is not None:
            with contextlib.suppress(Exception):
                server.call(registry.close(), timeout=10)
        server.loop.call_soon_threadsafe(stop.set)
        try:
            task.result(30)
            if after_stop is not None:
                after_stop()
        finally:
            server.close()
        upstream.close()
        logger.removeHandler(access)
        logger.setLevel(previous_level)


def token_parts() -> str:
    """A random marker to look for in logs and upstream bodies."""
    return f"marker-{secrets.token_hex(8)}"


async def seed_balance_client(db: Path, mtls_pem: bytes) -> str:
    """For a `twofold serve` started as a process: organisation acme with one mTLS
    certificate in cat and the balance product in a project; returns its fingerprint."""
    registry = await Registry.open(str(db))
    try:
        await registry.add_org(SYSTEM, "acme")
        await registry.add_user(
            SYSTEM, "sec@acme.test", org="acme", roles=["api_security", "developer"], password=None
        )
        who = await registry.token_principal(await registry.create_token(SYSTEM, for_email="sec@acme.test"))
        row = await registry.add_certificate(who, "cat", "mtls", mtls_pem)
        project = await registry.create_project(who, "treasury")
        await registry.set_project_product(who, project["id"], "balance", "cat", present=True)
        return str(row["fingerprint"])
    finally:
        await registry.close()


# --- raw HTTP/1.1 over mTLS, for what real clients rarely do -----------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class _AnswerParser:
    def __init__(self) -> None:
        self.done: list[Answer] = []
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.done.append(Answer(self.parser.get_status_code(), self._headers, b"".join(self._body)))
        self._headers, self._body = {}, []


class RawClient:
    """One mTLS connection on which a test writes exactly the bytes it wants and reads the
    answers as they come (interim 100 Continue included)."""

    def __init__(
        self, world: World, pair: Pair | None = None, *, rcvbuf: int | None = None, env: str = "cat"
    ):
        context = world.client_context(pair or world.orgs["acme"].mtls)
        raw = socket.socket()
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", world.port(env)))
        self.tls = context.wrap_socket(raw, server_hostname="localhost")
        self._answers = _AnswerParser()

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)

    def answers(self, count: int, timeout: float = 10) -> list[Answer]:
        """Read until ``count`` answers are complete (fewer if the server closes first)."""
        deadline = time.monotonic() + timeout
        while len(self._answers.done) < count and time.monotonic() < deadline:
            self.tls.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.tls.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionError):
                break
            if not data:
                break
            self._answers.parser.feed_data(data)
        done, self._answers.done = self._answers.done[:count], self._answers.done[count:]
        return done

    def head_answer(self, timeout: float = 10) -> bytes:
        """The raw bytes of an answer without a body (to HEAD): its head, and whatever
        arrived after it within a moment (which must be nothing)."""
        data = b""
        self.tls.settimeout(timeout)
        while b"\r\n\r\n" not in data:
            chunk = self.tls.recv(65536)
            if not chunk:
                break
            data += chunk
        self.tls.settimeout(0.2)
        with contextlib.suppress(TimeoutError, ssl.SSLError):
            data += self.tls.recv(65536)
        return data

    def closed_by_server(self, timeout: float = 5) -> bool:
        """Whether the server closes the connection within ``timeout`` seconds."""
        self.tls.settimeout(timeout)
        try:
            while True:
                data = self.tls.recv(65536)
                if not data:
                    return True
                self._answers.parser.feed_data(data)
        except (ssl.SSLError, ConnectionError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, *, chunked: bool = False
) -> bytes:
    """One request as bytes: Content-Length (or chunked framing) set from the body."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:]) if part)
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + framed + b"0\r\n\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body
