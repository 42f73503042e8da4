"""Hostile bodies against a running gateway: every malformed or malicious JWS anyone has
thought of, sent by a client with a perfectly good mTLS certificate, to a product that
requires a signature. Each one must be refused with a 4xx and a stable code, must never
reach the upstream (a recording HTTP upstream behind ``/recorded``, and the sandbox
payments API, whose status query must not find the payment), must never produce a 5xx,
and must leave the gateway serving good requests.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewaykit import MAX_BODY, World, assert_refusal, payment, running_world, wait_until
from twofold.crypto import certs, jws, keys
from twofold.crypto.jwk import jwk_from_public_key
from twofold.crypto.keys import PrivateKey

JOSE = "application/jose"
NONE = "eyJhbGciOiJub25lIn0"  # {"alg":"none"}


@dataclass(frozen=True)
class Material:
    world: World
    sign_key: PrivateKey  # acme's registered Digital Signature key (RSA-2048)
    sign_cert_pem: bytes
    sign_fingerprint: str
    sign_x5t: str
    attacker_key: PrivateKey  # RSA-2048, registered nowhere
    attacker_cert_der: bytes
    attacker_ec: PrivateKey


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("gateway-hostile")) as running:
        yield running
        # After everything this module threw at it: alive, and not one 5xx.
        running.assert_no_internal_errors()
        assert 'outcome="upstream_' not in running.metrics_text()


@pytest.fixture(scope="module")
def m(world: World) -> Material:
    acme = world.orgs["acme"]
    assert acme.sign is not None
    attacker = keys.generate_private_key("rsa", bits=2048)
    attacker_cert = certs.self_signed_certificate(attacker, "/O=Acme/CN=acme-cat-sign", usage="signature")
    return Material(
        world=world,
        sign_key=acme.sign.key,
        sign_cert_pem=certs.certificate_pem(acme.sign.certificate),
        sign_fingerprint=acme.sign.fingerprint,
        sign_x5t=certs.x5t_s256(acme.sign.certificate),
        attacker_key=attacker,
        attacker_cert_der=certs.certificate_der(attacker_cert),
        attacker_ec=keys.generate_private_key("ec", curve="P-256"),
    )


# --- building tokens by hand -------------------------------------------------------------------


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_signed(header: str | bytes, payload: bytes, key: PrivateKey | bytes, alg: str = "RS256") -> str:
    """A compact JWS whose header segment is exactly ``header`` (raw JSON text), signed
    with ``key`` under ``alg`` — for headers the library would never write."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    return f"{signing_input}.{b64(jws.raw_sign(alg, key, signing_input.encode()))}"


def body_of(e2e: str) -> bytes:
    return json.dumps(payment(e2e)).encode()


Case = Callable[[Material, str], tuple[bytes, str]]
CASES: dict[str, tuple[Case, int | set[int], str | set[str]]] = {}


def case(name: str, status: int | set[int], code: str | set[str]) -> Callable[[Case], Case]:
    def register(build: Case) -> Case:
        CASES[name] = (build, status, code)
        return build

    return register


def jose(token: str | bytes) -> tuple[bytes, str]:
    return (token.encode() if isinstance(token, str) else token), JOSE


@case("alg-none-with-trailing-dot", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(f"{NONE}.{b64(body_of(e2e))}.")


@case("alg-none-without-trailing-dot", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(f"{NONE}.{b64(body_of(e2e))}")


@case("alg-none-with-a-signature", 400, "jws_alg_not_allowed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    good = jws.sign(body_of(e2e), m.sign_key)
    return jose(f"{NONE}.{b64(body_of(e2e))}.{good.rsplit('.', 1)[1]}")


@case("alg-NONE-upper-case", 400, "jws_alg_not_allowed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    good = jws.sign(body_of(e2e), m.sign_key)
    upper = b64('{"alg":"NONE"}')
    return jose(f"{upper}.{b64(body_of(e2e))}.{good.rsplit('.', 1)[1]}")


@case("alg-none-as-legacy-text-xml", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return f"{NONE}.{b64(body_of(e2e))}.".encode(), "text/xml"


@case("hs256-keyed-with-the-signers-public-key-pem", 400, "jws_alg_not_allowed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    public_pem = keys.public_key_bytes(m.sign_key)
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    return jose(hand_signed('{"alg":"HS256"}', body_of(e2e), public_pem, "HS256"))


@case("hs256-keyed-with-the-signers-certificate-pem", 400, "jws_alg_not_allowed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(
        hand_signed(f'{{"alg":"HS256","x5t#S256":"{m.sign_x5t}"}}', body_of(e2e), m.sign_cert_pem, "HS256")
    )


@case("signed-with-a-key-that-is-not-registered", 401, "jws_signature_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.attacker_key))


@case("kid-and-x5t-name-the-registered-certificate-but-another-key-signed", 401, "jws_signature_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.attacker_key, kid=m.sign_fingerprint, x5t_s256=m.sign_x5t))


@case("es256-signed-by-an-attacker-ec-key", 400, "jws_alg_not_allowed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.attacker_ec))


@case("ps256-not-in-the-products-allow-list", 400, "jws_alg_not_allowed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.sign_key, alg="PS256"))  # the right key, the wrong algorithm


@case("unknown-critical-header", 400, "jws_crit_unsupported")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.sign_key, headers={"crit": ["exp-policy"], "exp-policy": 1}))


@case("b64-false-listed-in-crit", 400, {"jws_header_invalid", "jws_crit_unsupported"})
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    header = '{"alg":"RS256","b64":false,"crit":["b64"]}'
    signing_input = b64(header).encode() + b"." + body_of(e2e)  # RFC 7797: the payload unencoded
    signature = jws.raw_sign("RS256", m.sign_key, signing_input)
    return jose(f"{b64(header)}.{b64(body_of(e2e))}.{b64(signature)}")


@case("b64-false-without-crit", 400, "jws_header_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(hand_signed('{"alg":"RS256","b64":false}', body_of(e2e), m.sign_key))


@case("embedded-jwk-of-the-attackers-key", 401, "jws_signature_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    jwk = jwk_from_public_key(m.attacker_key.public_key())  # type: ignore[arg-type]
    return jose(jws.sign(body_of(e2e), m.attacker_key, headers={"jwk": jwk}))


@case("jku-pointing-at-the-attackers-key-set", 401, "jws_signature_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    # The recording upstream would see a fetch of this URL: it must see none.
    jku = f"{m.world.upstream.url}/attacker/jwks.json"
    return jose(jws.sign(body_of(e2e), m.attacker_key, headers={"jku": jku}))


@case("x5u-pointing-at-the-attackers-certificate", 401, "jws_signature_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    x5u = f"{m.world.upstream.url}/attacker/cert.pem"
    return jose(jws.sign(body_of(e2e), m.attacker_key, headers={"x5u": x5u}))


@case("x5c-carrying-the-attackers-certificate", 401, "jws_signature_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    x5c = [base64.b64encode(m.attacker_cert_der).decode()]
    return jose(jws.sign(body_of(e2e), m.attacker_key, headers={"x5c": x5c}))


@case("duplicate-alg-rs256-then-none", 400, "jws_header_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(hand_signed('{"alg":"RS256","alg":"none"}', body_of(e2e), m.sign_key))


@case("duplicate-alg-none-then-rs256", 400, "jws_header_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(hand_signed('{"alg":"none","alg":"RS256"}', body_of(e2e), m.sign_key))


@case("header-is-not-json", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(hand_signed("alg=RS256", body_of(e2e), m.sign_key))


@case("header-is-a-json-array", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(hand_signed('["RS256"]', body_of(e2e), m.sign_key))


@case("header-without-alg", 400, "jws_header_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(hand_signed('{"typ":"JOSE"}', body_of(e2e), m.sign_key))


@case("alg-is-not-a-string", 400, "jws_header_invalid")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(hand_signed('{"alg":["RS256"]}', body_of(e2e), m.sign_key))


@case("header-nested-thousands-deep", 400, "jws_header_invalid")  # over the header size cap
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    header = '{"alg":"RS256","x":' + "[" * 5000 + "]" * 5000 + "}"
    return jose(hand_signed(header, body_of(e2e), m.sign_key))


@case("header-nested-deeper-than-the-recursion-limit", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    header = '{"alg":"RS256","x":' + "[" * 1200 + "]" * 1200 + "}"
    return jose(hand_signed(header, body_of(e2e), m.sign_key))


@case("payload-is-not-json", 400, "payload_not_json")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(f"endToEndId={e2e}&amount=1".encode(), m.sign_key))


@case("payload-is-not-utf8", 400, "payload_not_json")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(b'{"e2e": "\xff\xfe"}', m.sign_key))


@case("payload-has-nan-which-is-not-json", 400, "payload_not_json")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e)[:-1] + b', "amount": NaN}', m.sign_key))


@case("payload-nested-thousands-deep", 400, "payload_not_json")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(b'{"e2e":' + b"[" * 5000 + b"]" * 5000 + b"}", m.sign_key))


@case("truncated-signature", {400, 401}, {"jws_malformed", "jws_signature_invalid"})
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.sign_key)[:-10])


@case("signature-cut-to-one-character", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    token = jws.sign(body_of(e2e), m.sign_key)
    return jose(token[: token.rindex(".") + 2])


@case("token-truncated-inside-the-payload", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    token = jws.sign(body_of(e2e), m.sign_key)
    return jose(token[: token.index(".") + 40])


@case("non-canonical-base64-in-the-signature", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    token = jws.sign(body_of(e2e), m.sign_key)
    # 256 signature bytes → 342 characters, whose last one carries 4 unused bits: setting
    # one of them decodes to the same bytes in a lax decoder.
    last = token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) + 1]
    assert base64.urlsafe_b64decode(token.rsplit(".", 1)[1][:-1] + twin + "==") == base64.urlsafe_b64decode(
        token.rsplit(".", 1)[1] + "=="
    )
    return jose(token[:-1] + twin)


@case("base64-padding", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.sign_key) + "==")


@case("four-segments", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(body_of(e2e), m.sign_key) + ".e30")


@case("five-segments-like-a-jwe", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    token = jws.sign(body_of(e2e), m.sign_key)
    header, payload, signature = token.split(".")
    return jose(f"{header}..{payload}.{signature}.{signature[:22]}")


@case("json-serialization-general", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    header, payload, signature = jws.sign(body_of(e2e), m.sign_key).split(".")
    return jose(
        json.dumps({"payload": payload, "signatures": [{"protected": header, "signature": signature}]})
    )


@case("json-serialization-flattened", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    header, payload, signature = jws.sign(body_of(e2e), m.sign_key).split(".")
    return jose(json.dumps({"payload": payload, "protected": header, "signature": signature}))


@case("non-ascii-utf8-inside-the-token", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    token = jws.sign(body_of(e2e), m.sign_key)
    cut = token.index(".") + 5
    return jose((token[:cut] + "é" + token[cut:]).encode())


@case("a-latin1-byte-inside-the-token", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    token = jws.sign(body_of(e2e), m.sign_key).encode()
    return jose(token[:20] + b"\xff" + token[20:])


@case("whitespace-inside-the-token", 400, "jws_malformed")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    token = jws.sign(body_of(e2e), m.sign_key)
    return jose(token.replace(".", ". ", 1))


@case("empty-body-declared-as-jose", 400, "signature_required")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return b"", JOSE


@case("a-valid-jws-sent-as-application-json", 415, "signature_required")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jws.sign(body_of(e2e), m.sign_key).encode(), "application/json"


@case("the-payload-json-unsigned", 415, "signature_required")
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return body_of(e2e), "application/json"


@case("huge-token-over-the-body-limit", 413, {"body_too_large", "jws_too_large"})
def _(m: Material, e2e: str) -> tuple[bytes, str]:
    return jose(jws.sign(json.dumps(payment(e2e, pad="x" * MAX_BODY)).encode(), m.sign_key))


# --- the catalogue -----------------------------------------------------------------------------


def send(world: World, path: str, body: bytes, content_type: str, method: str = "POST") -> httpx.Response:
    with world.client(world.orgs["acme"].mtls) as client:
        return client.request(method, path, content=body, headers={"Content-Type": content_type})


def good_request_still_works(world: World) -> None:
    with world.client(world.orgs["acme"].mtls) as client:
        response = client.post(
            "/tsapi/v1/payments",
            content=jws.sign(body_of(f"E2E-GOOD-{uuid.uuid4().hex[:12]}"), world.orgs["acme"].sign.key),  # type: ignore[union-attr]
            headers={"Content-Type": JOSE},
        )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_jws_is_refused_with_a_4xx_and_never_forwarded(
    world: World, m: Material, name: str
) -> None:
    build, status, code = CASES[name]
    statuses = status if isinstance(status, set) else {status}
    mark = world.upstream.count()
    e2e = f"E2E-HOSTILE-{uuid.uuid4().hex[:12]}"
    body, content_type = build(m, e2e)
    for path in ("/recorded/payments", "/tsapi/v1/payments"):
        response = send(world, path, body, content_type)
        assert response.status_code in statuses, (path, response.status_code, response.text[:300])
        assert_refusal(response, response.status_code, code)
    # GET with the same body (a body makes it signed, whatever the method)
    if body:
        response = send(world, "/recorded/payments", body, content_type, method="GET")
        assert 400 <= response.status_code < 500, response.text
    # nothing reached the recording upstream — not the request, not a jku/x5u fetch
    assert world.upstream.since(mark) == []
    # and the sandbox has no such payment
    with world.client(world.orgs["acme"].mtls) as client:
        assert_refusal(
            client.get("/tsapi/v1/payments/status", params={"endToEndId": e2e}), 404, "payment_not_found"
        )
    good_request_still_works(world)


def test_a_valid_token_passes_the_same_route(world: World, m: Material) -> None:
    """The control for the catalogue: the route works, so the refusals above are the verifier's."""
    raw = body_of(f"E2E-CONTROL-{uuid.uuid4().hex[:12]}")
    mark = world.upstream.count()
    response = send(world, "/recorded/payments", jws.sign(raw, m.sign_key).encode(), JOSE)
    assert response.status_code == 200, response.text
    [seen] = world.upstream.since(mark)
    assert seen.body == raw
    assert seen.header("X-Twofold-Signature-Cert-Sha256") == [m.sign_fingerprint]
    # legacy text/xml, upper-case media type with parameters, surrounding whitespace: all the same JWS
    for content_type, body in (
        ("text/xml", jws.sign(raw, m.sign_key).encode()),
        ("Application/JOSE; charset=utf-8", b"  " + jws.sign(raw, m.sign_key).encode() + b"\r\n"),
    ):
        response = send(world, "/recorded/payments", body, content_type)
        assert response.status_code == 200, (content_type, response.text)
    assert [s.body for s in world.upstream.since(mark)] == [raw, raw, raw]


# --- hostile transport ------------------------------------------------------------------------


def test_a_compressed_body_that_inflates_past_the_limit_is_413(world: World) -> None:
    bomb = gzip.compress(b"{" + b" " * (20 * MAX_BODY) + b"}")
    assert len(bomb) < MAX_BODY // 4
    mark = world.upstream.count()
    with world.client(world.orgs["acme"].mtls) as client:
        for path, content_type in (("/plain/bomb", "application/json"), ("/recorded/bomb", JOSE)):
            response = client.post(
                path, content=bomb, headers={"Content-Type": content_type, "Content-Encoding": "gzip"}
            )
            assert_refusal(response, 413, "body_too_large")
    assert world.upstream.since(mark) == []
    good_request_still_works(world)


def test_an_oversized_header_is_refused_with_a_4xx_without_a_traceback(world: World) -> None:
    mark = world.upstream.count()
    with world.client(world.orgs["acme"].mtls) as client:
        response = client.get("/plain/x", headers={"X-Padding": "a" * 20000})
    assert 400 <= response.status_code < 500
    assert "Traceback" not in response.text
    assert world.upstream.since(mark) == []
    good_request_still_works(world)


def test_an_oversized_header_is_refused_as_json(world: World) -> None:
    with world.client(world.orgs["acme"].mtls) as client:
        response = client.get("/plain/x", headers={"X-Padding": "a" * 20000})
    assert_refusal(response, 400)


def _raw_tls(world: World) -> ssl.SSLSocket:
    context = world.client_context(world.orgs["acme"].mtls)
    return context.wrap_socket(
        socket.create_connection(("127.0.0.1", world.port()), timeout=5), server_hostname="localhost"
    )


def test_a_client_that_hangs_up_mid_body_is_not_an_internal_error(world: World) -> None:
    mark = world.access.mark()
    upstream_mark = world.upstream.count()
    tls = _raw_tls(world)
    tls.sendall(
        b"POST /recorded/payments HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/jose\r\n"
        b"Content-Length: 4000\r\n\r\neyJhbGciOiJSUzI1NiJ9."
    )
    time.sleep(0.1)
    tls.close()
    wait_until(lambda: len(world.access.since(mark)) >= 1, 3)
    [line] = world.access.since(mark)
    assert line["outcome"] != "internal_error", line
    assert line["status"] < 500, line
    assert world.upstream.since(upstream_mark) == []
    good_request_still_works(world)


def test_garbage_and_plain_http_on_the_tls_port_do_not_hurt_the_gateway(world: World) -> None:
    for junk in (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\x00" * 64):
        with socket.create_connection(("127.0.0.1", world.port()), timeout=5) as raw:
            raw.sendall(junk)
            raw.settimeout(2)
            try:
                answer = raw.recv(4096)
            except (ConnectionError, TimeoutError, OSError):
                answer = b""
            assert b"Traceback" not in answer
    good_request_still_works(world)


# --- mutations of a valid token ------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_token(m: Material) -> bytes:
    return jws.sign(body_of(f"E2E-MUTANT-{uuid.uuid4().hex[:12]}"), m.sign_key).encode()


@st.composite
def mutated(draw: st.DrawFn, token: bytes) -> bytes:
    kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "duplicate", "swap"]))
    at = draw(st.integers(0, len(token) - 1))
    if kind == "replace":
        return token[:at] + bytes([draw(st.integers(0, 255))]) + token[at + 1 :]
    if kind == "insert":
        return token[:at] + draw(st.binary(min_size=1, max_size=8)) + token[at:]
    if kind == "delete":
        return token[:at] + token[at + draw(st.integers(1, 16)) :]
    if kind == "truncate":
        return token[:at]
    if kind == "duplicate":
        size = draw(st.integers(1, 32))
        return token[:at] + token[at : at + size] + token[at:]
    other = draw(st.integers(0, len(token) - 1))
    swapped = bytearray(token)
    swapped[at], swapped[other] = swapped[other], swapped[at]
    return bytes(swapped)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(data=st.data())
def test_every_mutation_of_a_valid_token_is_refused_unless_it_is_the_same_token(
    world: World, valid_token: bytes, data: st.DataObject
) -> None:
    """Accepted only when the bytes are the token's own (up to the surrounding whitespace
    the gateway trims); anything else is a 4xx and reaches nobody."""
    body = data.draw(mutated(valid_token), label="body")
    content_type = data.draw(st.sampled_from([JOSE, "text/xml"]), label="content_type")
    mark = world.upstream.count()
    response = send(world, "/recorded/payments", body, content_type)
    seen = world.upstream.since(mark)
    if body.strip() == valid_token:
        assert response.status_code == 200, response.text
        assert len(seen) == 1
    else:
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        assert_refusal(response, response.status_code)
        assert seen == [], body


def test_the_gateway_still_serves_after_all_of_it(world: World, m: Material) -> None:
    good_request_still_works(world)
    with world.client(world.orgs["globex"].mtls) as client:
        assert client.get("/accessapi/balance").status_code == 200
    assert httpx.get(f"{world.admin}/readyz", timeout=5).json()["ready"] is True
