"""Soak: many keep-alive clients sending signed payments through the gateway for a while —
does anything fail, does memory grow? (issue 11; ``make soak``)

Starts ``twofold serve`` (its own process, a fresh data directory, SQLite unless ``--db``)
with an organisation whose mTLS and Digital Signature certificates are registered in
``cat`` and the sandbox payments product in its project (ES256 accepted besides RS256, so
that the load generator is not the bottleneck); with ``--protect``, payments also get replay
protection and signed responses. Then ``--clients`` connections (mTLS, keep-alive, one
asyncio loop with uvloop) each POST payments one after another for ``--seconds``: every
payment is a new ``endToEndId`` (and ``jti``), signed as a compact JWS just before it is
sent, and must be answered 202. A warm-up of ``--warm-up`` seconds under the same load comes
first and is not counted.

Measured: requests, errors (any other status, a connection error, a read timeout), requests/s,
latency p50/p99, and the resident memory (VmRSS) of serve's whole process tree every second;
"RSS growth" compares the mean of the last third of the run with the mean of the first third.
Pass (exit 0): 0 errors and RSS growth under ``--max-growth`` (10 %). Exit 1 otherwise, 2 when
the set-up failed.

    .venv/bin/python bench/soak.py [--clients 100] [--seconds 60] [--warm-up 10] [--workers 1]
        [--protect] [--db postgresql://…] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

from twofold.crypto import certs, jws, keys
from twofold.registry.auth import SYSTEM, Principal, parse_roles
from twofold.registry.service import Registry

TWOFOLD = str(Path(sys.executable).with_name("twofold"))
PATH = "/tsapi/v1/payments"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Client:
    mtls_cert: Path
    mtls_key: Path
    sign_key: keys.PrivateKey
    sign_pem: bytes
    mtls_pem: bytes


def make_client(work: Path) -> Client:
    mtls = keys.generate_private_key("ec")
    mtls_cert = certs.self_signed_certificate(mtls, "/O=Soak Corp/CN=soak-client", days=30)
    sign = keys.generate_private_key("ec")
    sign_cert = certs.self_signed_certificate(
        sign, "/O=Soak Corp/CN=soak-signing", days=30, usage="signature"
    )
    cert_path, key_path = work / "mtls.crt", work / "mtls.key"
    cert_path.write_bytes(certs.certificate_pem(mtls_cert))
    key_path.write_bytes(keys.private_key_bytes(mtls))
    return Client(
        cert_path, key_path, sign, certs.certificate_pem(sign_cert), certs.certificate_pem(mtls_cert)
    )


async def seed(url: str, client: Client, protect: bool) -> None:
    from twofold.gateway.sandbox import DEFAULT_PRODUCTS

    registry = await Registry.open(url)
    try:
        await registry.ensure_defaults()
        payments = next(p for p in DEFAULT_PRODUCTS if p["id"] == "payments")
        await registry.save_product(
            SYSTEM,
            "payments",
            name=payments["name"],
            path_prefix=payments["path_prefix"],
            upstream=payments["upstream"],
            signature="required",
            content_types=payments["content_types"],
            algorithms=["RS256", "ES256"],
            replay_window=300 if protect else 0,
            sign_responses=protect,
        )
        org = await registry.add_org(SYSTEM, "soak", "Soak Corp")
        user = await registry.add_user(
            SYSTEM, "soak@soak.example", org="soak", roles="api_security,developer", password=None
        )
        actor = Principal(
            user["email"], user["id"], org["id"], org["slug"], parse_roles(user["roles"]), mfa_passed=True
        )  # as an API token would be
        project = await registry.create_project(actor, "soak")
        await registry.set_project_product(actor, project["id"], "payments", "cat", present=True)
        await registry.add_certificate(actor, "cat", "mtls", client.mtls_pem)
        await registry.add_certificate(actor, "cat", "signature", client.sign_pem)
    finally:
        await registry.close()


# --- serve and its memory ---------------------------------------------------------------------


def tree_rss_bytes(root: int) -> int:
    """VmRSS of ``root`` and its descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with (
                contextlib.suppress(OSError),
                open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f,
            ):
                stat = f.read()
                parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    members, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in members:
                members.add(child)
                frontier.append(child)
    total = 0
    for pid in members:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    port: int
    ca: Path
    log: Path

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def start_serve(work: Path, args: argparse.Namespace, client: Client) -> Serve:
    data = work / "data"
    data.mkdir(mode=0o700)
    url = args.db or str(data / "twofold.db")
    asyncio.run(seed(url, client, args.protect))
    port, portal, admin = free_port(), free_port(), free_port()
    config = work / "twofold.toml"
    config.write_text(
        f'db = "{url}"\nportal_port = {portal}\nadmin_port = {admin}\nworkers = {args.workers}\n[ports]\ncat = {port}\nprod = 0\n'
    )
    log = work / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [TWOFOLD, "serve", "--data", str(data), "--config", str(config), "--no-access-log"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Serve(process, port, data / "ca" / "ca.crt", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"twofold serve exited:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as response,
        ):
            if response.status == 200:
                return served
        time.sleep(0.2)
    served.stop()
    raise SystemExit("twofold serve did not get ready within 60 s")


# --- the load ------------------------------------------------------------------------------------


@dataclass
class Tally:
    counting: bool = False
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class _Answer:
    def __init__(self) -> None:
        self.done = False
        self.body = b""

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def _payment(key: keys.PrivateKey) -> bytes:
    e2e = f"SOAK-{uuid.uuid4().hex[:20].upper()}"
    claims = {
        "iat": int(time.time()),
        "jti": uuid.uuid4().hex,
        "payments": {
            "paymentIdentifiers": {"endToEndId": e2e},
            "value": {"amount": "125.50", "currency": "USD"},
            "debtor": {"account": "000123456789"},
            "creditor": {"account": "000987654321"},
        },
    }
    token = jws.sign(json.dumps(claims, separators=(",", ":")).encode(), key, alg="ES256").encode()
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/jose\r\n"
        f"Content-Length: {len(token)}\r\n\r\n"
    ).encode() + token


async def one_client(
    served: Serve, context: ssl.SSLContext, client: Client, tally: Tally, stop: float
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=context, server_hostname="localhost"
    )
    try:
        while time.monotonic() < stop:
            request = _payment(client.sign_key)
            answer = _Answer()
            parser = httptools.HttpResponseParser(answer)
            started = time.perf_counter()
            writer.write(request)
            try:
                while not answer.done:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    if not data:
                        raise ConnectionError("closed by the gateway")
                    parser.feed_data(data)
            except (TimeoutError, ConnectionError, OSError, httptools.HttpParserError) as exc:
                if tally.counting:
                    tally.error(type(exc).__name__)
                return
            if tally.counting:
                tally.requests += 1
                tally.latencies.append(time.perf_counter() - started)
                if parser.get_status_code() != 202:
                    tally.error(f"HTTP {parser.get_status_code()} {answer.body[:120]!r}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def load(served: Serve, client: Client, args: argparse.Namespace) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(served.ca))
    context.load_cert_chain(str(client.mtls_cert), str(client.mtls_key))
    tally = Tally()
    start = time.monotonic()
    measure_from = start + args.warm_up
    stop = measure_from + args.seconds
    tasks = [
        asyncio.create_task(one_client(served, context, client, tally, stop)) for _ in range(args.clients)
    ]
    rss: list[tuple[float, int]] = []
    while time.monotonic() < stop:
        now = time.monotonic()
        if now >= measure_from:
            if not tally.counting:
                tally.counting, counted_from = True, now
            rss.append((now - measure_from, tree_rss_bytes(served.process.pid)))
        await asyncio.sleep(1.0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            tally.error(type(result).__name__)
    elapsed = time.monotonic() - counted_from
    third = max(1, len(rss) // 3)
    first = statistics.mean(v for _t, v in rss[:third])
    last = statistics.mean(v for _t, v in rss[-third:])
    latencies = sorted(tally.latencies) or [0.0]
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "warm_up_seconds": args.warm_up,
        "workers": args.workers,
        "protect": args.protect,
        "database": "postgresql" if args.db else "sqlite",
        "requests": tally.requests,
        "errors": tally.errors,
        "error_kinds": tally.error_kinds,
        "requests_per_second": tally.requests / elapsed,
        "latency_p50_ms": latencies[len(latencies) // 2] * 1000,
        "latency_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "rss_first_third_mb": first / 2**20,
        "rss_last_third_mb": last / 2**20,
        "rss_max_mb": max(v for _t, v in rss) / 2**20,
        "rss_growth": last / first - 1,
        "rss_samples": len(rss),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--warm-up", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--protect", action="store_true", help="replay protection and signed responses on")
    parser.add_argument("--db", help="a PostgreSQL URL of an empty database (default: SQLite)")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    work = Path(tempfile.mkdtemp(prefix="twofold-soak-"))
    served = None
    try:
        client = make_client(work)
        served = start_serve(work, args, client)
        report = asyncio.run(load(served, client, args))
        alive = served.process.poll() is None
        log = served.log.read_text(errors="replace")
    finally:
        if served is not None:
            served.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["serve_alive"] = alive
    report["tracebacks_in_log"] = log.count("Traceback")
    ok = (
        report["errors"] == 0
        and report["rss_growth"] < args.max_growth
        and alive
        and not report["tracebacks_in_log"]
    )
    report["pass"] = ok
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"soak: {args.clients} keep-alive clients × {args.seconds} s of signed payments "
            f"(after {args.warm_up} s of warm-up), {args.workers} gateway process(es), {report['database']}"
            f"{', replay protection and signed responses' if args.protect else ''}\n"
            f"  requests {report['requests']:,}  errors {report['errors']}  {report['requests_per_second']:,.0f}/s  "
            f"p50 {report['latency_p50_ms']:.1f} ms  p99 {report['latency_p99_ms']:.1f} ms\n"
            f"  RSS first third {report['rss_first_third_mb']:.1f} MB, last third {report['rss_last_third_mb']:.1f} MB "
            f"({report['rss_growth']:+.1%}), max {report['rss_max_mb']:.1f} MB\n"
            f"  {'PASS' if ok else 'FAIL'} (0 errors, RSS growth under {args.max_growth:.0%})"
        )
        if report["error_kinds"]:
            print(f"  errors: {report['error_kinds']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
