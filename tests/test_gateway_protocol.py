"""The gateway's own HTTP/1.1 protocol, driven byte by byte over real mTLS: what a lean
server makes possible to get wrong — pipelined requests with bodies (answered in order,
each body to its own request), `Expect: 100-continue`, chunked bodies, HEAD, requests that
arrive one byte at a time, a client that stops reading its answers (backpressure), and a
client that hangs up while its request is being forwarded."""

from __future__ import annotations

import json
import random
import socket
import struct
import time
import uuid
from collections.abc import Iterator

import pytest

from gatewaykit import LARGE, MAX_BODY, RawClient, World, http_request, payment, running_world, wait_until
from twofold.crypto import jws

JOSE = {"Content-Type": "application/jose"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("gateway-protocol")) as running:
        yield running
        running.assert_no_internal_errors()


def signed(world: World, payload: bytes) -> bytes:
    sign = world.orgs["acme"].sign
    assert sign is not None
    return jws.sign(payload, sign.key).encode()


def test_pipelined_requests_with_bodies_are_answered_in_order_each_with_its_own_body(world: World) -> None:
    first, second, third = (json.dumps({"n": n, "pad": "x" * 50 * n}).encode() for n in (1, 2, 3))
    burst = b"".join(
        [
            http_request("POST", "/recorded/one", signed(world, first), JOSE),
            http_request("POST", "/plain/two", second, JSON),
            http_request("GET", "/nowhere"),  # a refusal between them keeps its place
            http_request("POST", "/plain/three", third, JSON, chunked=True),
            http_request("GET", "/accessapi/balance"),
        ]
    )
    mark = world.upstream.count()
    with RawClient(world) as client:
        client.send(burst)
        answers = client.answers(5)
    assert [a.status for a in answers] == [200, 200, 404, 200, 200], answers
    assert [json.loads(a.body).get("path") for a in answers[:2]] == ["/recorded/one", "/plain/two"]
    assert json.loads(answers[2].body)["error"]["code"] == "no_such_api"
    assert json.loads(answers[3].body)["path"] == "/plain/three"
    assert json.loads(answers[4].body)["organisation"] == "acme"
    seen = world.upstream.since(mark)
    assert [(s.path, s.body) for s in seen] == [
        ("/recorded/one", first),
        ("/plain/two", second),
        ("/plain/three", third),
    ]
    assert seen[2].header("Content-Length") == [str(len(third))]  # forwarded with a length, unchunked
    assert seen[2].header("Transfer-Encoding") == []


def test_expect_100_continue_gets_continue_only_when_the_request_would_be_accepted(world: World) -> None:
    body = json.dumps({"a": 1}).encode()
    head = http_request("POST", "/plain/expect", body, {**JSON, "Expect": "100-continue"})[: -len(body)]
    with RawClient(world) as client:
        client.send(head)
        [interim] = client.answers(1)
        assert interim.status == 100
        client.send(body)
        [final] = client.answers(1)
        assert final.status == 200, final
        assert json.loads(final.body)["received"] == len(body)
        # refused before the body: no 100, the refusal at once, and the connection closed
        client.send(http_request("POST", "/ledger", body, {**JSON, "Expect": "100-continue"})[: -len(body)])
        [refused] = client.answers(1)
        assert refused.status == 403
        assert json.loads(refused.body)["error"]["code"] == "product_not_in_project"
        assert client.closed_by_server()


def test_a_chunked_signed_body_is_verified_and_forwarded_as_its_payload(world: World) -> None:
    payload = json.dumps(payment()).encode()
    mark = world.upstream.count()
    with RawClient(world) as client:
        client.send(http_request("POST", "/recorded/chunked", signed(world, payload), JOSE, chunked=True))
        [answer] = client.answers(1)
    assert answer.status == 200, answer
    [seen] = world.upstream.since(mark)
    assert seen.body == payload


def test_bodies_near_the_limit_and_in_many_small_chunks_arrive_whole(world: World) -> None:
    """Bodies read in many pieces: a signed body just under the limit (64 KB), and a chunked
    body of 2,000 chunks of 30 bytes (its framing is far more than its extensions allow)."""
    big = json.dumps({"pad": "x" * (MAX_BODY * 2 // 3)}).encode()  # its JWS: ~90% of the limit
    small_chunks = json.dumps({"items": ["y" * 20] * 2000}).encode()
    framed = b"".join(
        b"%x\r\n%s\r\n" % (len(small_chunks[i : i + 30]), small_chunks[i : i + 30])
        for i in range(0, len(small_chunks), 30)
    )
    mark = world.upstream.count()
    with RawClient(world) as client:
        client.send(http_request("POST", "/recorded/big", signed(world, big), JOSE))
        client.send(
            b"POST /plain/chunks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
        )
        answers = client.answers(2)
    assert [a.status for a in answers] == [200, 200], answers
    assert [s.body for s in world.upstream.since(mark)] == [big, small_chunks]


def test_head_answers_carry_the_length_but_no_body_and_keep_the_connection(world: World) -> None:
    with RawClient(world) as client:
        client.send(http_request("HEAD", "/plain/large"))
        raw = client.head_answer()
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), raw[:200]
        assert f"\r\nContent-Length: {LARGE}".encode() in head
        assert rest == b""
        client.send(http_request("HEAD", "/nowhere"))  # the gateway's own answer
        own_head, _, rest = client.head_answer().partition(b"\r\n\r\n")
        client.send(http_request("GET", "/nowhere"))
        [answer] = client.answers(1)  # the same connection goes on
    assert own_head.startswith(b"HTTP/1.1 404 ")
    assert rest == b""
    assert f"\r\nContent-Length: {len(answer.body)}".encode() in own_head
    assert answer.status == 404


def test_a_request_that_arrives_one_byte_at_a_time_is_the_same_request(world: World) -> None:
    payload = json.dumps({"slow": "drip"}).encode()
    request = http_request("POST", "/recorded/drip", signed(world, payload), JOSE)
    mark = world.upstream.count()
    with RawClient(world) as client:
        for byte in range(len(request)):
            client.send(request[byte : byte + 1])
        [answer] = client.answers(1)
        assert answer.status == 200, answer
        # and cut at random places, several requests in a row
        rng = random.Random(7)
        stream = b"".join(http_request("POST", f"/plain/cut{n}", payload, JSON) for n in range(5))
        cuts = sorted(rng.sample(range(1, len(stream)), 40))
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            client.send(stream[start:end])
        answers = client.answers(5)
    assert [a.status for a in answers] == [200] * 5
    assert [(s.path, s.body) for s in world.upstream.since(mark)] == [("/recorded/drip", payload)] + [
        (f"/plain/cut{n}", payload) for n in range(5)
    ]


def test_a_client_that_does_not_read_its_answers_is_not_served_ahead(world: World) -> None:
    """64 pipelined requests for 256 KB answers, none read: the gateway stops taking
    requests once its buffer to the client is full, instead of holding 16 MB; reading
    then gets every answer, in order."""
    count = 64
    burst = b"".join(http_request("GET", f"/plain/large?n={n}") for n in range(count))
    mark = world.upstream.count()
    with RawClient(world, rcvbuf=16 * 1024) as client:
        client.send(burst)
        time.sleep(1.5)
        forwarded = len(world.upstream.since(mark))
        assert forwarded < count // 2, (
            f"{forwarded} of {count} requests forwarded to a client that reads nothing"
        )
        answers = client.answers(count, timeout=30)
    assert [a.status for a in answers] == [200] * count
    assert [a.body[: a.body.index(b" ")].decode() for a in answers] == [f"n={n}" for n in range(count)]
    assert all(len(a.body) == LARGE for a in answers)


def test_a_client_that_hangs_up_while_its_request_is_forwarded_is_logged_and_harmless(world: World) -> None:
    mark = world.access.mark()
    marker = uuid.uuid4().hex
    client = RawClient(world)
    client.send(http_request("GET", f"/slow/{marker}"))  # the upstream answers after the gateway's timeout
    time.sleep(0.2)
    client.close()
    wait_until(lambda: any(line["path"] == f"/slow/{marker}" for line in world.access.since(mark)), 5)
    [line] = [line for line in world.access.since(mark) if line["path"] == f"/slow/{marker}"]
    assert (line["status"], line["outcome"]) == (504, "upstream_timeout")
    with RawClient(world) as again:
        again.send(http_request("GET", "/accessapi/balance"))
        assert [a.status for a in again.answers(1)] == [200]


def test_clients_that_reset_their_connection_are_let_go_at_once(world: World) -> None:
    """A reset makes the poll report an error, after which uvloop calls the reader once and
    closes the poll: the connection must notice the reset then, not at its header deadline
    (seconds later) — after a request, and with half a request sent just before the reset."""
    wait_until(lambda: world.metric("twofold_gateway_connections", environment="cat") == 0, 5)
    clients = [RawClient(world) for _ in range(30)]
    for client in clients[:10]:
        client.send(http_request("GET", "/accessapi/balance"))
        assert [a.status for a in client.answers(1)] == [200]
    assert world.metric("twofold_gateway_connections", environment="cat") == 30
    for client in clients:
        client.tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for client in clients:
        client.send(b"GET /accessapi/balance HTTP/1.1\r\nHost: loc")
        client.tls.close()  # with SO_LINGER 0: a reset instead of a FIN
    elapsed = wait_until(lambda: world.metric("twofold_gateway_connections", environment="cat") == 0, 8)
    assert elapsed < 1.0, f"reset connections were held for {elapsed:.1f} s"
