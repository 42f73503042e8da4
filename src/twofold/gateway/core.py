"""The gateway of one process: the live registry snapshot (reloaded when the registry
changes), the TLS trust that follows it, the pipeline's steps over it, forwarding, and
what each request leaves behind (metrics, one access-log line)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
import time
from dataclasses import dataclass

from cryptography import x509

from twofold.crypto.keys import PrivateKey
from twofold.gateway import pipeline
from twofold.gateway.calls import CallRecorder
from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.forward import Forwarder, Response, error_response
from twofold.gateway.listeners import Connections
from twofold.gateway.metrics import Metrics
from twofold.gateway.pipeline import Admitted, Outcome
from twofold.gateway.sandbox import Forwarded
from twofold.gateway.signing import ResponseSigner
from twofold.gateway.snapshot import Snapshot, load_snapshot
from twofold.gateway.trust import Trust
from twofold.gateway.wire import Limits
from twofold.registry.db import RegistryUnavailable, is_sqlite, normalise_url
from twofold.registry.service import Registry

log = logging.getLogger("twofold.gateway")
access_log = logging.getLogger("twofold.access")


@dataclass(frozen=True)
class GatewayConfig:
    max_body: int = 1024 * 1024
    upstream_timeout: float = 30.0
    poll_interval: float = 0.25
    access_log: bool = True
    header_timeout: float = 10.0  # from a request's first byte (or the handshake) to its last header
    body_timeout: float = 30.0  # from the last header to the last byte of the body
    idle_timeout: float = 75.0  # idle between requests
    max_connections: int = 10000  # per listener (and the process's descriptor limit caps them all)
    # The registry unreachable: requests are served from the last snapshot for this long,
    # then refused (503 registry_unavailable) until it answers again.
    registry_grace: float = 300.0
    replay_durable: bool = True  # replay ids committed to disk before the request is forwarded

    @property
    def limits(self) -> Limits:
        return Limits(
            max_body=self.max_body,
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            idle_timeout=self.idle_timeout,
            send_timeout=self.body_timeout,
        )


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
        signer: ResponseSigner | None = None,
    ) -> None:
        self.registry = registry
        self.config = config or GatewayConfig()
        self.metrics = metrics or Metrics()
        self.trust = Trust(key, certificate, chain)
        self.forwarder = Forwarder(
            registry, self.config.upstream_timeout, signer, replay_durable=self.config.replay_durable
        )
        self.limits = self.config.limits
        self.connections = Connections()
        self.snapshot: Snapshot | None = None
        self._last_poll = 0.0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.calls = CallRecorder(registry.record_calls)  # recent calls for the dashboards

    # --- snapshot and TLS trust -----------------------------------------------------------

    async def refresh(self) -> Snapshot:
        started = time.perf_counter()
        snapshot = await load_snapshot(self.registry, self.snapshot)
        self.snapshot = snapshot  # requests see the change first (a removal: on their next request)
        self.trust.update(snapshot)  # then new TLS handshakes
        self.metrics.snapshot_seconds.set(time.perf_counter() - started)
        for env in snapshot.environments:
            self.metrics.expiring.labels(env).set(snapshot.expiring(env, dt.timedelta(days=30)))
        self.metrics.registry_version.set(snapshot.version)
        self.metrics.snapshot_reloads.inc()
        self._last_poll = time.monotonic()
        return snapshot

    def listening_context(self, env: str) -> ssl.SSLContext:
        """The TLS context for a new connection of an environment's listener: the newest."""
        assert self.snapshot is not None, "refresh() first"
        return self.trust.context(env, self.snapshot)

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

    @property
    def registry_age(self) -> float:
        """Seconds since the registry last answered a poll."""
        return time.monotonic() - self._last_poll

    @property
    def serving(self) -> bool:
        """False once the registry has not answered for longer than ``registry_grace``: the
        snapshot may no longer say who is allowed in (failed closed)."""
        return self.snapshot is not None and self.registry_age <= self.config.registry_grace

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        await self.forwarder.start()
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
        await self.connections.stop()
        await self.calls.stop()
        await self.forwarder.close()

    # --- the pipeline over the live snapshot ----------------------------------------------------

    def admit(self, facts: ConnectionFacts, head: RequestHead, outcome: Outcome) -> Admitted:
        """identify → route → authorise → the declared length (before the body)."""
        snapshot = self.snapshot
        assert snapshot is not None
        if time.monotonic() - self._last_poll > self.config.registry_grace:
            raise _failed_closed(self.config.registry_grace)
        return pipeline.admit(snapshot, facts, head, self.config.max_body, outcome)

    def prepare(
        self, facts: ConnectionFacts, admitted: Admitted, head: RequestHead, body: bytes, outcome: Outcome
    ) -> Forwarded:
        """read → verify (the whole body is in)."""
        return pipeline.prepare(facts, admitted, head, body, self.config.max_body, outcome)

    async def forward(self, admitted: Admitted, forwarded: Forwarded, outcome: Outcome) -> Response:
        return await self.forwarder.forward(admitted.product, forwarded, outcome)

    def internal_error(self, exc: BaseException, head: RequestHead | None, outcome: Outcome) -> Response:
        outcome.code = "internal_error"
        log.error(
            "unexpected %s on %s %s",
            type(exc).__name__,
            head.method if head else "-",
            head.path if head else "-",
            exc_info=(type(exc), exc, exc.__traceback__) if log.isEnabledFor(logging.DEBUG) else None,
        )
        return error_response(500, "internal_error", "the gateway failed; it has been logged")

    def record(
        self,
        facts: ConnectionFacts,
        method: str | None,
        path: str | None,
        status: int,
        outcome: Outcome,
        elapsed: float,
    ) -> None:
        """Metrics and the access-log line of one request (never a body or a header value)."""
        env = facts.environment
        self.metrics.requests.count(env, outcome.product or "-", outcome.code, elapsed)
        self.calls.record(env, outcome, method or "-", path or "-", status)
        if self.config.access_log:
            access_log.info(
                json.dumps(
                    {
                        "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                        "env": env,
                        "org": outcome.org,
                        "cert": outcome.fingerprint,
                        "product": outcome.product,
                        "method": method,
                        "path": path,
                        "status": status,
                        "outcome": outcome.code,
                        "signed_by": outcome.signature_fingerprint,
                        "ms": round(elapsed * 1000, 2),
                    },
                    separators=(",", ":"),
                )
            )


def _failed_closed(grace: float) -> RegistryUnavailable:
    return RegistryUnavailable(
        f"the gateway has not reached its registry for more than {grace:g} s, so it cannot tell who "
        f"may call: try again in {RegistryUnavailable.retry_after} seconds"
    )
