"""Replay protection (issue 11), on one `twofold serve` (SQLite): a captured signed request is
refused when sent again, its signing time must be inside the product's window, and its id is
unique per organisation — recorded in the registry before anything is forwarded. The same
across two gateway processes on one PostgreSQL database: tests/test_replay_nodes.py."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gatewaykit import World, assert_refusal, post_at_once, running_world
from twofold.crypto import jws
from twofold.errors import TwofoldError
from twofold.registry.auth import SYSTEM

JOSE = {"Content-Type": "application/jose"}
WINDOW = 30


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("replay")) as running:
        up = running.upstream.url
        running.call(
            running.registry.save_product(
                SYSTEM,
                "guarded",
                name="Guarded payments",
                path_prefix="/guarded",
                upstream=up,
                signature="required",
                content_types=["application/jose"],
                replay_window=WINDOW,
            )
        )
        running.call(  # the Open Banking way: iat in the JWS header, the instruction id as the id
            running.registry.save_product(
                SYSTEM,
                "ob",
                name="OB payments",
                path_prefix="/ob",
                upstream=up,
                signature="required",
                content_types=["application/jose"],
                replay_window=WINDOW,
                replay_iat="header:http://openbanking.org.uk/iat",
                replay_id="Data.Initiation.InstructionIdentification",
            )
        )
        for slug in ("acme", "globex"):
            with running.api(slug) as api:
                for product in ("guarded", "ob"):
                    added = api.put(
                        f"/api/v1/projects/{running.orgs[slug].project_id}/products/cat/{product}"
                    )
                    assert added.status_code == 200, added.text
        running.sync()
        yield running
        running.assert_no_internal_errors()


def signed(world: World, org: str, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> bytes:
    key = world.orgs[org].sign
    assert key is not None
    return jws.sign(json.dumps(claims).encode(), key.key, headers=headers).encode()


def fresh(**extra: Any) -> dict[str, Any]:
    return {"iat": int(time.time()), "jti": uuid.uuid4().hex, "amount": "10.00", **extra}


def post(world: World, org: str, path: str, body: bytes) -> httpx.Response:
    with world.client(world.orgs[org].mtls) as client:
        return client.post(path, content=body, headers=JOSE)


def test_a_captured_signed_request_sent_again_is_refused_and_not_forwarded(world: World) -> None:
    body = signed(world, "acme", fresh())
    mark = world.upstream.count()
    assert post(world, "acme", "/guarded/payments", body).status_code == 200
    again = post(world, "acme", "/guarded/payments", body)
    error = assert_refusal(again, 409, "replay_detected")
    assert "jti" in error["message"]
    assert "new jti" in error["message"]
    assert len(world.upstream.since(mark)) == 1
    # On a connection of its own too (another worker would see the same database).
    assert_refusal(post(world, "acme", "/guarded/payments", body), 409, "replay_detected")


def test_the_signing_time_must_be_inside_the_window(world: World) -> None:
    mark = world.upstream.count()
    now = int(time.time())
    for iat, code in (
        (None, "replay_iat_missing"),
        ("1700000000", "replay_iat_missing"),  # a string is not a NumericDate
        (True, "replay_iat_missing"),
        (now - WINDOW - 5, "replay_iat_outside_window"),
        (now + WINDOW + 5, "replay_iat_outside_window"),
    ):
        claims = fresh()
        if iat is None:
            del claims["iat"]
        else:
            claims["iat"] = iat
        error = assert_refusal(post(world, "acme", "/guarded/x", signed(world, "acme", claims)), 400, code)
        assert "iat" in error["message"]
    assert_refusal(
        post(world, "acme", "/guarded/x", signed(world, "acme", {"iat": now})), 400, "replay_id_missing"
    )
    assert_refusal(
        post(world, "acme", "/guarded/x", signed(world, "acme", fresh(jti=""))), 400, "replay_id_missing"
    )
    assert world.upstream.since(mark) == []
    # Just inside the window either way, with a fractional time.
    assert (
        post(world, "acme", "/guarded/x", signed(world, "acme", fresh(iat=now - WINDOW + 3))).status_code
        == 200
    )
    assert (
        post(world, "acme", "/guarded/x", signed(world, "acme", fresh(iat=now + WINDOW - 3.5))).status_code
        == 200
    )


def test_ids_are_unique_per_organisation_not_across_them(world: World) -> None:
    jti = f"shared-{uuid.uuid4().hex}"
    assert post(world, "acme", "/guarded/p", signed(world, "acme", fresh(jti=jti))).status_code == 200
    # globex may use the same id: its own signature, its own id space.
    assert post(world, "globex", "/guarded/p", signed(world, "globex", fresh(jti=jti))).status_code == 200
    # A new signature over a new time does not make an old id new.
    assert_refusal(
        post(world, "acme", "/guarded/p", signed(world, "acme", fresh(jti=jti))), 409, "replay_detected"
    )


def test_a_jws_header_time_and_a_nested_payload_id(world: World) -> None:
    instruction = f"INSTR-{uuid.uuid4().hex[:12]}"
    claims = {"Data": {"Initiation": {"InstructionIdentification": instruction, "Amount": "1.00"}}}
    header = {"http://openbanking.org.uk/iat": int(time.time())}
    body = signed(world, "acme", claims, header)
    assert post(world, "acme", "/ob/payments", body).status_code == 200
    assert_refusal(post(world, "acme", "/ob/payments", body), 409, "replay_detected")
    # iat in the payload does not count here: the product reads it from the header.
    error = assert_refusal(
        post(world, "acme", "/ob/payments", signed(world, "acme", {**claims, "iat": int(time.time())})),
        400,
        "replay_iat_missing",
    )
    assert "JWS header" in error["message"]
    assert "openbanking" in error["message"]
    no_id = signed(
        world, "acme", {"Data": {"Initiation": {}}}, {"http://openbanking.org.uk/iat": int(time.time())}
    )
    assert_refusal(post(world, "acme", "/ob/payments", no_id), 400, "replay_id_missing")


def test_the_same_request_sent_twenty_times_at_once_is_forwarded_once(world: World) -> None:
    body = signed(world, "acme", fresh())
    mark = world.upstream.count()
    statuses = post_at_once([lambda: world.client(world.orgs["acme"].mtls)] * 20, "/guarded/race", body, JOSE)
    assert statuses == [200] + [409] * 19
    assert len(world.upstream.since(mark)) == 1


def test_unsigned_reads_of_a_replay_protected_product_pass(world: World) -> None:
    with world.client(world.orgs["acme"].mtls) as client:
        assert client.get("/guarded/status").status_code == 200
        assert client.get("/guarded/status").status_code == 200


def test_replay_settings_are_checked_when_saved(world: World) -> None:
    def save(**settings: Any) -> dict[str, Any]:
        return world.call(
            world.registry.save_product(
                SYSTEM, "plain", name="Plain", path_prefix="/plain", upstream=world.upstream.url, **settings
            )
        )

    for settings in (
        {"signature": "none", "replay_window": 60},  # nothing signed: nothing to trust
        {"signature": "required", "replay_window": -1},
        {"signature": "required", "replay_window": 10**6},
        {"signature": "required", "replay_window": 60, "replay_iat": "a..b"},
        {"signature": "required", "replay_window": 60, "replay_id": "header:"},
        {"signature": "required", "replay_window": 60, "replay_id": "has space"},
    ):
        with pytest.raises(TwofoldError) as refused:
            save(content_types=["application/json", "text/xml"], **settings)
        assert refused.value.code == "product_invalid", settings
    # A later save that does not mention them keeps them; 0 turns them off.
    saved = save(signature="required", replay_window=60, replay_id="header:jti", sign_responses=True)
    assert (saved["replay_window"], saved["replay_iat"], saved["replay_id"], saved["sign_responses"]) == (
        60,
        "iat",
        "header:jti",
        True,
    )
    kept = save(signature="required")
    assert (kept["replay_window"], kept["replay_id"], kept["sign_responses"]) == (60, "header:jti", True)
    off = save(
        signature="none",
        content_types=["application/json", "text/xml"],
        replay_window=0,
        sign_responses=False,
    )
    assert (off["replay_window"], off["sign_responses"]) == (None, False)
    world.sync()
