"""The PostgreSQL registry unreachable under a running gateway (issue 11): the database really
goes away (tests/tcpproxy.py cuts the connection between serve and PostgreSQL). The gateway
keeps serving from its last snapshot for `registry_grace` seconds — /readyz says it is not
ready and how long the registry has been silent — then fails closed (503
``registry_unavailable``, Retry-After) because its snapshot may no longer say who may call;
once the database is back everything works again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import POSTGRES_HOST, POSTGRES_PORT, own_postgres_database
from gatewaykit import World, assert_refusal, running_world, wait_until
from tcpproxy import TcpProxy

pytestmark = pytest.mark.postgres
GRACE = 8.0  # longer than the 5 s after which /readyz stops saying ready


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, TcpProxy]]:
    with own_postgres_database("twofold_grace") as name, TcpProxy((POSTGRES_HOST, POSTGRES_PORT)) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
        with running_world(tmp_path_factory.mktemp("grace"), db=url, registry_grace=GRACE) as world:
            yield world, proxy
            proxy.restore()
            world.assert_no_internal_errors()


def readyz(world: World) -> httpx.Response:
    return httpx.get(f"{world.admin}/readyz", timeout=5)


def plain(world: World) -> httpx.Response:
    with world.client(world.orgs["acme"].mtls) as client:
        return client.get("/plain/ping")


def test_served_from_the_snapshot_within_the_grace_then_closed_then_back(
    outage: tuple[World, TcpProxy],
) -> None:
    world, proxy = outage
    assert plain(world).status_code == 200
    assert readyz(world).json()["registry"]["serving"] is True

    proxy.cut()
    cut = time.monotonic()
    assert plain(world).status_code == 200  # the snapshot decides, as before
    wait_until(lambda: readyz(world).status_code == 503, 10, 0.2)
    report = readyz(world).json()
    if time.monotonic() - cut < GRACE - 1:  # (a loaded machine may have taken longer)
        assert report["registry"]["serving"] is True
        assert report["registry"]["last_answer_seconds_ago"] >= 4
        assert plain(world).status_code == 200

    wait_until(lambda: plain(world).status_code == 503, GRACE + 5, 0.25)
    assert time.monotonic() - cut >= GRACE - 0.5
    closed = plain(world)
    error = assert_refusal(closed, 503, "registry_unavailable")
    assert "try again" in error["message"]
    assert int(closed.headers["Retry-After"]) > 0
    report = readyz(world).json()
    assert report["ready"] is False
    assert report["registry"]["serving"] is False
    assert report["registry"]["grace_seconds"] == GRACE

    proxy.restore()
    back = wait_until(lambda: plain(world).status_code == 200, 15, 0.1)
    assert back < 10
    wait_until(lambda: readyz(world).status_code == 200, 5, 0.1)
    assert readyz(world).json()["registry"]["serving"] is True
    world.sync()  # and the registry's changes reach it again
