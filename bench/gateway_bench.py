"""The twofold gateway against nginx as an mTLS reverse proxy, measured side by side in one run:
keep-alive signed requests/s and new mTLS handshakes/s.

Everything runs on this machine, started by this script in a temporary directory and stopped
at the end (also on Ctrl-C or failure):

* **upstream** — Debian's nginx answering ``return 200 '{…}'`` over plain HTTP/1.1 with
  keep-alive (one worker, logs off): the fastest upstream available here, so that neither
  proxy waits on it. Both proxies forward to this same upstream over pooled keep-alive
  connections.
* **nginx** (the reference) — ``worker_processes W``, TLS 1.2/1.3 with the server certificate
  and key of the twofold data directory (so both sides do identical server-side crypto),
  Mozilla intermediate suites, no session tickets or cache, ``ssl_verify_client on`` with the
  client certificate pinned as ``ssl_client_certificate``, ``proxy_pass`` to the upstream with
  upstream keepalive, access log off. nginx does not verify the JWS: it forwards it as is.
* **twofold** — ``twofold serve --workers W --no-access-log`` in a fresh data directory whose
  registry has an organisation with the client's mTLS and Digital Signature certificates in
  environment ``cat``, and a project holding an API product (signature required, RS256) whose
  upstream is the same nginx upstream. Every request is mTLS-identified, authorised,
  JWS-verified (RS256, RSA-2048) and the verified JSON forwarded.

Load: **wrk** (Debian) holds ``--connections`` keep-alive TLS connections and POSTs the same
pre-signed compact JWS of a ~300-byte payment initiation (``Content-Type: application/jose``)
to both proxies. wrk has no client-certificate option, so a 20-line ``LD_PRELOAD`` shim,
compiled here with ``cc``, loads the client certificate and key into every ``SSL_CTX`` wrk
creates; nothing else about wrk changes. Handshakes: ``openssl s_time -new`` with the same
client certificate, ``--handshake-clients`` processes at once (default W: a single client
measures the serial latency of one handshake after another and leaves a second worker idle).
Every contender is also compared with 1 worker against 1 worker (unless
``--skip-single-worker``).

Rounds are interleaved (each round runs every contender once, in a shuffled order); the
report shows medians over rounds and the median of the per-round ratio twofold ÷ nginx with
the same worker count. It also shows the CPU time each side's processes used per request
or handshake (from /proc) — on a 2-core machine the load generator, the upstream and the
proxy share the CPUs, so this is what explains the ratios —, the load-generator ceiling (wrk
against an nginx location that answers ``return 200`` itself over the same mTLS keep-alive
connections), and how much CPU processes outside the bench took meanwhile.

* **the edge** (unless ``--skip-edge``) — nginx with the configuration ``twofold edge config
  nginx`` prints, terminating mTLS in front of ``twofold serve --edge nginx`` (plain HTTP on unix
  sockets, the client certificate in nginx's header; twofold still identifies, authorises and
  JWS-verifies every request). Its CPU is nginx's and twofold's together.

Targets (exit status 1 when one is missed, after printing everything): with ``--workers W``
on both sides, new handshakes/s ≥ 0.9× nginx and keep-alive signed requests/s ≥ 0.4× nginx;
through the edge, new handshakes/s ≥ 1.0× nginx alone (its keep-alive ratio is reported).
Exit status 2: the set-up or a sanity check failed, nothing was measured.

    .venv/bin/python bench/gateway_bench.py [--rounds 7] [--seconds 3] [--workers 2]
        [--json | --markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from twofold.crypto import certs, jws, keys
from twofold.edge_config import Plan, Site
from twofold.edge_config import render as render_edge_config
from twofold.gateway.edge import socket_path
from twofold.registry.auth import SYSTEM, Principal, parse_roles
from twofold.registry.service import Registry
from twofold.serve import local_tls
from twofold.tls import INTERMEDIATE_CIPHERS

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TWOFOLD = str(Path(sys.executable).with_name("twofold"))
HANDSHAKE_TARGET = 0.9
KEEPALIVE_TARGET = 0.4  # issue 10
EDGE_HANDSHAKE_TARGET = 1.0  # nginx terminating mTLS in front of twofold --edge nginx
PATH = "/tsapi/v1/payments"
ENV = "cat"

# A bank payment initiation, serialised compactly: the body a client signs and sends (the
# same ~300 bytes as bench/jws_bench.py).
PAYLOAD: bytes = json.dumps(
    {
        "paymentIdentifiers": {"endToEndId": "E2E-20250114-000042-7Q3F9K"},
        "value": {"currency": "EUR", "amount": "1250.00"},
        "debtor": {"name": "Acme Trading GmbH", "account": {"iban": "DE89370400440532013000"}},
        "creditor": {"name": "Nordic Parts Oy", "account": {"iban": "FI2112345600000785"}},
        "remittanceInformation": "INV-0117",
    },
    separators=(",", ":"),
).encode()
# What the upstream answers to every request.
UPSTREAM_BODY = (
    '{"paymentInitiationResponse":{"endToEndId":"E2E-20250114-000042-7Q3F9K",'
    '"firmRootId":"0f1c9a4e-5b7d-4c2a-9e3f-8d6b1a2c3e4f"}}'
)

# Loads the client certificate into every SSL_CTX the program creates (wrk has no option for
# it). No OpenSSL headers needed: the symbols resolve against the program's own libssl.
SHIM_C = r"""
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
extern void *dlsym(void *, const char *);
extern char *getenv(const char *);
extern int SSL_CTX_use_certificate_chain_file(SSL_CTX *, const char *);
extern int SSL_CTX_use_PrivateKey_file(SSL_CTX *, const char *, int);
extern int SSL_CTX_check_private_key(const SSL_CTX *);
#define RTLD_NEXT ((void *) -1l)
#define SSL_FILETYPE_PEM 1

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static SSL_CTX *(*real)(const SSL_METHOD *);
    if (!real) real = (SSL_CTX *(*)(const SSL_METHOD *)) dlsym(RTLD_NEXT, "SSL_CTX_new");
    SSL_CTX *ctx = real(method);
    const char *cert = getenv("BENCH_CLIENT_CERT"), *key = getenv("BENCH_CLIENT_KEY");
    if (ctx && cert && key
        && (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1
            || SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1
            || SSL_CTX_check_private_key(ctx) != 1))
        return 0;
    return ctx;
}
"""

WRK_LUA = """\
wrk.method = "POST"
wrk.body = "{body}"
wrk.headers["Content-Type"] = "application/jose"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"duration_us\\":%d,\\"requests\\":%d,\\"connect\\":%d,\\"read\\":%d,"
    .. "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}}\\n",
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class SetupError(Exception):
    """The bench could not be set up or a sanity check failed: nothing is measured."""


def _abort(reason: str) -> NoReturn:
    raise SetupError(reason)


# --- processes and cleanup ------------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Services:
    """The long-running processes this script started, each in its own process group (so
    that nginx workers and twofold's extra gateway processes stop with their parent)."""

    def __init__(self) -> None:
        self.started: list[Service] = []

    def start(
        self, name: str, argv: list[str], log: Path, port: int, env: dict[str, str] | None = None
    ) -> Service:
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                env=env,
                start_new_session=True,
            )
        service = Service(name, process, log, port)
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.started):
            if service.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for service in reversed(self.started):
            try:
                service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Still unreaped, so its id still names our group: kill all of it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(service.process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.process.wait(5)
        self.started.clear()


def _raise_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (one per process with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as handle:
            next(handle)
            for line in handle:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def wait_until(what: str, check: Any, service: Service, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            _abort(f"{service.name} exited while waiting for {what}:\n{service.log_tail()}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.1)
    _abort(f"timed out waiting for {what}:\n{service.log_tail()}")


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields_ = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry)] = int(fields_[1])
        times[int(entry)] = int(fields_[11]) + int(fields_[12])
    members, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in members:
                members.add(child)
                frontier.append(child)
    return sum(times.get(pid, 0) for pid in members) / _clock_ticks()


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as handle:
        values = [int(v) for v in handle.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / _clock_ticks()


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- material -------------------------------------------------------------------------------


@dataclass
class Material:
    dir: Path
    client_cert: Path
    client_key: Path
    client_pem: bytes
    signature_pem: bytes
    token: bytes
    tampered: bytes
    shim: Path
    wrk_script: Path


def make_material(work: Path, client_key_kind: str) -> Material:
    mdir = work / "client"
    mdir.mkdir()
    if client_key_kind == "rsa":
        mtls_key = keys.generate_private_key("rsa", bits=2048)
    else:
        mtls_key = keys.generate_private_key("ec", curve="P-256")
    mtls_cert = certs.self_signed_certificate(mtls_key, "/O=Bench Corp/CN=bench-client", days=30)
    signature_key = keys.generate_private_key("rsa", bits=2048)
    signature_cert = certs.self_signed_certificate(
        signature_key, "/O=Bench Corp/CN=bench-signing", days=30, usage="signature"
    )
    client_cert, client_key = mdir / "client.crt", mdir / "client.key"
    client_cert.write_bytes(certs.certificate_pem(mtls_cert))
    client_key.write_bytes(keys.private_key_bytes(mtls_key))
    token = jws.sign(PAYLOAD, signature_key, alg="RS256").encode("ascii")
    signature_segment = token.rsplit(b".", 1)[1]
    flipped = b"B" if signature_segment[:1] != b"B" else b"C"
    tampered = token[: len(token) - len(signature_segment)] + flipped + signature_segment[1:]
    (mdir / "token.jws").write_bytes(token)
    (mdir / "tampered.jws").write_bytes(tampered)

    shim_c, shim = mdir / "client_cert_shim.c", mdir / "client_cert_shim.so"
    shim_c.write_text(SHIM_C)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _abort("no C compiler (cc) to build the client-certificate shim for wrk; run scripts/system-deps.sh")
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(shim), str(shim_c)], capture_output=True, text=True
    )
    if built.returncode != 0:
        _abort(f"compiling the wrk client-certificate shim failed:\n{built.stderr}")
    wrk_script = mdir / "post_jws.lua"
    wrk_script.write_text(WRK_LUA.format(body=token.decode("ascii")))
    return Material(
        mdir,
        client_cert,
        client_key,
        certs.certificate_pem(mtls_cert),
        certs.certificate_pem(signature_cert),
        token,
        tampered,
        shim,
        wrk_script,
    )


# --- the contenders -------------------------------------------------------------------------


def _nginx_common(prefix: Path, workers: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""


def start_nginx(services: Services, name: str, prefix: Path, conf: str, port: int) -> Service:
    prefix.mkdir(parents=True)
    (prefix / "nginx.conf").write_text(conf)
    test = subprocess.run(
        [NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
    )
    if test.returncode != 0:
        _abort(f"nginx rejects the {name} configuration:\n{test.stderr}")
    service = services.start(
        name,
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
        prefix / "stdout.log",
        port,
    )
    service.log = prefix / "error.log"

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_until(f"{name} on port {port}", up, service)
    return service


def start_upstream(services: Services, work: Path) -> Service:
    port = free_port()
    prefix = work / "upstream"
    conf = (
        _nginx_common(prefix, 1)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{UPSTREAM_BODY}';
        }}
    }}
}}
"""
    )
    return start_nginx(services, "upstream (nginx return 200)", prefix, conf, port)


def start_nginx_proxy(
    services: Services,
    work: Path,
    workers: int,
    upstream: int,
    server_cert: Path,
    server_key: Path,
    m: Material,
) -> Service:
    port = free_port()
    prefix = work / f"nginx-w{workers}"
    conf = (
        _nginx_common(prefix, workers)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""    upstream api {{
        server 127.0.0.1:{upstream};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl reuseport backlog=4096;
        ssl_certificate {server_cert};
        ssl_certificate_key {server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {INTERMEDIATE_CIPHERS};
        ssl_prefer_server_ciphers on;
        ssl_session_tickets off;
        ssl_session_cache off;
        ssl_verify_client on;
        ssl_client_certificate {m.client_cert};
        ssl_verify_depth 1;
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Client-Verify $ssl_client_verify;
            proxy_set_header X-Client-Cert-Fingerprint $ssl_client_fingerprint;
        }}
        location = /direct {{
            default_type application/json;
            return 200 '{UPSTREAM_BODY}';
        }}
    }}
}}
"""
    )
    return start_nginx(services, f"nginx proxy (worker_processes {workers})", prefix, conf, port)


async def seed_registry(data: Path, upstream: int, m: Material, db: str | None = None) -> None:
    """An organisation with the client's mTLS and signature certificates in ``cat`` and a
    project with a signature-required API product whose upstream is the bench upstream."""
    registry = await Registry.open(db or str(data / "twofold.db"))
    try:
        await registry.ensure_defaults()
        org = await registry.add_org(SYSTEM, "bench", "Bench Corp")
        user = await registry.add_user(
            SYSTEM, "bench@bench.example", org="bench", roles="api_security,developer", password=None
        )
        actor = Principal(
            user["email"], user["id"], org["id"], org["slug"], parse_roles(user["roles"]), mfa_passed=True
        )
        await registry.save_product(
            SYSTEM,
            "payments-bench",
            name="Payments (bench)",
            path_prefix=PATH,
            upstream=f"http://127.0.0.1:{upstream}",
            signature="required",
            algorithms=["RS256"],
        )
        project = await registry.create_project(actor, "bench")
        await registry.set_project_product(actor, project["id"], "payments-bench", ENV, present=True)
        await registry.add_certificate(actor, ENV, "mtls", m.client_pem)
        await registry.add_certificate(actor, ENV, "signature", m.signature_pem)
    finally:
        await registry.close()


def server_tls(work: Path) -> Path:
    """twofold's local CA and localhost server certificate (EC P-256), created once and
    shared by every server of the run: each twofold data directory gets a copy, nginx loads
    the same files."""
    shared = work / "server-tls"
    local_tls(shared, lambda _message: None)
    return shared


def start_twofold(
    services: Services, work: Path, workers: int, upstream: int, m: Material, tls: Path, *, edge: bool = False
) -> Service:
    """``twofold serve``; with ``edge``, behind nginx (``--edge nginx``: plain HTTP on unix
    sockets, the client certificate from nginx's header)."""
    data = work / (f"twofold-edge-w{workers}" if edge else f"twofold-w{workers}")
    data.mkdir()
    for part in ("ca", "tls"):
        shutil.copytree(tls / part, data / part)
    asyncio.run(seed_registry(data, upstream, m))
    port, portal, admin = free_port(), free_port(), free_port()
    config = data / "twofold.toml"
    config.write_text(f"ports = {{ {ENV} = {port}, prod = 0 }}\n" + ('edge = "nginx"\n' if edge else ""))
    service = services.start(
        f"twofold serve --workers {workers}" + (" --edge nginx" if edge else ""),
        [
            TWOFOLD,
            "serve",
            "--data",
            str(data),
            "--config",
            str(config),
            "--portal-port",
            str(portal),
            "--admin-port",
            str(admin),
            "--workers",
            str(workers),
            "--no-access-log",
        ],
        data / "serve.log",
        port,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as response:
            if edge:
                return response.status == 200 and all(p.is_socket() for p in edge_sockets(data, workers))
            return response.status == 200 and listening_sockets(port) >= workers

    wait_until(f"{service.name} to be ready with {workers} listener(s)", ready, service)
    return service


def edge_sockets(data: Path, workers: int) -> list[Path]:
    return [socket_path(data / "edge", ENV, index) for index in range(workers)]


def start_nginx_edge(
    services: Services, work: Path, workers: int, twofold: Service, tls: Path, data: Path | None = None
) -> Service:
    """nginx with the configuration `twofold edge config nginx` prints, in front of the
    twofold started with ``edge`` (data directory ``data``): nginx terminates mTLS, twofold
    does everything else."""
    port = free_port()
    data = data or work / f"twofold-edge-w{workers}"
    prefix = work / f"edge-nginx-{data.name}"
    plan = Plan(
        edge="nginx",
        sites=(Site(ENV, port, tuple(str(p) for p in edge_sockets(data, workers))),),
        listen="127.0.0.1",
        cert=tls / "tls" / "server.crt",
        key=tls / "tls" / "server.key",
        ca=tls / "ca" / "ca.crt",
        run_dir=prefix,
        user="root" if os.geteuid() == 0 else None,
        worker_processes=workers,
    )
    conf = "daemon off;\n" + render_edge_config(plan)
    return start_nginx(
        services, f"edge: nginx (worker_processes {workers}) → {twofold.name}", prefix, conf, port
    )


# --- sanity checks with real clients --------------------------------------------------------


def curl(
    port: int, m: Material, ca: Path, body: Path | None, path: str = PATH, cert: bool = True
) -> tuple[int, str]:
    argv = ["curl", "-sS", "--max-time", "10", "--cacert", str(ca), "-o", "-", "-w", "\n%{http_code}"]
    if cert:
        argv += ["--cert", str(m.client_cert), "--key", str(m.client_key)]
    if body is not None:
        argv += ["-H", "Content-Type: application/jose", "--data-binary", f"@{body}"]
    argv.append(f"https://localhost:{port}{path}")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        return 0, done.stderr.strip()
    text, _, code = done.stdout.rpartition("\n")
    return int(code), text


def sanity_check(services: list[Service], m: Material, ca: Path) -> None:
    """Before anything is timed: the signed POST gets the upstream's answer through both
    proxies, twofold refuses a tampered signature, and both refuse a caller without a client
    certificate."""
    token, tampered = m.dir / "token.jws", m.dir / "tampered.jws"
    expected = json.loads(UPSTREAM_BODY)
    twofold = [s for s in services if s.name.startswith(("twofold", "edge"))]
    nginx = [s for s in services if s.name.startswith("nginx")]
    for service in services:
        status, text = curl(service.port, m, ca, token)
        if status != 200 or json.loads(text or "null") != expected:
            _abort(f"{service.name}: the signed POST got {status} {text[:300]!r}\n{service.log_tail()}")
        status, text = curl(service.port, m, ca, token, cert=False)
        if status == 200:
            _abort(f"{service.name} answered 200 to a caller without a client certificate")
    for service in twofold:
        status, text = curl(service.port, m, ca, tampered)
        if status != 401 or "jws_signature_invalid" not in text:
            _abort(f"{service.name}: a tampered JWS got {status} {text[:300]!r}, expected 401")
    for service in nginx:
        status, text = curl(service.port, m, ca, None, path="/direct")
        if status != 200:
            _abort(f"{service.name}: GET /direct got {status} {text[:300]!r}")


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Sample:
    rate: float  # requests/s or handshakes/s
    count: int
    seconds: float
    target_cpu: float  # CPU seconds of the measured server's processes
    upstream_cpu: float
    client_cpu: float  # the load generator's
    other_cpu: float  # everything else on the machine (other tenants, the bench script)


@dataclass(frozen=True)
class Task:
    kind: str  # keepalive | handshake | ceiling
    side: str  # twofold | nginx
    workers: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.side}/w{self.workers}"


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(s.rate for s in self.samples)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        rates = [s.rate for s in self.samples]
        return (max(rates) - min(rates)) / self.rate if self.rate else 0.0

    def cpu_us(self, attr: str) -> float:
        """Median over rounds of CPU µs per operation of one group of processes."""
        return statistics.median(getattr(s, attr) / s.count * 1e6 if s.count else 0.0 for s in self.samples)


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        m: Material,
        upstream: Service,
        targets: dict[Task, Service],
        behind: dict[str, Service] | None = None,
    ):
        self.args, self.m, self.upstream, self.targets = args, m, upstream, targets
        self.behind = behind or {}  # an edge's name → the twofold behind it (its CPU is the side's too)
        self.wrk_env = {
            **os.environ,
            "LD_PRELOAD": str(m.shim),
            "BENCH_CLIENT_CERT": str(m.client_cert),
            "BENCH_CLIENT_KEY": str(m.client_key),
        }

    def _run(self, task: Task, seconds: float) -> Sample:
        service = self.targets[task]
        pids = [service.process.pid] + (
            [self.behind[service.name].process.pid] if service.name in self.behind else []
        )

        def side_cpu() -> float:
            return sum(tree_cpu_seconds(pid) for pid in pids)

        target0, upstream0, client0, busy0 = (
            side_cpu(),
            tree_cpu_seconds(self.upstream.process.pid),
            children_cpu_seconds(),
            machine_busy_seconds(),
        )
        if task.kind == "handshake":
            count, elapsed = self._s_time(service.port, seconds)
        else:
            count, elapsed = self._wrk(service.port, "/direct" if task.kind == "ceiling" else PATH, seconds)
        busy = machine_busy_seconds() - busy0
        target = side_cpu() - target0
        upstream = tree_cpu_seconds(self.upstream.process.pid) - upstream0
        client = children_cpu_seconds() - client0
        return Sample(
            count / elapsed,
            count,
            elapsed,
            target,
            upstream,
            client,
            max(0.0, busy - target - upstream - client),
        )

    def _wrk(self, port: int, path: str, seconds: float) -> tuple[int, float]:
        argv = [
            "wrk",
            "-t",
            str(self.args.threads),
            "-c",
            str(self.args.connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(self.m.wrk_script),
            f"https://127.0.0.1:{port}{path}",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.wrk_env, timeout=seconds + 60)
        found = re.search(r"^WRKJSON (\{.*\})$", done.stdout, re.MULTILINE)
        if done.returncode != 0 or not found:
            _abort(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        result = json.loads(found.group(1))
        errors = {k: result[k] for k in ("connect", "read", "write", "status", "timeout") if result[k]}
        if errors:
            _abort(f"wrk saw errors against port {port}{path}: {errors}\n{done.stdout}")
        return int(result["requests"]), result["duration_us"] / 1e6

    def _s_time(self, port: int, seconds: float) -> tuple[int, float]:
        argv = [
            "openssl",
            "s_time",
            "-connect",
            f"127.0.0.1:{port}",
            "-new",
            "-cert",
            str(self.m.client_cert),
            "-key",
            str(self.m.client_key),
            "-CAfile",
            str(self.args.ca),
            "-time",
            str(max(1, round(seconds))),
        ]
        started = time.perf_counter()
        clients = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(self.args.handshake_clients)
        ]
        try:
            outputs = [client.communicate(timeout=seconds + 60) for client in clients]
        except BaseException:
            for client in clients:
                client.kill()
                client.wait()
            raise
        elapsed = time.perf_counter() - started
        count = 0
        for client, (out, err) in zip(clients, outputs, strict=True):
            found = re.search(r"^(\d+) connections in [\d.]+s;", out, re.MULTILINE)
            if client.returncode != 0 or not found:
                _abort(f"openssl s_time failed ({client.returncode}):\n{out}\n{err}")
            count += int(found.group(1))
        return count, elapsed

    def warm_up(self) -> None:
        for task in self.targets:
            self._run(task, 1)

    def measure(self, tasks: list[Task], progress: bool) -> dict[Task, Series]:
        results: dict[Task, Series] = {task: Series() for task in tasks}
        for round_no in range(1, self.args.rounds + 1):
            order = tasks[:]
            random.shuffle(order)
            this_round: dict[Task, Sample] = {}
            for task in order:
                time.sleep(0.5)  # let the previous contender's connections close
                this_round[task] = self._run(task, self.args.seconds)
                if progress:
                    print(f"  round {round_no}: {task.key} {this_round[task].rate:,.0f}/s", file=sys.stderr)
            for task, sample in this_round.items():
                results[task].samples.append(sample)
                reference = this_round.get(Task(task.kind, "nginx", task.workers))
                if reference is not None:
                    results[task].ratios.append(sample.rate / reference.rate)
        return results


# --- reporting ------------------------------------------------------------------------------


def other_load(results: dict[Task, Series]) -> tuple[float, float]:
    """(median, max) share of the machine's CPUs used by processes outside the bench during
    the measured runs: other tenants of a shared machine."""
    cpus = len(os.sched_getaffinity(0))
    shares = [s.other_cpu / (s.seconds * cpus) for series in results.values() for s in series.samples]
    return statistics.median(shares), max(shares)


def noise_line(results: dict[Task, Series]) -> str:
    median, worst = other_load(results)
    return (
        f"Processes outside the bench used a median {median:.0%} (max {worst:.0%}) of the machine's CPUs "
        "during the measured runs."
    )


LABELS = {
    "keepalive": "keep-alive signed POST, requests/s",
    "handshake": "new mTLS handshakes/s (`openssl s_time -new`)",
}
TARGETS = {"keepalive": KEEPALIVE_TARGET, "handshake": HANDSHAKE_TARGET}
CPU_LABELS = {"keepalive": "keep-alive signed POST, per request", "handshake": "new mTLS handshake"}


def _version(argv: list[str], pattern: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        found = re.search(pattern, done.stdout + done.stderr)
        if found:
            return found.group(1)
    return "?"


def machine_facts() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "twofold": importlib.metadata.version("twofold"),
        "httptools": importlib.metadata.version("httptools"),
        "uvloop": importlib.metadata.version("uvloop"),
        "nginx": _version([NGINX, "-v"], r"nginx/(\S+)"),
        "openssl": _version(["openssl", "version"], r"OpenSSL (\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def describe_run(facts: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"Median of {args.rounds} interleaved rounds × {args.seconds:g} s per contender. Load: wrk "
        f"{facts['wrk']} (`-t {args.threads} -c {args.connections}`, client certificate via an LD_PRELOAD "
        f"shim) POSTing one pre-signed {len(PAYLOAD)}-byte payment as an RS256 compact JWS; "
        f"{args.handshake_clients} × `openssl s_time -new`. Client certificate "
        f"{'RSA-2048' if args.client_key == 'rsa' else 'EC P-256'} (pinned), server certificate EC P-256 "
        f"(twofold's local CA, the same file for both); TLS 1.3 negotiated. Upstream: nginx `return 200` "
        f"(1 worker, keep-alive). twofold {facts['twofold']} (its own HTTP/1.1 core on uvloop "
        f"{facts['uvloop']} + httptools {facts['httptools']}, "
        f"{facts['python']}), nginx {facts['nginx']}, OpenSSL {facts['openssl']}; "
        f"{facts['cpus_usable']}/{facts['cpu_count']} CPUs ({facts['cpu_model']}), load {facts['load_average']}"
    )


def check_targets(results: dict[Task, Series], workers: int) -> list[tuple[str, bool]]:
    checks = []
    for kind, target in TARGETS.items():
        ratio = results[Task(kind, "twofold", workers)].ratio
        checks.append(
            (
                f"{LABELS[kind]} with {workers} worker(s): {ratio:.2f}× nginx, target ≥ {target:.2f}×",
                ratio >= target,
            )
        )
    edge = results.get(Task("handshake", "edge", workers))
    if edge is not None:
        checks.append(
            (
                f"{LABELS['handshake']} through the nginx edge with {workers} worker(s): {edge.ratio:.2f}× "
                f"nginx alone, target ≥ {EDGE_HANDSHAKE_TARGET:.2f}×",
                edge.ratio >= EDGE_HANDSHAKE_TARGET,
            )
        )
    return checks


def rows(results: dict[Task, Series], worker_counts: list[int]) -> list[dict[str, Any]]:
    out = []
    for workers in worker_counts:
        for kind in ("keepalive", "handshake"):
            ours, theirs = results[Task(kind, "twofold", workers)], results[Task(kind, "nginx", workers)]
            out.append(
                {
                    "kind": kind,
                    "workers": workers,
                    "twofold": ours,
                    "nginx": theirs,
                    "edge": results.get(Task(kind, "edge", workers)),
                    "target": TARGETS[kind] if workers == worker_counts[0] else None,
                }
            )
    return out


def markdown_report(results: dict[Task, Series], worker_counts: list[int], ceiling: Series) -> str:
    lines = [
        "| measurement | workers | twofold | nginx | twofold ÷ nginx | target | |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows(results, worker_counts):
        ours, theirs, target = row["twofold"], row["nginx"], row["target"]
        verdict = "—" if target is None else ("pass" if ours.ratio >= target else "**missed**")
        target_text = "—" if target is None else f"≥ {target:.2f}×"
        lines.append(
            f"| {LABELS[row['kind']]} | {row['workers']} | {ours.rate:,.0f} | {theirs.rate:,.0f} | "
            f"{ours.ratio:.2f}× | {target_text} | {verdict} |"
        )
    edge_rows = [row for row in rows(results, worker_counts) if row["edge"] is not None]
    if edge_rows:
        lines += [
            "",
            "Behind the TLS edge: nginx terminating mTLS with `twofold edge config nginx`, in front of "
            "`twofold serve --edge nginx` (unix sockets, the certificate in nginx's header, every request "
            "identified, authorised and JWS-verified by twofold):",
            "",
            "| measurement | workers | nginx → twofold | nginx alone | ÷ nginx alone | CPU µs (nginx + twofold) | target |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in edge_rows:
            edge, theirs = row["edge"], row["nginx"]
            target = (
                f"≥ {EDGE_HANDSHAKE_TARGET:.2f}× ({'pass' if edge.ratio >= EDGE_HANDSHAKE_TARGET else '**missed**'})"
                if row["kind"] == "handshake" and row["workers"] == worker_counts[0]
                else "reported"
            )
            lines.append(
                f"| {LABELS[row['kind']]} | {row['workers']} | {edge.rate:,.0f} | {theirs.rate:,.0f} | "
                f"{edge.ratio:.2f}× | {edge.cpu_us('target_cpu'):,.0f} | {target} |"
            )
    lines += [
        "",
        "CPU time per request or handshake (median over rounds; µs of CPU, all processes of each group):",
        "",
        "| measurement | workers | twofold µs | nginx µs | twofold ÷ nginx | upstream µs | load generator µs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows(results, worker_counts):
        ours, theirs = row["twofold"], row["nginx"]
        ours_us, theirs_us = ours.cpu_us("target_cpu"), theirs.cpu_us("target_cpu")
        upstream = (
            f"{ours.cpu_us('upstream_cpu'):.0f} / {theirs.cpu_us('upstream_cpu'):.0f}"
            if row["kind"] == "keepalive"
            else "—"
        )
        client = f"{ours.cpu_us('client_cpu'):.0f} / {theirs.cpu_us('client_cpu'):.0f}"
        lines.append(
            f"| {CPU_LABELS[row['kind']]} | {row['workers']} | {ours_us:,.0f} | "
            f"{theirs_us:,.0f} | {ours_us / theirs_us if theirs_us else 0:.1f}× | {upstream} | {client} |"
        )
    lines += [
        "",
        "(upstream and load-generator columns: during the twofold run / during the nginx run)",
        "",
        f"Load-generator ceiling: wrk against nginx answering `return 200` itself over the same mTLS "
        f"keep-alive connections ({worker_counts[0]} workers): {ceiling.rate:,.0f} requests/s "
        f"(nginx CPU {ceiling.cpu_us('target_cpu'):.0f} µs, wrk CPU {ceiling.cpu_us('client_cpu'):.0f} µs "
        f"per request).",
        "",
        noise_line({**results, Task("ceiling", "nginx", worker_counts[0]): ceiling}),
    ]
    return "\n".join(lines)


def text_report(results: dict[Task, Series], worker_counts: list[int], ceiling: Series) -> str:
    header = (
        f"{'measurement':<22}{'w':>3}{'twofold':>10}{'spread':>8}{'nginx':>10}{'spread':>8}"
        f"{'ratio':>8}{'tf µs':>9}{'ng µs':>8}"
    )
    lines = [header, "-" * len(header)]
    short = {"keepalive": "keep-alive req/s", "handshake": "new handshakes/s"}
    for row in rows(results, worker_counts):
        ours, theirs = row["twofold"], row["nginx"]
        lines.append(
            f"{short[row['kind']]:<22}{row['workers']:>3}{ours.rate:>10,.0f}{ours.spread:>8.0%}"
            f"{theirs.rate:>10,.0f}{theirs.spread:>8.0%}{ours.ratio:>7.2f}×"
            f"{ours.cpu_us('target_cpu'):>9,.0f}{theirs.cpu_us('target_cpu'):>8,.0f}"
        )
    for row in rows(results, worker_counts):
        edge = row["edge"]
        if edge is not None:
            lines.append(
                f"{'edge ' + short[row['kind']]:<22}{row['workers']:>3}{edge.rate:>10,.0f}{edge.spread:>8.0%}"
                f"{row['nginx'].rate:>10,.0f}{row['nginx'].spread:>8.0%}{edge.ratio:>7.2f}×"
                f"{edge.cpu_us('target_cpu'):>9,.0f}{row['nginx'].cpu_us('target_cpu'):>8,.0f}"
            )
    lines.append(
        f"{'ceiling: nginx direct':<22}{worker_counts[0]:>3}{'':>18}{ceiling.rate:>10,.0f}{ceiling.spread:>8.0%}"
    )
    lines.append("\n  µs = server CPU time per request/handshake, all processes of that side")
    lines.append("  edge = nginx terminating mTLS in front of twofold --edge nginx (both sides' CPU)")
    lines.append("  " + noise_line({**results, Task("ceiling", "nginx", worker_counts[0]): ceiling}))
    return "\n".join(lines)


def _series_json(series: Series) -> dict[str, Any]:
    return {
        "median_per_s": round(series.rate, 1),
        "median_ratio_to_nginx": round(series.ratio, 4) if series.ratios else None,
        "server_cpu_us_per_op": round(series.cpu_us("target_cpu"), 1),
        "upstream_cpu_us_per_op": round(series.cpu_us("upstream_cpu"), 1),
        "load_generator_cpu_us_per_op": round(series.cpu_us("client_cpu"), 1),
        "per_round": [
            {
                "per_s": round(s.rate, 1),
                "count": s.count,
                "seconds": round(s.seconds, 3),
                "server_cpu_s": round(s.target_cpu, 3),
                "upstream_cpu_s": round(s.upstream_cpu, 3),
                "load_generator_cpu_s": round(s.client_cpu, 3),
                "other_processes_cpu_s": round(s.other_cpu, 3),
            }
            for s in series.samples
        ],
        "ratio_by_round": [round(r, 4) for r in series.ratios],
    }


def json_report(
    facts: dict[str, Any],
    args: argparse.Namespace,
    results: dict[Task, Series],
    checks: list[tuple[str, bool]],
) -> str:
    report = {
        "benchmark": "gateway_vs_nginx",
        "machine": facts,
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "workers": args.workers,
            "wrk_threads": args.threads,
            "wrk_connections": args.connections,
            "handshake_clients": args.handshake_clients,
            "client_key": args.client_key,
            "payload_bytes": len(PAYLOAD),
        },
        "results": {task.key: _series_json(series) for task, series in results.items()},
        "other_processes_cpu_share": dict(
            zip(("median", "max"), map(lambda x: round(x, 3), other_load(results)), strict=True)
        ),
        "targets": [{"target": text, "passed": ok} for text, ok in checks],
        "passed": all(ok for _, ok in checks),
    }
    return json.dumps(report, indent=2, ensure_ascii=False)


# --- main -----------------------------------------------------------------------------------


def ensure_tools() -> None:
    missing = [tool for tool in ("openssl", "curl", "wrk", "cc") if shutil.which(tool) is None]
    if not os.path.exists(NGINX):
        missing.append("nginx")
    if missing:
        print(f"missing {', '.join(missing)}: running scripts/system-deps.sh", file=sys.stderr)
        subprocess.run([str(ROOT / "scripts" / "system-deps.sh")], check=False)
        still = [tool for tool in ("openssl", "curl", "wrk", "cc") if shutil.which(tool) is None]
        if still or not os.path.exists(NGINX):
            _abort(
                f"missing {', '.join(still or ['nginx'])}; install them with scripts/system-deps.sh as root"
            )


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="twofold-gateway-bench-"))
    if os.geteuid() == 0:
        work.chmod(0o755)  # nginx workers may run as another user
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    ensure_tools()
    facts = machine_facts()
    worker_counts = [args.workers] + ([1] if args.workers != 1 and not args.skip_single_worker else [])
    services = Services()
    previous = {
        sig: signal.signal(sig, _raise_on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        with workspace(args.keep_temp) as work:
            try:
                m = make_material(work, args.client_key)
                tls = server_tls(work)
                args.ca = tls / "ca" / "ca.crt"
                upstream = start_upstream(services, work)
                targets: dict[Task, Service] = {}
                started: list[Service] = []
                edge_processes: dict[str, Service] = {}  # the edge's twofold, whose CPU counts too
                for workers in worker_counts:
                    tf = start_twofold(services, work, workers, upstream.port, m, tls)
                    ng = start_nginx_proxy(
                        services,
                        work,
                        workers,
                        upstream.port,
                        tls / "tls" / "server.crt",
                        tls / "tls" / "server.key",
                        m,
                    )
                    started += [tf, ng]
                    for kind in ("keepalive", "handshake"):
                        targets[Task(kind, "twofold", workers)] = tf
                        targets[Task(kind, "nginx", workers)] = ng
                    if not args.skip_edge:
                        behind = start_twofold(services, work, workers, upstream.port, m, tls, edge=True)
                        edge = start_nginx_edge(services, work, workers, behind, tls)
                        started.append(edge)
                        for kind in ("keepalive", "handshake"):
                            targets[Task(kind, "edge", workers)] = edge
                            edge_processes[edge.name] = behind
                    if workers == args.workers:
                        targets[Task("ceiling", "nginx", workers)] = ng
                sanity_check(started, m, args.ca)
                bench = Bench(args, m, upstream, targets, edge_processes)
                progress = sys.stderr.isatty()
                if not args.json:
                    print(f"Gateway benchmark (twofold vs nginx)\n{describe_run(facts, args)}\n", flush=True)
                bench.warm_up()
                results = bench.measure(list(targets), progress)
            finally:
                services.stop_all()
    except SetupError as error:
        print(f"gateway bench: set-up or sanity check failed, nothing measured:\n{error}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    checks = check_targets(results, args.workers)
    if other_load(results)[0] > 0.1:
        print(
            "warning: other processes kept the machine busy during the measurements; "
            "the absolute numbers are low and the ratios noisier than usual",
            file=sys.stderr,
        )
    ceiling = results.pop(Task("ceiling", "nginx", args.workers))
    if args.json:
        results[Task("ceiling", "nginx", args.workers)] = ceiling
        print(json_report(facts, args, results, checks))
    elif args.markdown:
        print(markdown_report(results, worker_counts, ceiling))
        print()
        for text, ok in checks:
            print(f"- {'PASS' if ok else 'MISSED'}: {text}")
    else:
        print(text_report(results, worker_counts, ceiling))
        print("\nTargets:")
        for text, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    failed = [text for text, ok in checks if not ok]
    for text in failed:
        print(f"target missed: {text}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            Targets: handshakes ≥ 0.9× nginx and keep-alive signed requests ≥ 0.4× nginx,
            with --workers on both sides; through the nginx edge, handshakes ≥ 1.0× nginx
            alone. Exit 1 when one is missed, 2 when the set-up failed."""
        ),
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--seconds", type=int, default=3, help="seconds per contender per round (default 3)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="twofold --workers and nginx worker_processes (default: the CPU count)",
    )
    parser.add_argument(
        "--skip-single-worker", action="store_true", help="do not also compare 1 worker against 1 worker"
    )
    parser.add_argument(
        "--skip-edge", action="store_true", help="do not measure nginx as the TLS edge in front of twofold"
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--handshake-clients",
        type=int,
        help="concurrent `openssl s_time -new` processes (default: --workers; one client alone measures "
        "the serial handshake latency and leaves a second worker idle)",
    )
    parser.add_argument(
        "--client-key",
        choices=("rsa", "ec"),
        default="rsa",
        help="client mTLS key: RSA-2048 (default) or EC P-256",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the temporary directory (logs, configs)"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument("--markdown", action="store_true", help="Markdown tables for a README")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds < 1 or args.workers < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--rounds, --workers, --connections, --threads must be ≥ 1 and --seconds ≥ 1")
    if args.handshake_clients is None:
        args.handshake_clients = args.workers
    if args.handshake_clients < 1:
        parser.error("--handshake-clients must be ≥ 1")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
