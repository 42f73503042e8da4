"""`twofold serve --workers 2` as an operator starts it: two gateway processes share the
environment's port, one admin listener answers for both (metrics merged, ready when both are),
and a certificate removed in the registry is refused by both within a second."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import twofold
from gatewaykit import PROPAGATION, seed_balance_client, wait_until
from servekit import serve_process
from twofold.crypto import certs, keys
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry


@dataclass
class Served:
    data: Path
    gateway: int
    admin: int
    mtls: Path
    key: Path
    fingerprint: str

    @property
    def ca(self) -> str:
        return str(self.data / "ca" / "ca.crt")

    def call(self) -> int:
        """One request on a NEW connection (so SO_REUSEPORT spreads them over the workers)."""
        try:
            with twofold.Client(verify=self.ca, cert=self.mtls, key=self.key, timeout=5) as client:
                return client.get(f"https://localhost:{self.gateway}/accessapi/balance").status_code
        except httpx.TransportError:
            return 0  # the handshake was refused

    def metrics(self, worker: bool = False, own: bool = False) -> str:
        """The node's /metrics; ``own``: the main process's alone; ``worker``: the extra
        worker's, from its private socket."""
        if worker:
            transport = httpx.HTTPTransport(uds=str(self.data / "run" / "gateway-1.sock"))
            with httpx.Client(transport=transport, timeout=5) as client:
                return client.get("http://worker/metrics").text
        query = "?process=main" if own else ""
        return httpx.get(f"http://127.0.0.1:{self.admin}/metrics{query}", timeout=5).text

    def requests_counted(self, text: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("twofold_gateway_requests_total{") and 'outcome="ok"' in line
        )


async def _remove(db: Path, fingerprint: str) -> None:
    registry = await Registry.open(str(db), migrate=False)
    try:
        await registry.remove_certificate(SYSTEM, "cat", fingerprint)
    finally:
        await registry.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("workers")
    with serve_process(work, "workers = 2") as process:

        def ready(port: int) -> bool:
            if not process.alive():
                raise AssertionError(f"twofold serve exited ({process.process.returncode}):\n{process.log()}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(lambda: ready(process.admin), 60, 0.2)  # ready: both processes are
        key = keys.generate_private_key("ec")
        cert = certs.self_signed_certificate(key, "/O=Acme/CN=acme-workers")
        (work / "mtls.crt").write_bytes(certs.certificate_pem(cert))
        (work / "mtls.key").write_bytes(keys.private_key_bytes(key))
        fingerprint = asyncio.run(
            seed_balance_client(process.data / "twofold.db", certs.certificate_pem(cert))
        )
        yield Served(
            process.data, process.cat, process.admin, work / "mtls.crt", work / "mtls.key", fingerprint
        )


def _all_accept(served: Served) -> bool:
    return all(served.call() == 200 for _ in range(12))  # connections land on both processes


def test_both_gateway_processes_serve_the_port_and_count_their_own_requests(served: Served) -> None:
    # The registration reaches each process on its own poll, within a second of the other.
    wait_until(lambda: _all_accept(served), PROPAGATION * 5)
    statuses = [served.call() for _ in range(24)]
    assert statuses == [200] * 24
    node = served.metrics()  # scraped first: the processes only count more afterwards
    main = served.requests_counted(served.metrics(own=True))
    worker = served.requests_counted(served.metrics(worker=True))
    assert main + worker >= 24
    assert main > 0, f"the worker process took every connection: {main} / {worker}"
    assert worker > 0, f"the main process took every connection: {main} / {worker}"
    assert served.requests_counted(node) == main + worker  # one /metrics for the node
    assert 'twofold_gateway_processes{state="answering"} 2.0' in node
    latency = [line for line in node.splitlines() if line.startswith("twofold_gateway_request_seconds_count")]
    assert latency, node
    assert sum(float(line.rsplit(" ", 1)[1]) for line in latency) >= main + worker
    readiness = httpx.get(f"http://127.0.0.1:{served.admin}/readyz", timeout=5).json()
    assert readiness["ready"] is True
    assert [w["index"] for w in readiness["workers"]] == [1]


def test_a_removed_certificate_is_refused_by_every_process_within_a_second(served: Served) -> None:
    wait_until(lambda: _all_accept(served), PROPAGATION * 5)
    asyncio.run(_remove(served.data / "twofold.db", served.fingerprint))
    wait_until(lambda: all(served.call() != 200 for _ in range(12)), PROPAGATION)
    assert [served.call() for _ in range(12)] == [0] * 12  # new handshakes refused everywhere
