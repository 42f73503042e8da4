"""Fuzzing, bounded for the suite (issue 11): hypothesis builds inputs from their structure —
not only mutations of a valid one — and the code under test may refuse them only its own way.

* The JWS parser and verifier: random headers (any JSON, duplicate names, not JSON at all),
  payloads and signatures, in every encoding that is nearly base64url (padding, the standard
  alphabet, non-canonical last characters, whitespace, non-ASCII), with any number of dots:
  only :class:`twofold.errors.JWSError`, never another exception.
* The gateway's request parsing: raw HTTP/1.1 bytes over mTLS to a running gateway (request
  lines, header names and values with odd bytes, framing that contradicts itself, chunked
  bodies with extensions and trailers, pipelining, bare LF): every answer is below 500 and
  parses as HTTP, the connection is answered or closed within its deadlines, and nothing is
  logged as an error.

The PEM/DER upload parser is fuzzed in tests/test_portal_probes.py (mutations and structure).
TWOFOLD_FUZZ_EXAMPLES raises the number of examples (default 400 for the parser, a third of it
for the gateway).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Iterator
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewaykit import RawClient, World, running_world
from twofold.crypto import jws, keys
from twofold.errors import JWSError

EXAMPLES = int(os.environ.get("TWOFOLD_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

RSA = keys.generate_private_key("rsa", bits=2048)
EC = keys.generate_private_key("ec")
SECRET = b"s" * 32
VERIFIERS = [
    jws.Verifier([RSA.public_key()]),
    jws.Verifier(
        [RSA.public_key(), EC.public_key(), SECRET], algorithms=("RS256", "PS256", "ES256", "HS256")
    ),
    jws.Verifier(
        [jws.VerificationKey(EC.public_key(), frozenset({"k1"}), alg="ES256")],
        algorithms=("ES256",),
        critical=("exp",),
    ),
]

# --- the JWS parser --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
HEADER_NAMES = ["alg", "kid", "typ", "cty", "crit", "b64", "x5t#S256", "jwk", "jku", "x5c", "exp", "zip"]
ALGS = ["RS256", "PS256", "ES256", "HS256", "none", "None", "RS1", "", "ES512", "EdDSA"]


@st.composite
def header_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["object"] * 5 + ["duplicate", "json", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    header: dict[str, Any] = {}
    if draw(st.integers(0, 4)):
        header["alg"] = draw(st.sampled_from(ALGS * 3) | json_values)
    for name in draw(st.lists(st.sampled_from(HEADER_NAMES) | st.text(max_size=6), max_size=5)):
        header[name] = draw(st.sampled_from([["exp"], [], ["alg"], [1], False, "k1"]) | json_values)
    text = json.dumps(header, ensure_ascii=draw(st.booleans()))
    if kind == "duplicate" and header:
        name = next(iter(header))
        text = text[:-1] + f', "{name}": "again"' + "}" if text != "{}" else text
    return text.encode()


@st.composite
def encoded(draw: st.DrawFn, raw: bytes) -> str:
    """``raw`` in an encoding that is base64url, or nearly."""
    text = base64.urlsafe_b64encode(raw).decode()
    kind = draw(
        st.sampled_from(["canonical"] * 8 + ["padded", "standard", "last-char", "junk", "unicode", "spaces"])
    )
    if kind == "canonical":
        return text.rstrip("=")
    if kind == "padded":
        return text
    if kind == "standard":
        return base64.b64encode(raw).decode()
    if kind == "last-char" and text.rstrip("="):
        stripped = text.rstrip("=")
        return stripped[:-1] + draw(st.sampled_from("AQgwBRhx-_"))
    if kind == "junk":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from(["=", "+", "/", "\x00", "%", "\n", "."])) + text[at:]
    if kind == "unicode":
        return text.rstrip("=") + draw(st.characters(min_codepoint=0x80))
    return " " + text.rstrip("=") + "\t"


@st.composite
def tokens(draw: st.DrawFn) -> str | bytes:
    if draw(st.integers(0, 4)) == 0:  # well-formed up to its signature: the key checks are reached
        alg = draw(st.sampled_from(["RS256", "PS256", "ES256", "HS256", "ES384"]))
        header = jws.b64url_encode(
            json.dumps({"alg": alg, **draw(st.sampled_from([{}, {"kid": "k1"}]))}).encode()
        )
        body = jws.b64url_encode(draw(st.binary(max_size=64)))
        return f"{header}.{body}.{jws.b64url_encode(draw(st.binary(min_size=1, max_size=300)))}"
    header = draw(encoded(draw(header_bytes())))
    payload = draw(encoded(draw(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))))
    signature = draw(encoded(draw(st.binary(max_size=600))))
    parts = [header, payload, signature]
    shape = draw(st.sampled_from(["three"] * 6 + ["fewer", "more", "json", "empty-parts"]))
    if shape == "fewer":
        parts = parts[: draw(st.integers(0, 2))]
    elif shape == "more":
        parts += draw(st.lists(st.text(max_size=8), min_size=1, max_size=3))
    elif shape == "json":
        return json.dumps({"protected": header, "payload": payload, "signature": signature})
    elif shape == "empty-parts":
        parts[draw(st.integers(0, 2))] = ""
    token = ".".join(parts)
    if draw(st.booleans()):
        return token.encode("utf-8", "surrogatepass")
    return token


@settings(FUZZ, max_examples=EXAMPLES)
@given(token=tokens(), which=st.integers(0, len(VERIFIERS) - 1), detached=st.none() | st.binary(max_size=32))
def test_the_jws_parser_refuses_anything_only_with_jws_errors(
    token: str | bytes, which: int, detached: bytes | None
) -> None:
    with contextlib.suppress(JWSError):  # anything else fails the test
        VERIFIERS[which].verify(token, detached_payload=detached)
    text = token.decode("utf-8", "replace") if isinstance(token, bytes) else token
    for call in (
        lambda: jws.unverified_header(text),
        lambda: jws.parse_header(text.split(".", 1)[0]),
        lambda: jws.b64url_decode(text),
    ):
        with contextlib.suppress(JWSError):
            call()


def test_the_token_strategy_reaches_every_refusal_and_some_acceptances() -> None:
    """The property above is only as good as its inputs: they reach the verifier's checks."""
    codes: set[str] = set()

    @settings(FUZZ, max_examples=600)
    @given(token=tokens())
    def collect(token: str | bytes) -> None:
        try:
            VERIFIERS[1].verify(token)
        except JWSError as error:
            codes.add(error.code)

    collect()
    assert {"jws_malformed", "jws_header_invalid", "jws_alg_not_allowed"} <= codes, codes
    assert {"jws_signature_invalid", "jws_no_key"} & codes, codes


# --- the gateway's request parsing ---------------------------------------------------------------

HEADER_TIMEOUT = BODY_TIMEOUT = 1.0
GATEWAY_EXAMPLES = max(EXAMPLES // 3, 10)
PATHS = [
    "/accessapi/balance",
    "/echo",
    "/plain/x",
    "/recorded/x",
    "/relay/x",
    "*",
    "http://localhost/echo",
    "/%2e%2e/echo",
    "/echo?x=%ff",
    "",
    "/" + "a" * 9000,
]
METHODS = [
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "HEAD",
    "OPTIONS",
    "PATCH",
    "CONNECT",
    "TRACE",
    "PRI",
    "get",
    "G\x00T",
    "",
]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", "HTTP/0.9", "", "http/1.1"]
FIELDS = {
    "Host": ["localhost", "", "a" * 300, "localhost:99999"],
    "Content-Length": ["0", "5", "-1", "9223372036854775808", "5, 5", "+5", " 5 ", "0x10", "1" * 30],
    "Transfer-Encoding": [
        "chunked",
        "gzip, chunked",
        "chunked, chunked",
        "identity",
        "chunked;x=1",
        "xchunked",
    ],
    "Content-Type": ["application/json", "application/jose", "text/xml", "multipart/form-data", "\x00"],
    "Content-Encoding": ["gzip", "deflate", "br", "gzip, gzip", "identity"],
    "Expect": ["100-continue", "200-ok", ""],
    "Connection": ["close", "keep-alive", "upgrade", "Upgrade, HTTP2-Settings"],
    "Upgrade": ["websocket", "h2c"],
    "X-Twofold-Organisation": ["globex"],
    "Authorization": ["Bearer tf_secret_in_a_header"],
}


@st.composite
def field_line(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:  # a name or value of odd bytes, or a folded line
        name = draw(st.binary(min_size=0, max_size=12))
        value = draw(st.binary(max_size=40))
        fold = b"\r\n " + draw(st.binary(max_size=8)) if draw(st.booleans()) else b""
        return name + b":" + value + fold
    name = draw(st.sampled_from(sorted(FIELDS)))
    value = draw(st.sampled_from(FIELDS[name]))
    spelled = draw(st.sampled_from([name, name.lower(), name.upper(), name + " ", " " + name]))
    return f"{spelled}: {value}".encode("latin-1")


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(max_size=40))
        size = draw(
            st.sampled_from(
                [f"{len(data):x}", f"{len(data) + 1:x}", "zz", "-1", "ffffffffffffffffff", f"{len(data):X}"]
            )
        )
        ext = draw(st.sampled_from(["", ";a=b", ";" + "x" * 200, ';q="\x01"']))
        out += f"{size}{ext}\r\n".encode("latin-1") + data + b"\r\n"
    if draw(st.booleans()):
        out += (
            b"0\r\n"
            + draw(
                st.sampled_from(
                    [b"", b"Trailer: x\r\n", b"X-Twofold-Organisation: globex\r\n", b"bad trailer\r\n"]
                )
            )
            + b"\r\n"
        )
    return out


@st.composite
def raw_request(draw: st.DrawFn) -> bytes:
    line = f"{draw(st.sampled_from(METHODS))} {draw(st.sampled_from(PATHS))} {draw(st.sampled_from(VERSIONS))}".encode(
        "latin-1"
    )
    if draw(st.integers(0, 6)) == 0:
        line = draw(st.binary(max_size=60))
    fields = draw(st.lists(field_line(), max_size=6))
    body = draw(
        st.sampled_from([b"", b'{"a":1}', b"eyJhbGciOiJSUzI1NiJ9.e30.AAAA"])
        | st.binary(max_size=80)
        | chunked_body()
    )
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]))
    return eol.join([line, *fields]) + eol + eol + body


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(
        tmp_path_factory.mktemp("fuzz"),
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        idle_timeout=1.0,
    ) as running:
        yield running
        running.assert_no_internal_errors()


CLOSE_WITHIN = HEADER_TIMEOUT + BODY_TIMEOUT + 4.0  # the deadlines, the sweep and a loaded machine
SENTINEL = b"GET /accessapi/balance HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def test_raw_requests_over_mtls_are_answered_below_500_or_closed_cleanly(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=GATEWAY_EXAMPLES)
    @given(requests=st.lists(raw_request(), min_size=1, max_size=2))
    def probe(requests: list[bytes]) -> None:
        answers: list[int] = []

        class Parser:
            def on_message_complete(self) -> None:
                answers.append(parser.get_status_code())

        parser = httptools.HttpResponseParser(Parser())
        received, head = b"", any(b"HEAD" in r.upper() for r in requests)
        with RawClient(world) as client:
            started = time.monotonic()
            with contextlib.suppress(ssl.SSLError, OSError):  # closed while we wrote: a refusal
                client.send(b"".join(requests) + SENTINEL)  # the sentinel ends whatever is left open
            client.tls.settimeout(CLOSE_WITHIN)
            while True:
                try:
                    data = client.tls.recv(65536)
                except (ssl.SSLError, ConnectionError):
                    break  # reset after a refusal: closed, not hung
                except TimeoutError:
                    raise AssertionError(
                        f"the connection was neither answered nor closed: {requests!r}"
                    ) from None
                if not data:
                    break
                received += data
                if not head:  # an answer to HEAD has no body: only the client knows where it ends
                    parser.feed_data(data)  # raises if an answer is not HTTP
            assert time.monotonic() - started < CLOSE_WITHIN + 1
        if head:
            answers[:] = [int(m) for m in re.findall(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ", received)]
        for status in answers:
            statuses[status] = statuses.get(status, 0) + 1
        assert all(status < 500 for status in answers), (requests, answers)

    probe()
    print(f"\nraw requests: {GATEWAY_EXAMPLES} examples, answers by status {dict(sorted(statuses.items()))}")
    assert set(statuses) - {200}, statuses  # refusals were reached, not only the sentinel
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [f"{r.name}: {r.getMessage()[:200]}" for r in problems]
    assert "tf_secret_in_a_header" not in caplog.text
