"""A registry of 100,000 active certificates against one of 10, side by side in one run: the
gateway's start-up time, memory, the cost of one change and the keep-alive and handshake
rates — behind the nginx edge, and what direct TLS would take.

Both registries are PostgreSQL databases of their own (127.0.0.1:5432, user postgres),
seeded with the bench's client (mTLS + signature certificates, a project with a
signature-required product on the bench upstream) and filled with self-signed EC P-256
client certificates, each on a key of its own, inserted in bulk after the registry's own
upload rules checked them (see bench/scale_seed.py). For each, ``twofold serve --edge nginx``
runs behind nginx configured as ``twofold edge config nginx`` prints (bench/gateway_bench.py's
upstream, material and load generators):

* **start-up** — from starting ``twofold serve`` to its ``/readyz`` answering 200 (the snapshot
  loaded), and the resident memory of its processes then;
* **one change** — a probe client's certificate removed through the registry (what the portal
  does) while the probe holds a keep-alive connection through the edge: seconds until its next
  request is refused; then a new certificate registered: seconds until it is accepted; and
  ``twofold_snapshot_load_seconds``, the gateway's own time to reload and apply;
* **rates** — keep-alive signed POSTs (wrk) and new mTLS handshakes (``openssl s_time -new``)
  through each edge, in interleaved rounds; the report gives large ÷ small per round.

Direct TLS (no edge) trusts each registered certificate as an anchor of the listener's TLS
context, rebuilt on every change of the trusted set: the time OpenSSL takes to build a context
of N anchors is measured for growing N and extrapolated to the large registry.

Targets (exit 1 when one is missed): rates within 10% of the small registry's, a change visible
within 1 s. Exit 2: the set-up failed, nothing measured.

    .venv/bin/python bench/scale_bench.py [--certificates 100000] [--rounds 5] [--seconds 3]
        [--workers 1] [--markdown | --json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import ssl
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from gateway_bench import (
    ENV,
    PATH,
    TWOFOLD,
    Bench,
    Service,
    Services,
    SetupError,
    Task,
    _abort,
    _raise_on_signal,
    ensure_tools,
    free_port,
    make_material,
    sanity_check,
    seed_registry,
    server_tls,
    start_nginx_edge,
    start_upstream,
    wait_until,
    workspace,
)
from scale_seed import generate, insert_certificates
from twofold.crypto import certs, keys
from twofold.registry.auth import SYSTEM, Principal
from twofold.registry.service import Registry
from twofold.tls import server_context

PG_HOST = os.environ.get("TWOFOLD_BENCH_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TWOFOLD_BENCH_PGPORT", "5432"))
RATE_TOLERANCE = 0.10
VISIBLE_WITHIN = 1.0
DIRECT_SIZES = (1000, 2000, 4000, 8000)


def pg_url(database: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{database}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database="postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def rss_mb(root: int) -> float:
    """Resident memory of ``root`` and its descendants, MB."""
    total, members, frontier = 0, {root}, [root]
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with (
                contextlib.suppress(OSError),
                open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as h,
            ):
                stat = h.read()
                children.setdefault(int(stat[stat.rfind(")") + 2 :].split()[1]), []).append(int(entry))
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in members:
                members.add(child)
                frontier.append(child)
    for pid in members:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as h:
            found = re.search(r"^VmRSS:\s+(\d+) kB", h.read(), re.MULTILINE)
            total += int(found.group(1)) if found else 0
    return total / 1024


@dataclass
class Site:
    """One registry and its serve + edge."""

    size: int
    database: str
    data: Path
    admin: int = 0
    serve: Service | None = None
    edge: Service | None = None
    seed_seconds: float = 0.0
    startup_seconds: float = 0.0
    memory_mb: float = 0.0
    removal: list[float] = field(default_factory=list)
    addition: list[float] = field(default_factory=list)
    reload: list[float] = field(default_factory=list)


async def seed(site: Site, upstream: int, m: Any) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{site.database}" WITH (FORCE)')
    await _admin(f'CREATE DATABASE "{site.database}"')
    await seed_registry(site.data, upstream, m, db=pg_url(site.database))
    registry = await Registry.open(pg_url(site.database), migrate=False)
    try:
        filler = await asyncio.to_thread(generate, max(0, site.size - 1))
        await insert_certificates(registry, filler)
    finally:
        await registry.close()


def start_serve(services: Services, site: Site, workers: int, tls: Path) -> None:
    site.data.mkdir(exist_ok=True)
    for part in ("ca", "tls"):
        if not (site.data / part).exists():
            shutil.copytree(tls / part, site.data / part)
    site.admin = free_port()
    config = site.data / "twofold.toml"
    config.write_text(
        f'db = "{pg_url(site.database)}"\nedge = "nginx"\nports = {{ {ENV} = {free_port()}, prod = 0 }}\n'
    )
    started = time.perf_counter()
    service = services.start(
        f"twofold serve --edge nginx ({site.size:,} certificates)",
        [
            TWOFOLD,
            "serve",
            "--data",
            str(site.data),
            "--config",
            str(config),
            "--portal-port",
            str(free_port()),
            "--admin-port",
            str(site.admin),
            "--workers",
            str(workers),
            "--no-access-log",
        ],
        site.data / "serve.log",
        0,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{site.admin}/readyz", timeout=5) as response:
            return response.status == 200

    wait_until(f"{service.name} to be ready", ready, service, timeout=600)
    site.startup_seconds = time.perf_counter() - started
    time.sleep(2)  # settled
    site.memory_mb = rss_mb(service.process.pid)
    site.serve = service


def snapshot_seconds(site: Site) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.admin}/metrics?process=main", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^twofold_snapshot_load_seconds (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else math.nan


# --- one change, seen through the edge --------------------------------------------------------


class Probe:
    """A client holding one keep-alive mTLS connection through the edge."""

    def __init__(self, port: int, ca: Path, cert: Path, key: Path) -> None:
        import http.client

        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        self.connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)

    def status(self) -> int:
        self.connection.request("GET", PATH)  # the bench product: a GET needs no signature
        response = self.connection.getresponse()
        response.read()
        return response.status

    def until(self, status: int, timeout: float = 30.0) -> float:
        started = time.perf_counter()
        while self.status() != status:
            if time.perf_counter() - started > timeout:
                _abort(f"the probe did not see {status} within {timeout} s")
            time.sleep(0.005)
        return time.perf_counter() - started


def measure_changes(site: Site, work: Path, m: Any, ca: Path, repeats: int) -> None:
    """Remove the probe's certificate while it holds a connection, then register a new one."""
    assert site.edge is not None

    async def with_registry(action: Any) -> Any:
        registry = await Registry.open(pg_url(site.database), migrate=False)
        try:
            return await action(registry)
        finally:
            await registry.close()

    async def actor(registry: Registry) -> Principal:  # the bench organisation's API Security user
        return await registry.token_principal(
            await registry.create_token(SYSTEM, "scale-bench", for_email="bench@bench.example")
        )

    who = asyncio.run(with_registry(actor))
    for round_no in range(repeats):
        key = keys.generate_private_key("ec", curve="P-256")
        cert = certs.self_signed_certificate(key, f"/O=Bench Corp/CN=bench-probe-{round_no}", days=30)
        cert_path, key_path = (
            work / f"probe-{site.size}-{round_no}.crt",
            work / f"probe-{site.size}-{round_no}.key",
        )
        cert_path.write_bytes(certs.certificate_pem(cert))
        key_path.write_bytes(keys.private_key_bytes(key))
        probe = Probe(site.edge.port, ca, cert_path, key_path)
        pem = certs.certificate_pem(cert)
        fingerprint = certs.fingerprint_sha256(cert)

        async def add(registry: Registry, pem: bytes = pem) -> None:
            await registry.add_certificate(who, ENV, "mtls", pem)

        async def remove(registry: Registry, fingerprint: str = fingerprint) -> None:
            await registry.remove_certificate(who, ENV, fingerprint)

        asyncio.run(with_registry(add))
        site.addition.append(probe.until(200))
        site.reload.append(snapshot_seconds(site))
        asyncio.run(with_registry(remove))
        site.removal.append(probe.until(401))
        site.reload.append(snapshot_seconds(site))
        probe.connection.close()


# --- direct TLS: trust contexts of many anchors ----------------------------------------------


def direct_trust_costs() -> list[tuple[int, float, float]]:
    """(anchors, seconds to build the listening context, MB it took) for growing sizes."""
    key = keys.generate_private_key("ec", curve="P-256")
    server = certs.self_signed_certificate(key, "/CN=localhost", usage="server")
    from cryptography import x509

    ders = generate(max(DIRECT_SIZES), offset=10_000_000)
    anchors = [x509.load_der_x509_certificate(der) for der in ders]
    out, alive = [], []  # kept alive: a freed context's memory would be reused by the next
    for size in DIRECT_SIZES:
        before = rss_mb(os.getpid())
        started = time.perf_counter()
        alive.append(server_context(key, server, trusted=anchors[:size]))
        elapsed = time.perf_counter() - started
        out.append((size, elapsed, rss_mb(os.getpid()) - before))
    return out


def extrapolate(points: list[tuple[int, float, float]], size: int) -> tuple[float, float]:
    """Least-squares power law through the points (log-log): (exponent, seconds at ``size``)."""
    xs = [math.log(n) for n, t, _ in points if t > 0]
    ys = [math.log(t) for _n, t, _ in points if t > 0]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    exponent = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return exponent, math.exp(mean_y + exponent * (math.log(size) - mean_x))


# --- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    ensure_tools()
    services = Services()
    previous = {sig: signal.signal(sig, _raise_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with workspace(args.keep_temp) as work:
            try:
                asyncio.run(_admin("SELECT 1"))
            except Exception as exc:
                raise SetupError(
                    f"PostgreSQL at {PG_HOST}:{PG_PORT} is needed ({type(exc).__name__})"
                ) from None
            try:
                m = make_material(work, args.client_key)
                tls = server_tls(work)
                args.ca = tls / "ca" / "ca.crt"
                upstream = start_upstream(services, work)
                sites = [
                    Site(args.small, f"twofold_scale_{args.small}", work / f"registry-{args.small}"),
                    Site(
                        args.certificates,
                        f"twofold_scale_{args.certificates}",
                        work / f"registry-{args.certificates}",
                    ),
                ]
                for site in sites:
                    site.data.mkdir()
                    started = time.perf_counter()
                    asyncio.run(seed(site, upstream.port, m))
                    site.seed_seconds = time.perf_counter() - started
                    print(f"seeded {site.size:,} certificates in {site.seed_seconds:.0f} s", file=sys.stderr)
                for site in sites:
                    start_serve(services, site, args.workers, tls)
                    assert site.serve is not None
                    site.edge = start_nginx_edge(
                        services, work, args.workers, site.serve, tls, data=site.data
                    )
                    print(f"{site.serve.name}: ready in {site.startup_seconds:.1f} s", file=sys.stderr)
                sanity_check([s.edge for s in sites if s.edge], m, args.ca)
                for site in sites:
                    measure_changes(site, work, m, args.ca, args.changes)
                targets = {
                    Task(kind, f"r{site.size}", args.workers): site.edge
                    for site in sites
                    for kind in ("keepalive", "handshake")
                    if site.edge
                }
                bench = Bench(
                    args, m, upstream, targets, {s.edge.name: s.serve for s in sites if s.edge and s.serve}
                )
                bench.warm_up()
                rates: dict[str, dict[int, list[float]]] = {"keepalive": {}, "handshake": {}}
                for _ in range(args.rounds):
                    for kind in rates:
                        for site in sites:
                            time.sleep(0.5)
                            sample = bench._run(Task(kind, f"r{site.size}", args.workers), args.seconds)
                            rates[kind].setdefault(site.size, []).append(sample.rate)
                    for site in sites:  # memory after load
                        if site.serve:
                            site.memory_mb = max(site.memory_mb, rss_mb(site.serve.process.pid))
                direct = direct_trust_costs()
            finally:
                services.stop_all()
                for site in sites if "sites" in locals() else []:
                    with contextlib.suppress(Exception):
                        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{site.database}" WITH (FORCE)'))
    except SetupError as error:
        print(f"scale bench: set-up failed, nothing measured:\n{error}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return report(args, sites, rates, direct)


def report(
    args: argparse.Namespace,
    sites: list[Site],
    rates: dict[str, dict[int, list[float]]],
    direct: list[tuple[int, float, float]],
) -> int:
    small, large = sites
    ratios = {
        kind: [big / little for little, big in zip(per[small.size], per[large.size], strict=True)]
        for kind, per in rates.items()
    }
    exponent, at_large = extrapolate(direct, large.size)
    checks = [
        (
            f"keep-alive signed POST with {large.size:,} certificates: {statistics.median(ratios['keepalive']):.2f}× "
            f"the {small.size}-certificate registry's, target within {RATE_TOLERANCE:.0%}",
            statistics.median(ratios["keepalive"]) >= 1 - RATE_TOLERANCE,
        ),
        (
            f"new mTLS handshakes with {large.size:,} certificates: {statistics.median(ratios['handshake']):.2f}× "
            f"the {small.size}-certificate registry's, target within {RATE_TOLERANCE:.0%}",
            statistics.median(ratios["handshake"]) >= 1 - RATE_TOLERANCE,
        ),
        (
            f"a change visible with {large.size:,} certificates: removal {max(large.removal):.2f} s, addition "
            f"{max(large.addition):.2f} s at most, target ≤ {VISIBLE_WITHIN:.1f} s",
            max(large.removal + large.addition) <= VISIBLE_WITHIN,
        ),
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "registry_scale",
                    "sites": [
                        {
                            "certificates": s.size,
                            "seed_seconds": round(s.seed_seconds, 1),
                            "startup_seconds": round(s.startup_seconds, 2),
                            "memory_mb": round(s.memory_mb, 1),
                            "removal_visible_seconds": [round(x, 4) for x in s.removal],
                            "addition_visible_seconds": [round(x, 4) for x in s.addition],
                            "snapshot_reload_seconds": [round(x, 4) for x in s.reload],
                            "keepalive_per_s": [round(x, 1) for x in rates["keepalive"][s.size]],
                            "handshake_per_s": [round(x, 1) for x in rates["handshake"][s.size]],
                        }
                        for s in sites
                    ],
                    "ratios": {k: [round(r, 4) for r in v] for k, v in ratios.items()},
                    "direct_trust_context": [
                        {"anchors": n, "build_seconds": round(t, 3), "memory_mb": round(mb, 1)}
                        for n, t, mb in direct
                    ],
                    "direct_extrapolated": {
                        "exponent": round(exponent, 2),
                        "seconds_at_large": round(at_large),
                    },
                    "targets": [{"target": text, "passed": ok} for text, ok in checks],
                },
                indent=2,
            )
        )
    else:
        med = statistics.median
        lines = [
            f"| behind the nginx edge ({args.workers} gateway process(es)) | {small.size:,} certificates | "
            f"{large.size:,} certificates | large ÷ small |",
            "| --- | ---: | ---: | ---: |",
            f"| seeding (generate + rules + bulk insert) | {small.seed_seconds:.1f} s | {large.seed_seconds:.1f} s | |",
            f"| start-up (serve → /readyz 200) | {small.startup_seconds:.1f} s | {large.startup_seconds:.1f} s | |",
            f"| memory, all processes of serve (RSS) | {small.memory_mb:.0f} MB | {large.memory_mb:.0f} MB | |",
            f"| one removal visible on an open connection (median / max) | {med(small.removal):.3f} / "
            f"{max(small.removal):.3f} s | {med(large.removal):.3f} / {max(large.removal):.3f} s | |",
            f"| one addition accepted (median / max) | {med(small.addition):.3f} / {max(small.addition):.3f} s | "
            f"{med(large.addition):.3f} / {max(large.addition):.3f} s | |",
            f"| the gateway's reload per change (twofold_snapshot_load_seconds, median) | "
            f"{med(small.reload) * 1000:.1f} ms | {med(large.reload) * 1000:.1f} ms | |",
            f"| keep-alive signed POST, requests/s (median) | {med(rates['keepalive'][small.size]):,.0f} | "
            f"{med(rates['keepalive'][large.size]):,.0f} | {med(ratios['keepalive']):.2f}× |",
            f"| new mTLS handshakes/s (median) | {med(rates['handshake'][small.size]):,.0f} | "
            f"{med(rates['handshake'][large.size]):,.0f} | {med(ratios['handshake']):.2f}× |",
            "",
            "Direct TLS (no edge): building the listener's TLS context with N trusted certificates "
            "(`load_verify_locations`, what every change of the trusted set costs, on the event loop):",
            "",
            "| anchors | build | memory |",
            "| ---: | ---: | ---: |",
            *(f"| {n:,} | {t:.2f} s | {mb:.0f} MB |" for n, t, mb in direct),
            f"| {large.size:,} (extrapolated, time ∝ N^{exponent:.1f}) | ≈ {at_large:,.0f} s | |",
            "",
        ]
        lines += [f"- {'PASS' if ok else 'MISSED'}: {text}" for text, ok in checks]
        print("\n".join(lines))
    failed = [text for text, ok in checks if not ok]
    for text in failed:
        print(f"target missed: {text}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--certificates", type=int, default=100_000, help="the large registry (default 100000)"
    )
    parser.add_argument("--small", type=int, default=10, help="the small registry (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of rates (default 5)")
    parser.add_argument("--seconds", type=int, default=3, help="seconds per measurement (default 3)")
    parser.add_argument("--changes", type=int, default=5, help="removals and additions timed (default 5)")
    parser.add_argument("--workers", type=int, default=1, help="twofold --workers and nginx worker_processes")
    parser.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument(
        "--handshake-clients", type=int, default=None, help="concurrent s_time (default --workers)"
    )
    parser.add_argument(
        "--client-key", choices=("rsa", "ec"), default="rsa", help="the bench client's mTLS key"
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--markdown", action="store_true", help="(the default output is Markdown)")
    args = parser.parse_args(argv)
    if args.certificates <= args.small or args.small < 1:
        parser.error("--certificates must be larger than --small, and --small ≥ 1")
    args.handshake_clients = args.handshake_clients or args.workers
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
