"""A PostgreSQL outage under a running `twofold serve`: the database really goes away (a TCP
proxy on loopback between serve and PostgreSQL is cut: open connections are reset, new ones
refused) and comes back. While it is away the portal API, sign-in and the sandbox payments
answer 503 ``registry_unavailable`` saying when to try again — never a 500 or a traceback —
and failed sign-ins do not count toward the sign-in limit; once it is back everything works,
the right password included."""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Iterator

import httpx
import pytest

from conftest import POSTGRES_HOST, POSTGRES_PORT, own_postgres_database
from gatewaykit import World, payment, running_world, wait_until
from tcpproxy import TcpProxy
from twofold.crypto import jws
from twofold.gateway.sandbox import retry_after_header
from twofold.registry.auth import SYSTEM

pytestmark = pytest.mark.postgres

PASSWORD = "correct horse battery staple"
EMAIL = "signin@acme.example"
TRACE = re.compile(r"Traceback|File \"|line \d+, in")


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, TcpProxy]]:
    with own_postgres_database("twofold_outage") as name, TcpProxy((POSTGRES_HOST, POSTGRES_PORT)) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{name}"
        with running_world(tmp_path_factory.mktemp("outage"), db=url) as world:
            world.call(
                world.registry.add_user(SYSTEM, EMAIL, org="acme", roles="developer", password=PASSWORD)
            )
            yield world, proxy
            proxy.restore()  # whatever a failed test left behind


def _portal(world: World) -> httpx.Client:
    return httpx.Client(
        base_url=world.portal, verify=ssl.create_default_context(cafile=str(world.ca_path)), timeout=30
    )


def _sign_in(world: World, password: str = PASSWORD) -> httpx.Response:
    with _portal(world) as portal:
        return portal.post("/login", data={"email": EMAIL, "password": password})


def _pay(world: World) -> httpx.Response:
    acme = world.orgs["acme"]
    assert acme.sign is not None
    with world.client(acme.mtls) as client:
        return client.post(
            "/tsapi/v1/payments",
            content=jws.sign(json.dumps(payment()).encode(), acme.sign.key),
            headers={"Content-Type": "application/jose"},
        )


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text[:300]
    assert int(response.headers["Retry-After"]) > 0
    assert not TRACE.search(response.text)


def test_while_the_database_is_away_everything_says_try_again_later_and_then_works(
    outage: tuple[World, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    world, proxy = outage
    caplog.set_level(logging.INFO)
    cert_path = "/api/v1/certificates"
    with world.api("acme") as api:
        assert api.get(cert_path, params={"env": "cat"}).status_code == 200
    assert _pay(world).status_code == 202

    proxy.cut()
    with world.api("acme") as api:
        for response in (
            api.get(cert_path, params={"env": "cat"}),
            api.post(cert_path, json={"environment": "cat", "use": "mtls", "certificate": "x"}),
            api.get("/api/v1/me"),
        ):
            _assert_unavailable(response)
            assert response.json()["error"]["code"] == "registry_unavailable"
            assert "try again" in response.json()["error"]["message"]
    # More sign-ins than the limit (5 per address and account), the right password and a
    # wrong one: each is "unavailable", none is "wrong password", none counts.
    for password in [PASSWORD] * 4 + ["wrong"] * 4:
        response = _sign_in(world, password)
        _assert_unavailable(response)
        assert "cannot be reached" in response.text
    # The sandbox payments API behind the gateway (the gateway serves from its snapshot).
    paid = _pay(world)
    assert paid.status_code == 503, paid.text
    error = paid.json()["error"]
    assert error["code"] == "registry_unavailable"
    assert error["retry_after"] > 0
    # What the gateway needs to turn it into the header (see twofold.gateway.sandbox).
    assert retry_after_header(paid.json()) == [("Retry-After", str(error["retry_after"]))]

    proxy.restore()
    signed_in = _sign_in(world)
    assert signed_in.status_code == 303, signed_in.text[:300]  # not 429: the outage did not count
    with world.api("acme") as api:
        assert api.get(cert_path, params={"env": "cat"}).status_code == 200
    wait_until(lambda: _pay(world).status_code == 202, 5)

    problems = [
        r
        for r in caplog.records
        if r.name.startswith(("twofold", "aiohttp")) and (r.levelno >= logging.ERROR or r.exc_info)
    ]
    assert not problems, [f"{r.name}: {r.getMessage()[:200]}" for r in problems]
    assert not TRACE.search(caplog.text)
    world.assert_no_internal_errors()


def test_the_registry_errors_that_mean_unreachable_are_told_apart_from_bugs() -> None:
    """What counts as "unavailable" (503, retry later) and what stays a bug (logged, 500)."""
    from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError

    from twofold.registry.db import is_unavailable

    class Driver(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    assert is_unavailable(ConnectionRefusedError(111, "refused"))
    assert is_unavailable(TimeoutError())
    assert is_unavailable(DBAPIError("SELECT 1", None, Driver("57P01")))  # admin shutdown
    assert is_unavailable(DBAPIError("SELECT 1", None, Driver("53300")))  # too many connections
    assert is_unavailable(DBAPIError("SELECT 1", None, Driver("08006")))  # connection failure
    assert not is_unavailable(ProgrammingError("SELECT nope", None, Driver("42P01")))
    assert not is_unavailable(IntegrityError("INSERT", None, Driver("23505")))
    assert not is_unavailable(ValueError("a bug"))
    assert not is_unavailable(KeyError("a bug"))
