"""The gateway's pipeline steps one by one, over a snapshot built in memory with real
certificates and real RS256 signatures — no listener, no socket: identify → route →
authorise → read → verify, and what is forwarded. The same steps serve every way a request
can arrive (direct TLS today, a TLS edge's certificate header tomorrow), so they take the
connection's facts as a plain value."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from twofold.crypto import certs, jws, keys
from twofold.gateway import pipeline
from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.pipeline import GatewayError, Outcome
from twofold.gateway.sandbox import Forwarded
from twofold.gateway.snapshot import ClientCert, EnvView, Product, Snapshot

MAX = 64 * 1024
NOW = dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Kit:
    snapshot: Snapshot
    der: bytes
    fingerprint: str
    sign_key: keys.PrivateKey
    expired_der: bytes


def _product(pid: str, prefix: str, signature: str, types: tuple[str, ...]) -> Product:
    return Product(pid, pid.title(), prefix, "http://127.0.0.1:9", signature, frozenset(types), ("RS256",))


@pytest.fixture(scope="module")
def kit() -> Kit:
    mtls_key = keys.generate_private_key("ec", curve="P-256")
    mtls = certs.self_signed_certificate(mtls_key, "/O=Acme/CN=acme-cat")
    old = certs.self_signed_certificate(mtls_key, "/O=Acme/CN=acme-old")
    der, old_der = certs.certificate_der(mtls), certs.certificate_der(old)
    fp, old_fp = certs.fingerprint_sha256(der), certs.fingerprint_sha256(old_der)
    sign_key = keys.generate_private_key("rsa", bits=2048)
    sign = certs.self_signed_certificate(sign_key, "/O=Acme/CN=acme-sign", usage="signature")
    client = ClientCert(
        fp, 1, "acme", "acme-cat", NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30), der
    )
    expired = ClientCert(
        old_fp, 1, "acme", "acme-old", NOW - dt.timedelta(days=30), NOW - dt.timedelta(seconds=1), old_der
    )
    products = (
        _product("payments", "/tsapi/v1/payments", "required", ("application/jose", "text/xml")),
        _product("echo", "/echo", "optional", ("application/json", "application/jose", "text/xml")),
        _product("balance", "/accessapi/balance", "none", ("application/json",)),
        _product("ledger", "/ledger", "none", ("application/json",)),
    )
    snapshot = Snapshot(
        version=7,
        environments={
            "cat": EnvView("cat", "Client Testing", True, None, ()),
            "prod": EnvView("prod", "Production", False, None, ()),
        },
        mtls={"cat": {fp: client, old_fp: expired}, "prod": {}},
        signature_keys={(1, "cat"): (jws.VerificationKey.from_certificate(sign, label="sign-fp"),)},
        access={(1, "cat"): frozenset({"payments", "echo", "balance"}), (1, "prod"): frozenset({"balance"})},
        products=tuple(sorted(products, key=lambda p: len(p.prefix), reverse=True)),
    )
    return Kit(snapshot, der, fp, sign_key, old_der)


def facts(kit: Kit, env: str = "cat", der: bytes | None = None, *, none: bool = False) -> ConnectionFacts:
    return ConnectionFacts.of(env, "192.0.2.7", None if none else (der or kit.der))


def head(
    method: str = "GET", target: str = "/accessapi/balance", headers: list[tuple[str, str]] | None = None
) -> RequestHead:
    path, _, query = target.partition("?")
    return RequestHead.parse_target(method, path, query, headers or [])


@contextlib.contextmanager
def refused(code: str, status: int) -> Iterator[pytest.ExceptionInfo[GatewayError]]:
    with pytest.raises(GatewayError) as caught:
        yield caught
    assert (caught.value.code, caught.value.status) == (code, status), caught.value.message


# --- the facts -----------------------------------------------------------------------------------


def test_connection_facts_fingerprint_the_certificate_they_carry(kit: Kit) -> None:
    made = ConnectionFacts.of("cat", "192.0.2.7", kit.der)
    assert made.fingerprint == kit.fingerprint
    assert made.via == "tls"
    assert ConnectionFacts.of("cat", "192.0.2.7", b"").fingerprint is None  # nothing presented
    edge = ConnectionFacts.of("cat", "10.0.0.5", kit.der, via="nginx")
    assert (edge.via, edge.fingerprint) == ("nginx", kit.fingerprint)


def test_a_request_head_knows_its_framing_and_media_type() -> None:
    parsed = RequestHead.parse_target(
        "POST",
        "/echo/a%20b",
        "x=1",
        [("content-type", "Application/JOSE; charset=utf-8"), ("Content-Length", "12")],
    )
    assert (parsed.path, parsed.raw_path, parsed.query) == ("/echo/a b", "/echo/a%20b", "x=1")
    assert parsed.media_type == "application/jose"
    assert (parsed.content_length, parsed.chunked, parsed.has_body) == (12, False, True)
    assert parsed.header("CONTENT-TYPE") == "Application/JOSE; charset=utf-8"
    chunked = RequestHead.parse_target("POST", "/x", "", [("Transfer-Encoding", "chunked")])
    assert (chunked.content_length, chunked.chunked, chunked.has_body) == (None, True, True)
    assert not RequestHead.parse_target("GET", "/x", "", [("Content-Length", "0")]).has_body


# --- identify ------------------------------------------------------------------------------------


def test_identify_finds_the_organisation_of_the_certificate(kit: Kit) -> None:
    client = pipeline.identify(kit.snapshot, facts(kit))
    assert (client.org, client.fingerprint) == ("acme", kit.fingerprint)


def test_identify_refuses_no_certificate(kit: Kit) -> None:
    with refused("client_certificate_required", 401):
        pipeline.identify(kit.snapshot, facts(kit, none=True))


def test_identify_refuses_an_unregistered_certificate_and_says_where_it_is_registered(kit: Kit) -> None:
    with refused("certificate_not_registered", 401) as caught:
        pipeline.identify(kit.snapshot, facts(kit, env="prod"))
    assert "registered for cat" in caught.value.message
    stranger = certs.certificate_der(
        certs.self_signed_certificate(keys.generate_private_key("ec"), "/CN=stranger")
    )
    with refused("certificate_not_registered", 401) as caught:
        pipeline.identify(kit.snapshot, facts(kit, der=stranger))
    assert "Security page" in caught.value.message


def test_identify_refuses_expired_and_not_yet_valid_certificates(kit: Kit) -> None:
    with refused("certificate_expired", 401):
        pipeline.identify(kit.snapshot, facts(kit, der=kit.expired_der))
    with refused("certificate_not_yet_valid", 401):
        pipeline.identify(kit.snapshot, facts(kit), now=NOW - dt.timedelta(days=2))


# --- route ---------------------------------------------------------------------------------------


def test_route_takes_the_longest_prefix_by_whole_segments_in_any_case(kit: Kit) -> None:
    assert pipeline.route(kit.snapshot, head(target="/tsapi/v1/payments/status"), "cat").id == "payments"
    assert pipeline.route(kit.snapshot, head(target="/ECHO/x"), "cat").id == "echo"
    with refused("no_such_api", 404):
        pipeline.route(kit.snapshot, head(target="/echoes"), "cat")


@pytest.mark.parametrize(
    "target",
    [
        "/echo/../ledger",
        "/echo/%2e%2e/ledger",
        "/echo//x",
        "/echo;x",
        "/echo%2fx",
        "/echo%5Cx",
        "/echo\\x",
        "*",
    ],
)
def test_route_refuses_paths_that_are_not_in_normal_form(kit: Kit, target: str) -> None:
    with refused("path_invalid", 400):
        pipeline.route(kit.snapshot, head(target=target), "cat")


# --- authorise -----------------------------------------------------------------------------------


def test_authorise_needs_the_product_in_a_project_of_that_environment(kit: Kit) -> None:
    client = pipeline.identify(kit.snapshot, facts(kit))
    pipeline.authorise(kit.snapshot, client, kit.snapshot.products[-1], "cat")  # /echo: in the project
    ledger = next(p for p in kit.snapshot.products if p.id == "ledger")
    with refused("product_not_in_project", 403) as caught:
        pipeline.authorise(kit.snapshot, client, ledger, "cat")
    assert "acme" in caught.value.message
    assert "ledger" in caught.value.message


# --- read ----------------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_the_body(kit: Kit) -> None:
    outcome = Outcome()
    too_long = head("POST", "/echo", [("Content-Length", str(2**63))])
    with refused("body_too_large", 413):
        pipeline.admit(kit.snapshot, facts(kit), too_long, MAX, outcome)
    assert (outcome.org, outcome.product) == ("acme", "echo")  # what the access log will say
    pipeline.admit(
        kit.snapshot, facts(kit), head("POST", "/echo", [("Content-Length", str(MAX))]), MAX, outcome
    )


def test_a_body_over_the_limit_is_refused_once_read(kit: Kit) -> None:
    chunked = head("POST", "/echo", [("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")])
    admitted = pipeline.admit(kit.snapshot, facts(kit), chunked, MAX, Outcome())
    with refused("body_too_large", 413):
        pipeline.prepare(facts(kit), admitted, chunked, b"[" + b" " * MAX + b"]", MAX, Outcome())


# --- verify --------------------------------------------------------------------------------------


def _prepare(
    kit: Kit, target: str, body: bytes, content_type: str, method: str = "POST"
) -> tuple[Forwarded, Outcome]:
    outcome = Outcome()
    request = head(method, target, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    admitted = pipeline.admit(kit.snapshot, facts(kit), request, MAX, outcome)
    return pipeline.prepare(facts(kit), admitted, request, body, MAX, outcome), outcome


def test_verify_forwards_the_verified_payload_as_json(kit: Kit) -> None:
    payload = b'{"payments": {"amount": "1.00"}}'
    token = jws.sign(payload, kit.sign_key).encode()
    for content_type in ("application/jose", "text/xml", "Application/JOSE; charset=utf-8"):
        forwarded, outcome = _prepare(kit, "/tsapi/v1/payments", token, content_type)
        assert forwarded.body == payload
        assert forwarded.headers["Content-Type"] == "application/json"
        assert outcome.signature_fingerprint == "sign-fp"


@pytest.mark.parametrize(
    ("target", "body", "content_type", "code", "status"),
    [
        ("/tsapi/v1/payments", b'{"a": 1}', "application/json", "signature_required", 415),
        ("/tsapi/v1/payments", b"", "application/jose", "signature_required", 400),
        ("/accessapi/balance", b"a=1", "text/plain", "content_type_not_accepted", 415),
        ("/tsapi/v1/payments", b"not.a.jws!", "application/jose", "jws_malformed", 400),
    ],
)
def test_verify_refuses_what_the_product_does_not_accept(
    kit: Kit, target: str, body: bytes, content_type: str, code: str, status: int
) -> None:
    with refused(code, status):
        _prepare(kit, target, body, content_type)


def test_verify_refuses_another_key_and_a_payload_that_is_not_json(kit: Kit) -> None:
    other = keys.generate_private_key("rsa", bits=2048)
    with refused("jws_signature_invalid", 401) as caught:
        _prepare(kit, "/tsapi/v1/payments", jws.sign(b"{}", other).encode(), "application/jose")
    assert "organisation acme" in caught.value.message
    for payload in (b"amount=1", b'{"a": NaN}', b'{"a": "\xff"}', b"[" * 5000 + b"]" * 5000):
        with refused("payload_not_json", 400):
            _prepare(kit, "/tsapi/v1/payments", jws.sign(payload, kit.sign_key).encode(), "application/jose")


def test_an_optional_signature_is_verified_only_when_the_body_is_a_jws(kit: Kit) -> None:
    forwarded, outcome = _prepare(kit, "/echo", b'{"a": 1}', "application/json")
    assert forwarded.body == b'{"a": 1}'
    assert outcome.signature_fingerprint is None


# --- what is forwarded ---------------------------------------------------------------------------


def test_the_upstream_gets_the_gateways_identity_headers_and_none_of_the_clients(kit: Kit) -> None:
    sent = [
        ("X-Twofold-Organisation", "globex"),
        ("x_twofold_organisation", "globex"),
        ("Client-Cert", ":AAAA:"),
        ("X-Forwarded-Client-Cert", "Hash=00"),
        ("X-Forwarded-For", "10.9.8.7"),
        ("Forwarded", "for=10.9.8.7"),
        ("Connection", "keep-alive, X-Custom"),
        ("Transfer-Encoding", "chunked"),
        ("Expect", "100-continue"),
        ("X-Custom", "kept"),
        ("X-Request-Id", "req-1"),
        ("Content-Type", "application/json"),
    ]
    request = head("POST", "/echo?x=1", sent)
    outcome = Outcome()
    admitted = pipeline.admit(kit.snapshot, facts(kit), request, MAX, outcome)
    forwarded = pipeline.prepare(facts(kit), admitted, request, json.dumps({"a": 1}).encode(), MAX, outcome)
    assert forwarded.headers == {
        "X-Custom": "kept",
        "X-Forwarded-For": "192.0.2.7",
        "X-Forwarded-Proto": "https",
        "X-Request-Id": "req-1",
        "Content-Type": "application/json",
        "X-Twofold-Organisation": "acme",
        "X-Twofold-Environment": "cat",
        "X-Twofold-Client-Cert-Sha256": kit.fingerprint,
    }
    assert (forwarded.raw_path, forwarded.query_string, forwarded.org) == ("/echo", "x=1", "acme")


def test_a_request_id_that_is_not_sane_is_replaced(kit: Kit) -> None:
    client = pipeline.identify(kit.snapshot, facts(kit))
    for sent in ("x" * 129, "a\x7fb", ""):
        headers = pipeline.upstream_headers(
            head(headers=[("X-Request-Id", sent)]), facts(kit), client, None, ""
        )
        assert headers["X-Request-Id"] != sent
        assert headers["X-Request-Id"].isprintable()


# --- read: content codings -----------------------------------------------------------------------


def _coded(coding: str) -> RequestHead:
    return head("POST", "/echo", [("Content-Encoding", coding), ("Content-Type", "application/json")])


def test_read_undoes_gzip_and_deflate_within_the_limit() -> None:
    raw = json.dumps({"a": "b" * 100}).encode()
    squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = squeezer.compress(raw) + squeezer.flush()
    for coding, data in (
        ("gzip", gzip.compress(raw)),
        ("x-gzip", gzip.compress(raw)),
        ("deflate", zlib.compress(raw)),
        ("Deflate", raw_deflate),  # raw deflate, as some clients send it
        ("identity", raw),
        ("gzip, gzip", gzip.compress(gzip.compress(raw))),
    ):
        assert pipeline.read(_coded(coding), data, MAX) == raw, coding


def test_read_refuses_bombs_unknown_codings_and_broken_data() -> None:
    with refused("body_too_large", 413):
        pipeline.read(_coded("gzip"), gzip.compress(b" " * (MAX * 20)), MAX)
    with refused("content_encoding_not_supported", 415):
        pipeline.read(_coded("br"), b"\x0b\x02\x80{}\x03", MAX)
    with refused("content_encoding_invalid", 400):
        pipeline.read(_coded("gzip"), gzip.compress(b'{"a": 1}')[:-6], MAX)  # truncated
    with refused("content_encoding_invalid", 400):
        pipeline.read(_coded("deflate"), b"not deflate at all", MAX)
