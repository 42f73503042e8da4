"""What replay protection and signed responses cost the gateway (issue 11), in two parts.

**Micro** (``--micro``, a few seconds): the pieces on their own, with nothing else running —

* the verify step's share: :func:`twofold.gateway.replay.claim` (read the signed time and id
  from the verified payload or the JWS header, check the window, hash the id), µs per request;
* the forward step's share: :class:`twofold.gateway.replay.ReplayGuard` recording ids in a real
  registry database (SQLite file, and PostgreSQL when ``--postgres URL`` is given): the latency
  of one id at a time (the round trip a lone request waits for), and ids/s with 1, 16 and 128
  requests waiting at once (recorded in one statement per event-loop turn), with the number of
  statements per id — durable (the default) and with ``replay_durable = false``;
* a signed response: :class:`twofold.gateway.signing.ResponseSigner` per answer, ES256, PS256
  and RS256.

**End to end** (``--e2e``, about a minute): ``twofold serve --workers W`` behind wrk exactly as
bench/gateway_bench.py drives it (its nginx upstream, its wrk client-certificate shim), three
products on the same gateway, each a signed (ES256) payment POST over keep-alive mTLS:
``signed`` (the signature only), ``replay`` (+ replay protection: every request a new ``jti``,
pre-signed per run, so wrk sends no two alike), ``replay+sign`` (+ the answer signed). Rounds
are interleaved; the report shows the median requests/s and p50/p99 latency per product, and
the ratio to ``signed``.

    .venv/bin/python bench/replay_bench.py [--micro] [--e2e] [--postgres postgresql://…]
        [--rounds 5] [--seconds 3] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

import gateway_bench as gb
from twofold.crypto import certs, jws, keys
from twofold.gateway import replay
from twofold.gateway.signing import ResponseSigner
from twofold.provider_keys import ProviderKey
from twofold.registry.auth import SYSTEM, Principal, parse_roles
from twofold.registry.service import Registry

PAYLOAD = json.loads(gb.PAYLOAD)
ANSWER = gb.UPSTREAM_BODY.encode()


def _per_call(fn: Callable[[], object], seconds: float = 0.5) -> float:
    """µs per call, the median of five timed slices."""
    slices = []
    for _ in range(5):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            for _ in range(50):
                fn()
            count += 50
        slices.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(slices)


# --- micro -------------------------------------------------------------------------------------


def micro_claim() -> dict[str, float]:
    key = keys.generate_private_key("ec")
    now = time.time()
    body = json.dumps({**PAYLOAD, "iat": int(now), "jti": str(uuid.uuid4())}).encode()
    token = jws.sign(body, key, headers={"http://openbanking.org.uk/iat": int(now)}).encode()
    payload_policy = replay.ReplayPolicy.of(300, "iat", "jti")
    header_policy = replay.ReplayPolicy.of(300, "header:http://openbanking.org.uk/iat", "jti")
    assert payload_policy is not None
    assert header_policy is not None
    return {
        "claim, iat and jti in the payload": _per_call(
            lambda: replay.claim(payload_policy, token, body, 1, "b", now)
        ),
        "claim, iat in the JWS header": _per_call(
            lambda: replay.claim(header_policy, token, body, 1, "b", now)
        ),
    }


def micro_sign() -> dict[str, float]:
    out = {}
    for alg in ("ES256", "PS256", "RS256"):
        with tempfile.TemporaryDirectory() as tmp:
            signer = ResponseSigner(ProviderKey.load_or_create(Path(tmp) / "k", alg=alg))
        out[f"signed response, {alg}"] = _per_call(lambda signer=signer: signer.sign(ANSWER, "req-1"))
    return out


async def _guard_figures(url: str, durable: bool) -> dict[str, float]:
    registry = await Registry.open(url)
    try:
        org = await registry.add_org(SYSTEM, f"bench-{uuid.uuid4().hex[:8]}")
        guard = replay.ReplayGuard(registry, durable=durable)

        def claim() -> replay.Claim:
            return replay.Claim(org["id"], "b", os.urandom(32), int(time.time()) + 600, "jti")

        for _ in range(20):  # connections made, statements prepared
            await guard.admit(claim())
        figures: dict[str, float] = {}
        latencies = []
        for _ in range(300):
            started = time.perf_counter()
            await guard.admit(claim())
            latencies.append((time.perf_counter() - started) * 1e6)
        figures["one id at a time: µs per request (median)"] = statistics.median(latencies)
        figures["one id at a time: µs per request (p99)"] = sorted(latencies)[int(len(latencies) * 0.99)]
        for waiting in (16, 128):
            trips, started, total = guard.round_trips, time.perf_counter(), 0
            while time.perf_counter() - started < 1.5:
                await asyncio.gather(*(guard.admit(claim()) for _ in range(waiting)))
                total += waiting
            elapsed = time.perf_counter() - started
            figures[f"{waiting} waiting at once: ids/s"] = total / elapsed
            figures[f"{waiting} waiting at once: statements per id"] = (guard.round_trips - trips) / total
        replayed = claim()
        await guard.admit(replayed)
        figures["a replay refused from memory: µs"] = await _memory_refusal(guard, replayed)
        return figures
    finally:
        await registry.close()


async def _memory_refusal(guard: replay.ReplayGuard, claim: replay.Claim) -> float:
    started = time.perf_counter()
    for _ in range(2000):
        with contextlib.suppress(replay.ReplayError):
            await guard.admit(claim)
    return (time.perf_counter() - started) / 2000 * 1e6


def micro(postgres: str | None) -> dict[str, dict[str, float]]:
    results = {"verify step": micro_claim(), "signing": micro_sign()}
    for durable in (True, False):
        mode = "durable" if durable else "replay_durable = false"
        with tempfile.TemporaryDirectory() as tmp:
            results[f"forward step, SQLite, {mode}"] = asyncio.run(
                _guard_figures(str(Path(tmp) / "b.db"), durable)
            )
        if postgres:
            results[f"forward step, PostgreSQL, {mode}"] = asyncio.run(_guard_figures(postgres, durable))
    return results


# --- end to end ----------------------------------------------------------------------------------

PRODUCTS = {  # path → (product id, replay window, sign responses)
    "/bench/signed": ("signed", None, False),
    "/bench/replay": ("replay", 3600, False),
    "/bench/replay-sign": ("replay-sign", 3600, True),
}
LABELS = {"/bench/signed": "signed", "/bench/replay": "replay", "/bench/replay-sign": "replay+sign"}
WRK_TOKENS_LUA = """\
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  tokens = {{}}
  local n = 0
  for line in io.lines("{tokens}") do
    if n % {threads} == id then tokens[#tokens + 1] = line end
    n = n + 1
  end
  i = 0
end
function request()
  i = i + 1
  if i > #tokens then i = 1 end
  return wrk.format("POST", nil, {{["Content-Type"] = "application/jose"}}, tokens[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"duration_us\\":%d,\\"requests\\":%d,\\"errors\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}}\\n",
    summary.duration, summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


async def _seed(url: str, upstream: int, m: gb.Material, signature_pem: bytes) -> None:
    registry = await Registry.open(url)
    try:
        await registry.ensure_defaults()
        org = await registry.add_org(SYSTEM, "bench", "Bench Corp")
        user = await registry.add_user(
            SYSTEM, "bench@bench.example", org="bench", roles="api_security,developer", password=None
        )
        actor = Principal(
            user["email"], user["id"], org["id"], org["slug"], parse_roles(user["roles"]), mfa_passed=True
        )  # as an API token would be
        project = await registry.create_project(actor, "bench")
        for path, (product, window, sign) in PRODUCTS.items():
            await registry.save_product(
                SYSTEM,
                product,
                name=product,
                path_prefix=path,
                upstream=f"http://127.0.0.1:{upstream}",
                signature="required",
                content_types=["application/jose"],
                algorithms=["ES256"],
                replay_window=window,
                sign_responses=sign,
            )
            await registry.set_project_product(actor, project["id"], product, gb.ENV, present=True)
        await registry.add_certificate(actor, gb.ENV, "mtls", m.client_pem)
        await registry.add_certificate(actor, gb.ENV, "signature", signature_pem)
    finally:
        await registry.close()


def _reset_postgres(url: str) -> None:
    async def reset() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    asyncio.run(reset())


def start_twofold(
    services: gb.Services,
    work: Path,
    args: argparse.Namespace,
    upstream: int,
    m: gb.Material,
    signature_pem: bytes,
) -> tuple[gb.Service, Path]:
    """`twofold serve --workers W` on SQLite in its data directory (or ``--postgres``, emptied
    first), seeded with the three products; returns it and its CA."""
    data = work / "twofold"
    data.mkdir()
    tls = gb.server_tls(work)
    for part in ("ca", "tls"):
        gb.shutil.copytree(tls / part, data / part)
    url = args.postgres or str(data / "twofold.db")
    if args.postgres:
        _reset_postgres(args.postgres)
    asyncio.run(_seed(url, upstream, m, signature_pem))
    port, portal, admin = gb.free_port(), gb.free_port(), gb.free_port()
    config = data / "twofold.toml"
    config.write_text(f'db = "{url}"\nports = {{ {gb.ENV} = {port}, prod = 0 }}\n')
    argv = [gb.TWOFOLD, "serve", "--data", str(data), "--config", str(config), "--portal-port", str(portal)]
    argv += ["--admin-port", str(admin), "--workers", str(args.workers), "--no-access-log"]
    service = services.start(
        f"twofold serve --workers {args.workers}",
        argv,
        data / "serve.log",
        port,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as response:
            return response.status == 200 and gb.listening_sockets(port) >= args.workers

    gb.wait_until("twofold to be ready", ready, service)
    return service, tls / "ca" / "ca.crt"


class EndToEnd:
    def __init__(
        self, args: argparse.Namespace, work: Path, m: gb.Material, key: Any, service: gb.Service
    ) -> None:
        self.args, self.work, self.m, self.key, self.service = args, work, m, key, service
        self.env = {
            **os.environ,
            "LD_PRELOAD": str(m.shim),
            "BENCH_CLIENT_CERT": str(m.client_cert),
            "BENCH_CLIENT_KEY": str(m.client_key),
        }
        self.rate_guess = 3000.0

    def tokens(self, count: int) -> Path:
        """``count`` signed payments, each with its own jti (none is sent twice in a run)."""
        path = self.work / "tokens.txt"
        now = int(time.time())
        with path.open("w") as out:
            for _ in range(count):
                body = json.dumps({**PAYLOAD, "iat": now, "jti": uuid.uuid4().hex}, separators=(",", ":"))
                out.write(jws.sign(body.encode(), self.key, alg="ES256") + "\n")
        return path

    def run(self, path: str) -> dict[str, float]:
        count = int(self.rate_guess * self.args.seconds * 3) + 2000
        script = self.work / "tokens.lua"
        script.write_text(WRK_TOKENS_LUA.format(tokens=self.tokens(count), threads=self.args.threads))
        cpu0 = gb.tree_cpu_seconds(self.service.process.pid)
        argv = [
            "wrk",
            "-t",
            str(self.args.threads),
            "-c",
            str(self.args.connections),
            "-d",
            f"{self.args.seconds}s",
        ]
        argv += ["--timeout", "10s", "-s", str(script), f"https://127.0.0.1:{self.service.port}{path}"]
        done = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, timeout=self.args.seconds + 120
        )
        found = re.search(r"^WRKJSON (\{.*\})$", done.stdout, re.MULTILINE)
        if done.returncode != 0 or not found:
            gb._abort(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        result = json.loads(found.group(1))
        if result["errors"]:
            gb._abort(
                f"wrk saw {result['errors']} errors on {path} (a replayed token would be one):\n{done.stdout}"
            )
        if result["requests"] > count:
            gb._abort(f"wrk sent more requests ({result['requests']}) than there were tokens ({count})")
        rate = result["requests"] / (result["duration_us"] / 1e6)
        self.rate_guess = max(self.rate_guess, rate)
        cpu = gb.tree_cpu_seconds(self.service.process.pid) - cpu0
        return {
            "rate": rate,
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "cpu_us": cpu / result["requests"] * 1e6,
        }


def end_to_end(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    gb.ensure_tools()
    services = gb.Services()
    work = Path(tempfile.mkdtemp(prefix="twofold-replay-bench-"))
    if os.geteuid() == 0:
        work.chmod(0o755)
    try:
        m = gb.make_material(work, "ec")
        key = keys.generate_private_key("ec")
        signature_pem = certs.certificate_pem(
            certs.self_signed_certificate(key, "/O=Bench Corp/CN=bench-es256", days=30, usage="signature")
        )
        upstream = gb.start_upstream(services, work)
        service, _ca = start_twofold(services, work, args, upstream.port, m, signature_pem)
        bench = EndToEnd(args, work, m, key, service)
        for path in PRODUCTS:  # warm up (and check that every product answers 200)
            bench.run(path)
        samples: dict[str, list[dict[str, float]]] = {path: [] for path in PRODUCTS}
        for round_no in range(args.rounds):
            order = list(PRODUCTS)
            random.shuffle(order)
            for path in order:
                time.sleep(0.5)
                samples[path].append(bench.run(path))
                print(
                    f"  round {round_no + 1}: {LABELS[path]} {samples[path][-1]['rate']:,.0f}/s",
                    file=sys.stderr,
                )
    finally:
        services.stop_all()
        gb.shutil.rmtree(work, ignore_errors=True)
    out = {}
    base = statistics.median(s["rate"] for s in samples["/bench/signed"])
    for path, runs in samples.items():
        figures = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        figures["× signed"] = figures["rate"] / base
        out[LABELS[path]] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--micro", action="store_true", help="the pieces on their own")
    parser.add_argument("--e2e", action="store_true", help="through twofold serve under wrk")
    parser.add_argument("--postgres", help="a PostgreSQL URL (its public schema is emptied) for both parts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.micro and not args.e2e:
        args.micro = args.e2e = True
    report: dict[str, Any] = {}
    try:
        if args.micro:
            report["micro"] = micro(args.postgres)
        if args.e2e:
            report["end to end"] = end_to_end(args)
    except gb.SetupError as error:
        print(f"replay bench: set-up failed, nothing measured:\n{error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for part, sections in report.items():
        print(f"\n{part}")
        for name, figures in sections.items():
            print(f"  {name}")
            for key, value in figures.items():
                print(f"    {key:<48} {value:>12,.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
