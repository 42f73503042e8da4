"""Where the gateway's CPU goes per keep-alive request, without TLS, sockets or other processes.

The benchmark (`gateway_bench.py`) measures the whole system on a shared machine, where the
numbers move with everything else that runs. This tool isolates the gateway's own work: one
`GatewayProtocol` of a real `Gateway` (a seeded SQLite registry, the bench's signature-required
product) is fed the bench's signed POST through an in-memory client transport, and its pooled
upstream connection is answered in memory with the bench upstream's response. Every step of the
request path runs — parsing, identify, route, authorise, read, verify (full RS256), forwarding,
relaying the answer, metrics — but no TLS, no syscall, no second process.

    .venv/bin/python bench/gateway_profile.py                # µs of CPU per request (median of 7 rounds)
    .venv/bin/python bench/gateway_profile.py --callgrind    # instructions per request, by library

``--callgrind`` runs the path under valgrind twice (200 and 1,200 requests, with the same keys)
and divides the difference: instruction counts do not depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb
from twofold.crypto import certs, jws
from twofold.gateway import upstream
from twofold.gateway.protocol import GatewayProtocol
from twofold.gateway.server import Gateway, GatewayConfig
from twofold.registry.service import Registry
from twofold.serve import local_tls

ANSWER = gb.UPSTREAM_BODY.encode()
UPSTREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 05 Jan 2026 10:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
    % (len(ANSWER), ANSWER)
)
UPSTREAM = ("127.0.0.1", 9)  # never connected to: the pooled connections below answer in memory


class _UpstreamTransport:
    """Answers every request written to it with the bench upstream's response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connection: Any) -> None:
        self.loop, self.connection = loop, connection

    def write(self, _data: bytes) -> None:
        self.loop.call_soon(self.connection.data_received, UPSTREAM_RESPONSE)

    def close(self) -> None:
        pass

    abort = close


class _PeerCertificate:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


class _ClientTransport:
    """What the protocol writes to; each answer triggers the next request."""

    def __init__(self, der: bytes) -> None:
        self.extra = {"ssl_object": _PeerCertificate(der), "peername": ("127.0.0.1", 40000)}
        self.answered: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, _data: bytes) -> None:
        self.answered()

    def pause_reading(self) -> None:
        pass

    resume_reading = close = abort = pause_reading


def material(directory: Path) -> gb.Material:
    """The bench's client certificate and pre-signed token; kept in ``directory`` so that
    repeated runs use the same keys (key generation does not cost the same every time)."""
    saved = directory / "material.pickle"
    if saved.exists():
        return pickle.loads(saved.read_bytes())
    made = gb.make_material(directory, "rsa")
    saved.write_bytes(pickle.dumps(made))
    local_tls(directory / "tls-cache", lambda _message: None)
    return made


async def drive(directory: Path, requests: int, rounds: int) -> tuple[list[float], list[float]]:
    m = material(directory)
    loop = asyncio.get_running_loop()
    data = Path(tempfile.mkdtemp(prefix="twofold-profile-"))
    shutil.copytree(directory / "tls-cache", data, dirs_exist_ok=True)
    tls = local_tls(data, lambda _message: None)
    await gb.seed_registry(data, UPSTREAM[1], m)
    registry = await Registry.open(str(data / "twofold.db"), migrate=False)
    gateway = Gateway(
        registry, key=tls.server_key, certificate=tls.server_cert, config=GatewayConfig(access_log=False)
    )
    await gateway.start()
    pool = gateway.forwarder.pool
    for _ in range(2):
        connection = upstream._Connection(pool, UPSTREAM)
        connection.connection_made(_UpstreamTransport(loop, connection))  # type: ignore[arg-type]
        pool.release(connection)
    der = certs.certificate_der(certs.load_certificate(m.client_pem))
    request = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/jose\r\nContent-Length: %d\r\n\r\n"
        % (gb.PATH.encode(), len(m.token))
    ) + m.token
    protocol = GatewayProtocol(gateway, gb.ENV, gateway.limits)
    client = _ClientTransport(der)
    protocol.connection_made(client)  # type: ignore[arg-type]
    verifier = jws.Verifier([jws.VerificationKey.from_certificate(certs.load_certificate(m.signature_pem))])

    async def run(count: int) -> None:
        done, left = asyncio.Event(), [count]

        def answered() -> None:
            left[0] -= 1
            if left[0] <= 0:
                done.set()
            else:
                loop.call_soon(protocol.data_received, request)

        client.answered = answered
        protocol.data_received(request)
        await done.wait()

    await run(300)  # warm: the header cache, the pools
    gc.collect()
    gc.freeze()
    paths, verifies = [], []
    for _ in range(rounds):
        started = time.process_time()
        await run(requests)
        paths.append((time.process_time() - started) / requests * 1e6)
        if rounds > 1:
            started = time.process_time()
            for _ in range(requests):
                verifier.verify(m.token)
            verifies.append((time.process_time() - started) / requests * 1e6)
    await gateway.stop()
    await registry.close()
    return paths, verifies


_GROUPS = (
    ("RSA verify and hashing (cryptography, OpenSSL)", ("_rust.abi3", "libcrypto")),
    ("base64 and the JWS character checks (C)", ("binascii", "bytes_translate", "bytes_split")),
    ("HTTP parsing (llhttp)", ("llhttp", "httptools")),
    ("JSON scanning (C)", ("_json",)),
    ("uvloop", ("uvloop", "libuv")),
    ("libc (malloc, memcpy)", ("libc.so",)),
)


def _annotate(path: Path) -> tuple[int, dict[str, int]]:
    out = subprocess.run(["callgrind_annotate", "--threshold=100", str(path)], capture_output=True, text=True)
    functions: dict[str, int] = {}
    total = 0
    for line in out.stdout.splitlines():
        found = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(.*)", line)
        if found:
            value = int(found.group(1).replace(",", ""))
            if "PROGRAM TOTALS" in found.group(2):
                total = value
            else:
                functions[found.group(2)] = value
    return total, functions


def callgrind(directory: Path) -> None:
    runs = {}
    for count in (200, 1200):
        out = directory / f"callgrind.{count}.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--material",
                str(directory),
                "--requests",
                str(count),
                "--rounds",
                "1",
            ],
            check=True,
            capture_output=True,
        )
        runs[count] = _annotate(out)
    (total_a, a), (total_b, b) = runs[200], runs[1200]
    groups: collections.Counter[str] = collections.Counter()
    for name in set(a) | set(b):
        label = next(
            (g for g, marks in _GROUPS if any(mark in name for mark in marks)),
            "CPython: interpreting Python code, objects",
        )
        groups[label] += b.get(name, 0) - a.get(name, 0)
    per_request = (total_b - total_a) / 1000
    print(f"{per_request:,.0f} instructions per request (callgrind, 1,200 − 200 requests)")
    for label, value in groups.most_common():
        print(f"  {value / 1000:10,.0f}  {100 * value / (total_b - total_a):5.1f}%  {label}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind")
    parser.add_argument("--material", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.material or Path(tempfile.mkdtemp(prefix="twofold-profile-keys-"))
    if args.callgrind:
        material(directory)
        callgrind(directory)
        return 0
    uvloop.install()
    paths, verifies = asyncio.run(drive(directory, args.requests, args.rounds))
    if verifies:
        path, verify = statistics.median(paths), statistics.median(verifies)
        print(
            f"request path {path:.1f} µs of CPU per request (median of {args.rounds} rounds × "
            f"{args.requests}); RS256 verify alone {verify:.1f} µs; everything else {path - verify:.1f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
