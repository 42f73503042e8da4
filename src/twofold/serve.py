"""`twofold serve`: portal, gateways (one TLS listener per environment) and sandbox in one
process (plus `--workers` gateway processes sharing the ports), on SQLite by default."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import gc
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from sqlalchemy.exc import DBAPIError

from twofold import running
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.errors import UsageError
from twofold.gateway.edge import EDGES, EdgeListener, parse_proxies, socket_path
from twofold.gateway.fleet import Workers, worker_socket
from twofold.gateway.listeners import Listener
from twofold.gateway.sandbox import DEFAULT_PRODUCTS
from twofold.gateway.server import Gateway, GatewayConfig, admin_app, close_listener, serve_environment
from twofold.gateway.signing import ResponseSigner
from twofold.issuing import IssuingCAs, sync_issuing_cas
from twofold.lifecycle import ExpiryNotifier, NoticeSigner
from twofold.listener import GuardedSite, raise_nofile_limit
from twofold.mail import make_mailer
from twofold.portal.app import init_app
from twofold.portal.web import PortalConfig
from twofold.provider_keys import ProviderKey
from twofold.registry.auth import SYSTEM, new_password
from twofold.registry.db import check_sqlite_location, database_failure, redact
from twofold.registry.service import Registry
from twofold.settings import ServeConfig
from twofold.tls import server_context

log = logging.getLogger("twofold.serve")
OPERATOR_EMAIL = "admin@twofold.local"
STOP_GRACE = 10.0  # seconds the portal's requests, and notices being sent, get when serve stops


@dataclass(frozen=True)
class Credentials:
    ca: LocalCA
    ca_path: Path
    server_key: keys.PrivateKey
    server_cert: x509.Certificate


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def local_tls(data: Path, announce: Callable[[str], None]) -> Credentials:
    """The local CA and the server certificate for localhost, created on first start."""
    ca_key_path, ca_path = data / "ca" / "ca.key", data / "ca" / "ca.crt"
    key_path, cert_path = data / "tls" / "server.key", data / "tls" / "server.crt"
    if ca_key_path.exists() and ca_path.exists():
        ca = LocalCA(
            key=keys.load_private_key(ca_key_path.read_bytes(), name=str(ca_key_path)),
            certificate=certs.load_certificate(ca_path.read_bytes(), name=str(ca_path)),
        )
    else:
        ca = LocalCA("twofold local CA")
        _write_secret(ca_key_path, keys.private_key_bytes(ca.key))
        ca_path.write_bytes(certs.certificate_pem(ca.certificate))
        announce(f"created a local CA: {ca_path} (clients use it with --cacert)")
    server_cert = None
    if key_path.exists() and cert_path.exists():
        server_key = keys.load_private_key(key_path.read_bytes(), name=str(key_path))
        server_cert = certs.load_certificate(cert_path.read_bytes(), name=str(cert_path))
        why = _renew_because(server_cert)
        if why:
            announce(f"renewing the server certificate {cert_path}: {why}")
            server_cert = None
    if server_cert is None:
        issued = ca.issue(
            "localhost",
            usage="server",
            sans=["DNS:localhost", "IP:127.0.0.1", "IP:::1"],
            days=SERVER_CERT_DAYS,
        )
        server_key, server_cert = issued.key, issued.certificate
        _write_secret(key_path, keys.private_key_bytes(server_key))
        cert_path.write_bytes(certs.certificate_pem(server_cert))
        announce(f"created the server certificate for localhost: {cert_path}")
    return Credentials(ca, ca_path, server_key, server_cert)


# TLS server certificates live at most 398 days for browsers and 366 in Mozilla's guidelines
# (sslyze --mozilla_config checks it); the one serve makes lives a year and is renewed at start
# when it has less than a month left (or is one of the 825-day certificates of older versions).
SERVER_CERT_DAYS = 365
MAX_SERVER_CERT_DAYS = 366
RENEW_DAYS = 30


def _renew_because(cert: x509.Certificate, now: dt.datetime | None = None) -> str | None:
    now = now or dt.datetime.now(dt.UTC)
    lifespan = cert.not_valid_after_utc - cert.not_valid_before_utc
    if lifespan > dt.timedelta(days=MAX_SERVER_CERT_DAYS):
        return f"it lives {lifespan.days} days, more than {MAX_SERVER_CERT_DAYS}"
    left = certs.days_left(cert.not_valid_after_utc, now)
    if left < RENEW_DAYS:
        return f"it expires in {left} days" if left > 0 else "it has expired"
    return None


async def bootstrap(registry: Registry, announce: Callable[[str], None]) -> None:
    """Default environments and sandbox products, and an operator with a one-time password."""
    created = await registry.ensure_defaults()
    if created:
        announce(f"created the environments {', '.join(created)}")
    existing = {p["id"] for p in await registry.list_products()}
    for product in DEFAULT_PRODUCTS:
        if product["id"] not in existing and not existing:
            await registry.save_product(
                SYSTEM,
                product["id"],
                name=product["name"],
                path_prefix=product["path_prefix"],
                upstream=product["upstream"],
                signature=product["signature"],
                content_types=product["content_types"],
            )
    if not existing:
        announce("created the sandbox API products: " + ", ".join(p["path_prefix"] for p in DEFAULT_PRODUCTS))
    if not await registry.has_operator():
        password = new_password()
        await registry.add_user(
            SYSTEM, OPERATOR_EMAIL, org=None, roles="operator", password=password, one_time=True
        )
        announce(f"created the operator account {OPERATOR_EMAIL} with the one-time password: {password}")
        announce("  (shown once — the portal asks you to choose your own password at the first sign-in)")


def _settle_heap() -> None:
    """Move everything built at start-up (modules, snapshot, contexts) out of the garbage
    collector's sight: measured 6-19% less CPU per gateway request."""
    gc.collect()
    gc.freeze()


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _configure_logging(access_log: bool) -> None:
    access = logging.getLogger("twofold.access")
    access.propagate = False
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiohttp warns (to stderr) about a malformed Content-Disposition in a client's multipart
    # body, quoting it: the client's mistake, answered with a 400, and its bytes stay out of the log.
    warnings.filterwarnings("ignore", category=aiohttp.BadContentDispositionHeader)
    warnings.filterwarnings("ignore", category=aiohttp.BadContentDispositionParam)
    logging.getLogger("alembic").setLevel(logging.WARNING)


async def _gateway_listeners(
    gateway: Gateway, config: ServeConfig, envs: list[dict[str, Any]], index: int
) -> list[Listener | EdgeListener]:
    """Process ``index``'s listeners: TLS on each environment's port (shared by the processes
    with SO_REUSEPORT) — or, behind a TLS edge, plain HTTP for the edge on a unix socket of
    this process's own per environment, or on the environment's port (``edge_proxies``)."""
    listeners: list[Listener | EdgeListener] = []
    reuse_port = config.workers > 1
    sockets = config.edge_sockets
    try:
        for env in envs:
            port = config.gateway_port(env)
            if not port:
                continue
            try:
                if config.edge is None:
                    listeners.append(
                        await serve_environment(gateway, env["id"], config.host, port, reuse_port=reuse_port)
                    )
                    continue
                proxies = parse_proxies(config.edge_proxies) if config.edge_proxies else None
                edge = EdgeListener(gateway, env["id"], EDGES[config.edge], proxies)
                listeners.append(edge)
                if sockets is not None:
                    await edge.start_unix(socket_path(sockets, env["id"], index), config.edge_socket_group)
                else:
                    await edge.start_tcp(config.host, port, reuse_port=reuse_port)
            except OSError as exc:
                raise cannot_listen(exc, f"the {env['id']} gateway", config.host, port) from None
    except BaseException:
        for listener in listeners:
            await _close(listener)
        raise
    return listeners


async def _close(listener: Listener | EdgeListener) -> None:
    if isinstance(listener, EdgeListener):
        await listener.close()
    else:
        await close_listener(listener)


def cannot_listen(exc: OSError, what: str, host: str, port: int) -> UsageError:
    """A port that cannot be bound, said in one line with what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason = "the port is in use (another twofold serve, or another program)"
    return UsageError(
        f"cannot listen on {host}:{port} for {what}: {reason}. Stop what holds it, or choose other "
        "ports: --portal-port, --admin-port, or portal_port / admin_port / a [ports] table in --config",
        code="port_unavailable",
    )


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@dataclass
class _GatewayProcess:
    """The gateway side of one process: the gateway, its listeners and its admin listener."""

    gateway: Gateway
    listeners: list[Listener | EdgeListener]
    admin: web.AppRunner

    @classmethod
    async def start(
        cls, config: ServeConfig, registry: Registry, tls: Credentials, index: int
    ) -> _GatewayProcess:
        """Process ``index`` (0 is the main one) of ``config.workers``: listeners share the
        ports (SO_REUSEPORT) when there are several. The main process's admin listener answers
        for the node; an extra worker's listens on its private socket in <data>/run."""
        envs = await registry.list_environments()
        # the same limits as the portal's: one cap per listener, fitted to the open-files limit
        limits = config.limits.fitted(listeners=1 + len(envs), nofile=raise_nofile_limit())
        # The response key is in the registry (so in the portal's JWKS) before it signs anything.
        signer = ResponseSigner(
            ProviderKey.load_or_create(config.response_key_path, alg=config.response_signing_alg)
        )
        await registry.publish_signing_key("responses", signer.key.jwk)
        gateway = Gateway(
            registry,
            key=tls.server_key,
            certificate=tls.server_cert,
            signer=signer,
            config=GatewayConfig(
                max_body=config.max_body,
                upstream_timeout=config.upstream_timeout,
                access_log=config.access_log,
                header_timeout=limits.header_timeout,
                body_timeout=limits.body_timeout,
                idle_timeout=limits.idle_timeout,
                max_connections=limits.max_connections,
                registry_grace=config.registry_grace,
                replay_durable=config.replay_durable,
            ),
        )
        await gateway.start()
        try:
            listeners = await _gateway_listeners(gateway, config, envs, index)
        except BaseException:
            await gateway.stop()
            raise
        run_dir = config.data / "run"
        if index == 0:
            workers = Workers({i: worker_socket(run_dir, i) for i in range(1, config.workers)})
            admin = web.AppRunner(admin_app(gateway, workers=workers), access_log=None, handle_signals=False)
            await admin.setup()
            try:
                await web.TCPSite(admin, config.admin_host, config.admin_port).start()
            except OSError as exc:
                await cls(gateway, listeners, admin).stop()
                raise cannot_listen(exc, "health and metrics", config.admin_host, config.admin_port) from None
        else:  # the main process answers for it, from this private socket
            admin = web.AppRunner(admin_app(gateway), access_log=None, handle_signals=False)
            await admin.setup()
            path = worker_socket(run_dir, index)
            _private_socket_path(path)
            await web.UnixSite(admin, str(path)).start()
            os.chmod(path, 0o600)
        return cls(gateway, listeners, admin)

    async def stop(self) -> None:
        for listener in self.listeners:
            await _close(listener)
        await self.admin.cleanup()
        await self.gateway.stop()


async def run(
    config: ServeConfig,
    announce: Callable[[str], None],
    *,
    ready: Callable[[dict[str, Any]], None] | None = None,
    stop: asyncio.Event | None = None,
    register: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop``). With ``register`` the serve says where it is
    (data directory, ports, CA) in the user's runtime directory while it runs, for commands
    run from elsewhere (:mod:`twofold.running`)."""
    nofile = raise_nofile_limit()
    mail = config.mail_settings()  # a mail setting that cannot work stops here, before any file
    config.link_lifetime  # noqa: B018 - checked at start too
    issuing = config.issuing_files()  # so does an issuing CA setting
    _prepare_data(config.data)
    check_sqlite_location(config.db_url)
    issuers = IssuingCAs(config.data, issuing)
    mailer = make_mailer(mail, config.data)
    if not mail.smtp:
        announce(
            f'no SMTP server configured: mail is written to {config.data / "outbox"}/ (smtp = "host:port" sends it)'
        )
    try:
        registry = await Registry.open(config.db_url)
    except (DBAPIError, OSError) as exc:
        raise database_failure(config.db_url, exc, "cannot open", code="database_unavailable") from None
    try:
        tls = local_tls(config.data, announce)
        await bootstrap(registry, announce)
        await sync_issuing_cas(registry, issuers, announce, create_local=config.local_issuing_ca)
        envs = await registry.list_environments()
        gateways = await _GatewayProcess.start(config, registry, tls, 0)
        signer = NoticeSigner.load_or_create(config.data / "portal" / "notice-signing.key")
        await registry.publish_signing_key(signer.purpose, signer.jwk)
        notifier = ExpiryNotifier(registry, mailer=mailer, signer=signer, portal_url=config.public_url)
        # The expiry metric is served with the gateway's on the admin listener, not computed on
        # the request path: the notifier keeps its facts fresh.
        gateways.gateway.metrics.registry.register(notifier.collector())
        lifecycle_stop = asyncio.Event()
        lifecycle = asyncio.create_task(notifier.run(lifecycle_stop, interval=config.notice_interval))
        gateway_urls = tuple(
            (e["id"], f"https://localhost:{config.ports.get(e['id'], e['gateway_port'])}")
            for e in envs
            if config.ports.get(e["id"], e["gateway_port"])
        )
        portal = web.AppRunner(
            init_app(
                registry,
                PortalConfig(
                    gateway_urls=gateway_urls,
                    public_url=config.public_url,
                    mailer=mailer,
                    link_lifetime=config.link_lifetime,
                    issuers=issuers,
                    notice_jwks=signer.jwks(),
                ),
            ),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=STOP_GRACE,  # aiohttp's default would let a stop wait 60 s
        )
        await portal.setup()
        limits = config.limits.fitted(listeners=1 + len(gateways.listeners), nofile=nofile)
        if limits.max_connections < config.max_connections:
            log.warning(
                "at most %d connections per listener (not %d): the open-files limit is %d",
                limits.max_connections,
                config.max_connections,
                nofile,
            )
        portal_site = GuardedSite(
            portal,
            config.host,
            config.portal_port,
            limits=limits,
            ssl_context=server_context(tls.server_key, tls.server_cert, require_client_cert=False),
        )
        try:
            await portal_site.start()
        except OSError as exc:
            await gateways.stop()
            await portal.cleanup()
            raise cannot_listen(exc, "the portal", config.host, config.portal_port) from None
        workers = [_spawn_worker(config, index) for index in range(1, config.workers)]
        facts = {
            "portal": f"https://localhost:{config.portal_port}",
            "gateways": dict(gateway_urls),
            "admin": f"http://{config.admin_host}:{config.admin_port}",
            "ca": str(tls.ca_path),
            "db": redact(config.db_url),
            "workers": config.workers,
            "open_files": nofile,
            "max_connections": limits.max_connections,
            "edge": _edge_facts(config, gateways.listeners),
        }
        if register:
            running.announce(_running(config, facts, tls))
        _settle_heap()
        if ready:
            ready(facts)
        await (stop.wait() if stop else _wait_for_signal())
        for process in workers:
            process.terminate()
        lifecycle_stop.set()
        try:  # a notice still being sent is cancelled: its claim lapses and the next start sends it
            await asyncio.wait_for(lifecycle, STOP_GRACE)
        except TimeoutError:
            log.warning(
                "expiry notices were still being sent %g s after the stop: left for the next start",
                STOP_GRACE,
            )
        await gateways.stop()
        await portal.cleanup()
        for process in workers:
            process.join(5)
    finally:
        if register:
            running.withdraw(os.getpid())
        await registry.close()


def _prepare_data(data: Path) -> None:
    """The data directory: created on first start (0700: keys and the database are for this
    account only); anything else in its place is refused."""
    if data.exists() and not data.is_dir():
        raise UsageError(
            f"the data directory {data} is a file; give a directory (--data, or data = in --config)"
        )
    if not data.exists():
        try:
            data.mkdir(parents=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create the data directory {data}: {exc.strerror or exc}") from None


def _running(config: ServeConfig, facts: dict[str, Any], tls: Credentials) -> running.RunningServe:
    db, has_password = config.db, False
    if db is not None and redact(db) != db:
        db, has_password = None, True  # never written down: the reader is told to pass --db
    elif db is not None and "://" not in db:
        db = str(Path(db).resolve())
    return running.RunningServe(
        pid=os.getpid(),
        data=config.data.resolve(),
        portal=facts["portal"],
        gateways=dict(facts["gateways"]),
        ca=tls.ca_path.resolve(),
        db=db,
        db_has_password=has_password,
    )


def _private_socket_path(path: Path) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a process that did not stop cleanly


def _edge_facts(config: ServeConfig, listeners: list[Listener | EdgeListener]) -> dict[str, Any] | None:
    """Behind a TLS edge: which edge, and where each environment listens for it (the main
    process's listener; the extra workers' are beside it)."""
    if config.edge is None:
        return None
    return {
        "edge": config.edge,
        "listen": {item.env: item.address for item in listeners if isinstance(item, EdgeListener)},
        "proxies": list(config.edge_proxies),
    }


def _spawn_worker(config: ServeConfig, index: int) -> multiprocessing.process.BaseProcess:
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=_worker_main, args=(config, index), daemon=True, name=f"twofold-gateway-{index}"
    )
    process.start()
    return process


def _worker_main(config: ServeConfig, index: int) -> None:
    """An extra gateway process: the same listeners (SO_REUSEPORT), its own registry view, and
    its health and metrics on a private socket, which the main process's /metrics and /readyz
    include."""
    _install_uvloop()
    _configure_logging(config.access_log)
    raise_nofile_limit()

    async def main() -> None:
        tls = local_tls(config.data, lambda _m: None)
        registry = await Registry.open(config.db_url, migrate=False)
        gateways = await _GatewayProcess.start(config, registry, tls, index)
        _settle_heap()
        await _wait_for_signal()
        await gateways.stop()
        await registry.close()

    asyncio.run(main())


def serve(
    config: ServeConfig, announce: Callable[[str], None], ready: Callable[[dict[str, Any]], None]
) -> None:
    _install_uvloop()
    _configure_logging(config.access_log)
    asyncio.run(run(config, announce, ready=ready, register=True))
