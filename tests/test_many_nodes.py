"""Many nodes, one registry: two `twofold serve` processes with their own data directories and
ports on one PostgreSQL database behave as one. A certificate registered through one node's
portal is accepted by both gateways, and one removed through the other node's portal is
refused by both within a second — on connections kept open, too. Each gateway listens for
the registry's NOTIFY; with its LISTEN connection gone, polling still brings the change."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

import twofold
from conftest import POSTGRES_HOST, POSTGRES_PORT, own_postgres_database
from gatewaykit import PROPAGATION, Pair, ec_pair, wait_until
from servekit import Member, Served, serving


@dataclass
class Cluster:
    nodes: list[Served]
    member: Member
    database: str
    work: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("nodes")
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(own_postgres_database("twofold_nodes"))
        url = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"
        first = stack.enter_context(serving(work / "a", db=url))  # creates the schema
        second = stack.enter_context(serving(work / "b", db=url))
        member = first.member("acme", {"cat": ["balance"]})
        yield Cluster([first, second], member, database, work)


def _client(node: Served, pair: Pair) -> twofold.Client:
    return twofold.Client(
        node.gateway(), cert=pair.cert_path, key=pair.key_path, verify=str(node.ca), timeout=5
    )


def _status(client: httpx.Client) -> int:
    try:
        return client.get("/accessapi/balance").status_code
    except httpx.TransportError:
        return 0  # a new connection refused in the TLS handshake


def _register(node: Served, member: Member, pair: Pair) -> None:
    with node.api(member.token) as api:
        added = api.post(
            "/api/v1/certificates", json={"environment": "cat", "use": "mtls", "certificate": pair.pem}
        )
    assert added.status_code == 201, added.text


def _remove(node: Served, member: Member, pair: Pair) -> None:
    with node.api(member.token) as api:
        removed = api.delete(f"/api/v1/certificates/{pair.fingerprint}", params={"env": "cat"})
    assert removed.status_code == 200, removed.text


def _round_trip(cluster: Cluster, pair: Pair) -> None:
    """Registered through node A: both accept; removed through node B: both refuse within a
    second, on the connections kept open and on new ones."""
    first, second = cluster.nodes
    _register(first, cluster.member, pair)
    clients = [_client(node, pair) for node in cluster.nodes]
    with contextlib.ExitStack() as stack:
        for client in clients:
            stack.enter_context(client)
        wait_until(lambda: all(_status(c) == 200 for c in clients), PROPAGATION * 2)
        _remove(second, cluster.member, pair)
        started = time.monotonic()
        wait_until(lambda: all(_status(c) == 401 for c in clients), PROPAGATION * 3)
        assert time.monotonic() - started <= PROPAGATION
        for client in clients:
            assert client.get("/accessapi/balance").json()["error"]["code"] == "certificate_not_registered"
    for node in cluster.nodes:
        with _client(node, pair) as fresh:
            assert _status(fresh) in (0, 401)


async def _listeners(database: str, terminate: bool = False) -> int:
    conn = await asyncpg.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", database="postgres")
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
            database,
        )
        if terminate:
            for row in rows:
                await conn.execute("SELECT pg_terminate_backend($1)", row["pid"])
        return len(rows)
    finally:
        await conn.close()


def test_a_removal_through_one_nodes_portal_is_refused_by_every_node_within_a_second(
    cluster: Cluster, tmp_path: Path
) -> None:
    assert asyncio.run(_listeners(cluster.database)) >= 2  # each gateway LISTENs for the registry
    _round_trip(cluster, ec_pair(tmp_path, "mtls", "acme-nodes"))


def test_polling_brings_the_change_when_the_notifications_are_lost(cluster: Cluster, tmp_path: Path) -> None:
    assert asyncio.run(_listeners(cluster.database, terminate=True)) >= 2
    _round_trip(cluster, ec_pair(tmp_path, "mtls", "acme-polled"))
    for node in cluster.nodes:
        assert "Traceback" not in node.proc.log()
