"""The gateway end to end, with real clients on loopback and nothing mocked: `twofold serve`
(portal + one TLS gateway per environment + admin) seeded with three organisations —
acme and globex (mTLS and RS256 signature certificates, a project with balance, payments
and echo), initech (mTLS only) — and called the way bank documentation tells clients to:
curl, `requests`, PyJWT-signed bodies, `twofold call`.

Tests are user stories. They share one server per module (and one on PostgreSQL);
each test leaves the registry as it found it, or only adds what it alone uses.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
import requests

from conftest import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    _in_thread,
    own_postgres_database,
    require_binary,
)
from gatewaykit import (
    MAX_BODY,
    PROPAGATION,
    UPSTREAM_TIMEOUT,
    Pair,
    World,
    assert_refusal,
    ec_pair,
    payment,
    running_world,
    save_pair,
    tls_outcome,
    token_parts,
    wait_until,
)
from twofold.crypto import jws

TWOFOLD = str(Path(sys.executable).with_name("twofold"))
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("gateway-e2e")) as running:
        yield running
        running.assert_no_internal_errors()


def signed(world: World, org: str, body: dict[str, Any] | bytes, **headers: Any) -> str:
    sign = world.orgs[org].sign
    assert sign is not None
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return jws.sign(data, sign.key, **headers)


def curl(world: World, *args: object, url: str) -> tuple[int, str, subprocess.CompletedProcess[str]]:
    """curl as a bank's documentation shows it, plus --silent --show-error and the status
    code on a last line. Returns (status, body, the completed process)."""
    binary = require_binary("curl")
    done = subprocess.run(
        [binary, "--silent", "--show-error", "--write-out", "\n%{http_code}", *map(str, args), url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body, done


def assert_curl_refused_by_tls(world: World, args: list[object], url: str) -> None:
    """curl got no HTTP answer at all: the TLS layer refused it."""
    status, body, done = curl(world, *args, url=url)
    assert done.returncode != 0, (status, body)
    assert status == 0, (status, body)


def mtls_args(world: World, pair: Pair) -> list[object]:
    return ["--cert", pair.cert_path, "--key", pair.key_path, "--cacert", world.ca_path]


def twofold_jws_sign(pair: Pair, payload_file: Path) -> str:
    done = subprocess.run(
        [TWOFOLD, "jws", "sign", "--key", str(pair.key_path), str(payload_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.count(".") == 2, token
    return token


# --- the happy path, exactly as a bank's docs show it --------------------------------------


def test_a_developer_curls_the_balance_api_over_mtls_exactly_as_the_docs_show(world: World) -> None:
    acme = world.orgs["acme"]
    status, body, done = curl(
        world,
        *mtls_args(world, acme.mtls),
        "--header",
        "Content-Type: application/json",
        url=world.url("/accessapi/balance"),
    )
    assert status == 200, (body, done.stderr)
    balance = json.loads(body)
    assert balance["organisation"] == "acme"
    assert balance["environment"] == "cat"
    assert balance["accountBalances"][0]["accountId"].startswith("ACME-")


def test_a_developer_curls_a_payment_signed_with_twofold_jws_sign_and_gets_202(
    world: World, tmp_path: Path
) -> None:
    acme = world.orgs["acme"]
    assert acme.sign is not None
    request = payment()
    e2e = request["payments"]["paymentIdentifiers"]["endToEndId"]
    (tmp_path / "payment.json").write_text(json.dumps(request, indent=2))
    token = twofold_jws_sign(acme.sign, tmp_path / "payment.json")
    status, body, done = curl(
        world,
        *mtls_args(world, acme.mtls),
        "--header",
        "Content-Type: application/jose",
        "--data",
        token,
        url=world.url("/tsapi/v1/payments"),
    )
    assert status == 202, (body, done.stderr)
    answer = json.loads(body)["paymentInitiationResponse"]
    assert answer["endToEndId"] == e2e
    assert UUID.match(answer["firmRootId"]), answer

    # ... and then asks for its status, with the same mTLS credentials and no signature.
    status, body, _ = curl(
        world,
        *mtls_args(world, acme.mtls),
        "--header",
        "Content-Type: application/json",
        url=world.url(f"/tsapi/v1/payments/status?endToEndId={e2e}"),
    )
    assert status == 200, body
    stored = json.loads(body)["paymentStatus"]
    assert stored["endToEndId"] == e2e
    assert stored["firmRootId"] == answer["firmRootId"]
    assert stored["status"] == "PENDING"
    assert stored["createdAt"]


def test_a_legacy_client_sends_the_jws_as_text_xml_and_gets_202(world: World, tmp_path: Path) -> None:
    acme = world.orgs["acme"]
    assert acme.sign is not None
    request = payment()
    (tmp_path / "payment.json").write_text(json.dumps(request))
    token = twofold_jws_sign(acme.sign, tmp_path / "payment.json")
    status, body, done = curl(
        world,
        *mtls_args(world, acme.mtls),
        "--header",
        "Content-Type: text/xml",
        "--data",
        token,
        url=world.url("/tsapi/v1/payments"),
    )
    assert status == 202, (body, done.stderr)
    answer = json.loads(body)["paymentInitiationResponse"]
    assert answer["endToEndId"] == request["payments"]["paymentIdentifiers"]["endToEndId"]
    assert UUID.match(answer["firmRootId"])


def test_bank_sample_code_with_requests_and_a_cert_tuple_works(world: World) -> None:
    acme = world.orgs["acme"]
    cert = (str(acme.mtls.cert_path), str(acme.mtls.key_path))
    balance = requests.get(world.url("/accessapi/balance"), cert=cert, verify=str(world.ca_path), timeout=15)
    assert balance.status_code == 200, balance.text
    assert balance.json()["organisation"] == "acme"
    request = payment()
    response = requests.post(
        world.url("/tsapi/v1/payments"),
        cert=cert,
        verify=str(world.ca_path),
        data=signed(world, "acme", request),
        headers={"Content-Type": "application/jose"},
        timeout=15,
    )
    assert response.status_code == 202, response.text
    assert (
        response.json()["paymentInitiationResponse"]["endToEndId"]
        == request["payments"]["paymentIdentifiers"]["endToEndId"]
    )


def test_a_body_signed_by_pyjwt_is_accepted(world: World) -> None:
    acme = world.orgs["acme"]
    assert acme.sign is not None
    request = payment()
    token = jwt.encode(request, acme.sign.key, "RS256")  # header {"alg": "RS256", "typ": "JWT"}
    assert jwt.get_unverified_header(token)["typ"] == "JWT"
    with world.client(acme.mtls) as client:
        response = client.post(
            "/tsapi/v1/payments", content=token, headers={"Content-Type": "application/jose"}
        )
        assert response.status_code == 202, response.text
        assert (
            response.json()["paymentInitiationResponse"]["endToEndId"]
            == request["payments"]["paymentIdentifiers"]["endToEndId"]
        )
        # What the upstream received is the payload PyJWT signed, byte for byte.
        echoed = client.post("/echo/pyjwt", content=token, headers={"Content-Type": "application/jose"})
        assert echoed.status_code == 200, echoed.text
        assert echoed.json()["body"] == request


def test_twofold_call_signs_with_sign_key_and_exits_0(world: World, tmp_path: Path) -> None:
    acme = world.orgs["acme"]
    assert acme.sign is not None
    request = payment()
    (tmp_path / "payment.json").write_text(json.dumps(request))
    done = subprocess.run(
        [
            TWOFOLD,
            "call",
            world.url("/tsapi/v1/payments"),
            "-d",
            f"@{tmp_path / 'payment.json'}",
            "--cert",
            str(acme.mtls.cert_path),
            "--key",
            str(acme.mtls.key_path),
            "--sign-key",
            str(acme.sign.key_path),
            "--cacert",
            str(world.ca_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["paymentInitiationResponse"]
    assert answer["endToEndId"] == request["payments"]["paymentIdentifiers"]["endToEndId"]


def test_twofold_call_exits_4_with_the_error_code_when_the_gateway_refuses(
    world: World, tmp_path: Path
) -> None:
    acme, globex = world.orgs["acme"], world.orgs["globex"]
    assert globex.sign is not None
    (tmp_path / "payment.json").write_text(json.dumps(payment()))
    done = subprocess.run(
        [
            TWOFOLD,
            "call",
            world.url("/tsapi/v1/payments"),
            "-d",
            f"@{tmp_path / 'payment.json'}",
            "--cert",
            str(acme.mtls.cert_path),
            "--key",
            str(acme.mtls.key_path),
            "--sign-key",
            str(globex.sign.key_path),  # acme's mTLS, globex's signature key
            "--cacert",
            str(world.ca_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert "jws_signature_invalid" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_query_strings_reach_the_api_exactly_as_the_client_encoded_them(world: World) -> None:
    """An endToEndId with '+', '&' and '=' is found again by its status query (the query
    is forwarded as sent, not decoded and re-joined)."""
    acme = world.orgs["acme"]
    e2e = f"E2E+{uuid.uuid4().hex[:8]}&x=1 %"
    with world.client(acme.mtls) as client:
        created = client.post(
            "/tsapi/v1/payments",
            content=signed(world, "acme", payment(e2e)),
            headers={"Content-Type": "application/jose"},
        )
        assert created.status_code == 202, created.text
        status = client.get("/tsapi/v1/payments/status", params={"endToEndId": e2e})
        assert status.status_code == 200, status.text
        assert status.json()["paymentStatus"]["endToEndId"] == e2e
        mark = world.upstream.count()
        relayed = client.get("/plain/q", params={"a": "1&b=2", "c": "x+y/z", "p": "%41 ü"})
        assert relayed.status_code == 200, relayed.text
    [seen] = world.upstream.since(mark)
    assert seen.path == "/plain/q"
    # the same parameters the client sent (an encoded '/' may arrive decoded: same meaning)
    assert parse_qs(seen.query, keep_blank_values=True, strict_parsing=True) == {
        "a": ["1&b=2"],
        "c": ["x+y/z"],
        "p": ["%41 ü"],
    }, seen.query


def test_an_encoded_question_mark_or_hash_in_the_path_stays_in_the_path(world: World) -> None:
    acme = world.orgs["acme"]
    mark = world.upstream.count()
    status, body, done = curl(
        world, *mtls_args(world, acme.mtls), url=world.url("/plain/a%3Fadmin=1%23frag?real=2")
    )
    assert status == 200, (body, done.stderr)
    [seen] = world.upstream.since(mark)
    assert seen.path == "/plain/a?admin=1#frag"
    assert seen.query == "real=2"


# --- what the upstream receives ---------------------------------------------------------------


def test_the_upstream_receives_the_verified_json_payload_not_the_jws(world: World) -> None:
    acme = world.orgs["acme"]
    assert acme.sign is not None
    marker = token_parts()
    raw = f'{{"note": "{marker}",\n  "amount": 1}}'.encode()  # exact bytes, not re-serialised
    token = jws.sign(raw, acme.sign.key)
    with world.client(acme.mtls) as client:
        echoed = client.post("/echo/inspect?x=1", content=token, headers={"Content-Type": "application/jose"})
        assert echoed.status_code == 200, echoed.text
        seen = echoed.json()
        assert seen["method"] == "POST"
        assert seen["path"] == "/echo/inspect"
        assert seen["query"] == "x=1"
        assert seen["body"] == {"note": marker, "amount": 1}
        headers = seen["headers"]
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Twofold-Organisation"] == "acme"
        assert headers["X-Twofold-Client-Cert-Sha256"] == acme.mtls.fingerprint
        assert headers["X-Twofold-Signature-Cert-Sha256"] == acme.sign.fingerprint

        # The same through a real HTTP upstream: the body is exactly the signed bytes.
        mark = world.upstream.count()
        relayed = client.post("/relay/x", content=token, headers={"Content-Type": "application/jose"})
        assert relayed.status_code == 200, relayed.text
    [received] = world.upstream.since(mark)
    assert received.body == raw
    assert token.encode() not in received.body
    assert received.header("Content-Type") == ["application/json"]
    assert received.header("X-Twofold-Organisation") == ["acme"]
    assert received.header("X-Twofold-Client-Cert-Sha256") == [acme.mtls.fingerprint]
    assert received.header("X-Twofold-Signature-Cert-Sha256") == [acme.sign.fingerprint]


def test_identity_headers_sent_by_the_client_are_replaced(world: World) -> None:
    acme, globex = world.orgs["acme"], world.orgs["globex"]
    assert acme.sign is not None
    assert globex.sign is not None
    forged = {
        "X-Twofold-Organisation": "globex",
        "x-twofold-client-cert-sha256": globex.mtls.fingerprint,
        "X-TWOFOLD-SIGNATURE-CERT-SHA256": globex.sign.fingerprint,
        "X-Twofold-Environment": "prod",
    }
    with world.client(acme.mtls) as client:
        # Signed: every identity header is the gateway's own.
        echoed = client.post(
            "/echo",
            content=signed(world, "acme", {"a": 1}),
            headers={"Content-Type": "application/jose", **forged},
        )
        assert echoed.status_code == 200, echoed.text
        headers = echoed.json()["headers"]
        lowered = [k.lower() for k in headers]
        assert lowered.count("x-twofold-organisation") == 1
        assert headers["X-Twofold-Organisation"] == "acme"
        assert headers["X-Twofold-Client-Cert-Sha256"] == acme.mtls.fingerprint
        assert headers["X-Twofold-Signature-Cert-Sha256"] == acme.sign.fingerprint
        assert headers["X-Twofold-Environment"] == "cat"
        assert globex.mtls.fingerprint not in json.dumps(headers)

        # Unsigned: the forged signature header is stripped and not replaced by anything.
        mark = world.upstream.count()
        relayed = client.post("/relay", json={"a": 1}, headers=forged)
        assert relayed.status_code == 200, relayed.text
    [received] = world.upstream.since(mark)
    assert received.header("X-Twofold-Organisation") == ["acme"]
    assert received.header("X-Twofold-Client-Cert-Sha256") == [acme.mtls.fingerprint]
    assert received.header("X-Twofold-Signature-Cert-Sha256") == []
    assert received.header("X-Twofold-Environment") == ["cat"]


def test_headers_an_upstream_may_trust_are_the_gateways_own(world: World) -> None:
    """CGI-style upstreams read `X_Twofold_Organisation` as `X-Twofold-Organisation`, and proxy
    headers such as `Client-Cert` or `X-Forwarded-For` name identities: none of them may come
    from the client."""
    acme = world.orgs["acme"]
    forged = {
        "X_Twofold_Organisation": "globex",
        "Client-Cert": ":bm90LW1pbmU=:",
        "X-Forwarded-Client-Cert": "Hash=00",
        "X-SSL-Client-Cert": "forged",
        "X-Forwarded-For": "10.9.8.7",
        "Forwarded": "for=10.9.8.7",
        "X-Custom": "kept",
    }
    mark = world.upstream.count()
    with world.client(acme.mtls) as client:
        assert client.post("/relay", json={"a": 1}, headers=forged).status_code == 200
    [received] = world.upstream.since(mark)
    names = {k.lower() for k, _ in received.headers}
    assert not any("_" in name for name in names)
    assert not names & {"client-cert", "x-forwarded-client-cert", "x-ssl-client-cert", "forwarded"}
    assert received.header("X-Forwarded-For") == ["127.0.0.1"]
    assert received.header("X-Custom") == ["kept"]
    assert received.header("X-Twofold-Organisation") == ["acme"]


def test_a_product_path_matches_whatever_its_case(world: World) -> None:
    """`/RECORDED` is the signature-required product, not a path no product serves (an upstream
    that ignores case would otherwise get it unsigned from a catch-all)."""
    mark = world.upstream.count()
    with world.client(world.orgs["acme"].mtls) as client:
        response = client.post("/RECORDED/x", json={"a": 1})
    assert response.status_code in (400, 415), response.text
    assert response.json()["error"]["code"] == "signature_required"
    assert world.upstream.since(mark) == []


# --- refusals: stable codes and statuses --------------------------------------------------


def test_a_certificate_that_was_never_registered_fails_the_tls_handshake(
    world: World, tmp_path: Path
) -> None:
    stranger = ec_pair(tmp_path, "stranger", "stranger-cat")
    assert_curl_refused_by_tls(world, mtls_args(world, stranger), world.url("/accessapi/balance"))
    assert tls_outcome(world.port(), stranger, world.ca_path)[0] == "refused"
    assert tls_outcome(world.port(), stranger, world.ca_path, sni=None)[0] == "refused"


def test_a_certificate_registered_in_prod_is_refused_on_cat(world: World) -> None:
    prod = world.extra["acme_prod"]
    # Issued by a CA that both environments trust, so TLS lets it through on cat …
    with world.client(prod, env="cat") as client:
        error = assert_refusal(client.get("/accessapi/balance"), 401, "certificate_not_registered")
    assert "cat" in error["message"]
    assert "prod" in error["message"]
    # … while on prod the gateway knows acme by it (and acme has no prod project yet).
    with world.client(prod, env="prod") as client:
        error = assert_refusal(client.get("/accessapi/balance"), 403, "product_not_in_project")
    assert "acme" in error["message"]


def test_a_ca_issued_certificate_that_is_not_registered_is_refused(world: World, tmp_path: Path) -> None:
    issued = world.issuing_ca.issue("unregistered-cat", usage="client")
    pair = save_pair(tmp_path, "issued", issued.key, issued.certificate)
    with world.client(pair) as client:
        error = assert_refusal(client.get("/accessapi/balance"), 401, "certificate_not_registered")
    assert "register" in error["message"]


def test_a_call_without_a_client_certificate_fails_the_handshake(world: World) -> None:
    assert_curl_refused_by_tls(world, ["--cacert", world.ca_path], world.url("/accessapi/balance"))
    assert tls_outcome(world.port(), None, world.ca_path)[0] == "refused"
    with world.client(None) as client, pytest.raises(httpx.TransportError):
        client.get("/accessapi/balance")


def test_a_product_that_is_not_in_the_organisations_project_is_403(world: World) -> None:
    globex = world.orgs["globex"]
    with world.client(globex.mtls) as client:
        error = assert_refusal(client.get("/ledger"), 403, "product_not_in_project")
        assert "globex" in error["message"]
        assert "ledger" in error["message"]
        assert_refusal(client.get("/plain/x"), 403, "product_not_in_project")  # acme's, not globex's


def test_an_unknown_path_is_404(world: World) -> None:
    with world.client(world.orgs["acme"].mtls) as client:
        error = assert_refusal(client.get("/no/such/api"), 404, "no_such_api")
        assert "/no/such/api" in error["message"]
        assert_refusal(client.get("/"), 404, "no_such_api")
        assert_refusal(client.get("/echoes"), 404, "no_such_api")  # a prefix matches whole segments


def test_a_wrong_content_type_is_415(world: World) -> None:
    with world.client(world.orgs["acme"].mtls) as client:
        error = assert_refusal(
            client.post("/accessapi/balance", content=b"a=1", headers={"Content-Type": "text/plain"}),
            415,
            "content_type_not_accepted",
        )
        assert "application/json" in error["message"]
        assert_refusal(
            client.post(
                "/accessapi/balance",
                content=b"a=1&b=2",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ),
            415,
            "content_type_not_accepted",
        )


def test_unsigned_json_to_the_payments_api_is_refused_signature_required(world: World) -> None:
    request = payment()
    e2e = request["payments"]["paymentIdentifiers"]["endToEndId"]
    with world.client(world.orgs["acme"].mtls) as client:
        error = assert_refusal(client.post("/tsapi/v1/payments", json=request), 415, "signature_required")
        assert "application/jose" in error["message"]
        assert_refusal(
            client.get("/tsapi/v1/payments/status", params={"endToEndId": e2e}), 404, "payment_not_found"
        )


def test_a_body_signed_with_another_organisations_key_is_401(world: World) -> None:
    request = payment()
    with world.client(world.orgs["acme"].mtls) as client:
        error = assert_refusal(
            client.post(
                "/tsapi/v1/payments",
                content=signed(world, "globex", request),
                headers={"Content-Type": "application/jose"},
            ),
            401,
            "jws_signature_invalid",
        )
    assert "acme" in error["message"]
    # The key is registered nowhere in acme: the message says where to register it.
    assert "belongs to none of them" in error["message"]
    assert "Security page" in error["message"]


def test_a_body_changed_after_signing_is_401_saying_a_registered_key_signed_other_bytes(world: World) -> None:
    header, _payload, signature = signed(world, "acme", payment()).split(".")
    changed = base64.urlsafe_b64encode(json.dumps(payment()).encode()).rstrip(b"=").decode()
    with world.client(world.orgs["acme"].mtls) as client:
        error = assert_refusal(
            client.post(
                "/tsapi/v1/payments",
                content=f"{header}.{changed}.{signature}",
                headers={"Content-Type": "application/jose"},
            ),
            401,
            "jws_signature_invalid",
        )
    assert "a registered key signed it, but not these bytes" in error["message"]
    assert "Security page" not in error["message"]


def test_an_organisation_without_a_signature_certificate_is_401_no_signature_certificate(
    world: World,
) -> None:
    initech = world.orgs["initech"]
    with world.client(initech.mtls) as client:
        error = assert_refusal(
            client.post(
                "/tsapi/v1/payments",
                content=signed(world, "acme", payment()),
                headers={"Content-Type": "application/jose"},
            ),
            401,
            "no_signature_certificate",
        )
        assert "initech" in error["message"]
        # unsigned calls still work for it
        assert client.get("/accessapi/balance").status_code == 200


def test_a_body_over_the_limit_is_413(world: World) -> None:
    acme = world.orgs["acme"]
    big = {"pad": "x" * (MAX_BODY + 1024)}
    mark = world.upstream.count()
    with world.client(acme.mtls) as client:
        assert_refusal(client.post("/plain/big", json=big), 413, "body_too_large")
        assert_refusal(
            client.post(
                "/tsapi/v1/payments",
                content=signed(world, "acme", payment(pad="y" * MAX_BODY)),
                headers={"Content-Type": "application/jose"},
            ),
            413,
            {"body_too_large", "jws_too_large"},
        )
        # the same connection, or a new one, still works
        assert client.get("/accessapi/balance").status_code == 200
    assert world.upstream.count() == mark


def test_an_upstream_that_is_down_is_502_upstream_unavailable(world: World) -> None:
    with world.client(world.orgs["acme"].mtls) as client:
        error = assert_refusal(client.get("/down/anything"), 502, "upstream_unavailable")
    assert "Down API" in error["message"]


def test_an_upstream_slower_than_the_timeout_is_504_upstream_timeout(world: World) -> None:
    with world.client(world.orgs["acme"].mtls) as client:
        started = time.monotonic()
        error = assert_refusal(client.get("/slow/report"), 504, "upstream_timeout")
        elapsed = time.monotonic() - started
    assert UPSTREAM_TIMEOUT * 0.9 <= elapsed < UPSTREAM_TIMEOUT + 1.5, elapsed
    assert f"{UPSTREAM_TIMEOUT:g} s" in error["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/plain/../recorded",
        "/plain/%2e%2e/recorded",
        "/plain/..%2frecorded",
        "/plain%2f..%2frecorded",
        "/plain/./../recorded/x",
        "/plain/x/..%2F..%2Frecorded",
        "/echo/../tsapi/v1/payments",
        "/plain//recorded",
        "/plain/recorded;x=1",
        "/plain/..;/recorded",
        "/plain%2frecorded",
        "/plain%5crecorded",
        "/plain\\..\\recorded",
    ],
)
def test_dot_segments_cannot_smuggle_a_request_to_another_product(world: World, path: str) -> None:
    """`/plain/../recorded` must not be authorised as `plain` (no signature) and then
    reach `/recorded` (signature required) on the shared upstream."""
    acme = world.orgs["acme"]
    mark = world.upstream.count()
    status, body, done = curl(
        world,
        *mtls_args(world, acme.mtls),
        "--path-as-is",
        "--header",
        "Content-Type: application/json",
        "--data",
        json.dumps(payment()),
        url=world.url(path),
    )
    assert 400 <= status < 500, (status, body, done.stderr)
    assert json.loads(body)["error"]["code"], body
    assert world.upstream.since(mark) == []


# --- revocation ---------------------------------------------------------------------------


def _connection(response: httpx.Response) -> tuple[Any, ...]:
    stream = response.extensions["network_stream"]
    return stream.get_extra_info("client_addr"), id(stream.get_extra_info("ssl_object"))


def test_a_removed_certificate_is_refused_at_once_even_on_an_open_keepalive_connection(
    world: World, tmp_path: Path
) -> None:
    pair = ec_pair(tmp_path, "revoke", "acme-revoke-cat")
    world.register("acme", "cat", "mtls", pair)
    world.sync()
    with world.client(pair, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as client:
        first = client.get("/echo/before")
        assert first.status_code == 200, first.text
        assert first.json()["headers"]["X-Twofold-Client-Cert-Sha256"] == pair.fingerprint
        connection = _connection(first)

        world.remove("acme", "cat", pair)
        removed_at = time.monotonic()
        statuses = []
        while True:
            response = client.get("/echo/after")
            assert _connection(response) == connection, "the keep-alive connection was not reused"
            statuses.append(response.status_code)
            if response.status_code != 200:
                break
            assert time.monotonic() - removed_at < PROPAGATION, f"still accepted after {PROPAGATION} s"
            time.sleep(0.02)
        elapsed = time.monotonic() - removed_at
        error = assert_refusal(response, 401, "certificate_not_registered")
        assert "cat" in error["message"]
        assert elapsed < PROPAGATION, elapsed
        # and it stays refused on that connection
        again = client.get("/accessapi/balance")
        assert _connection(again) == connection
        assert_refusal(again, 401, "certificate_not_registered")

    # A new connection with the removed certificate fails the TLS handshake — with SNI,
    # and also without it (curl to 127.0.0.1 sends none).
    assert_curl_refused_by_tls(world, mtls_args(world, pair), world.url("/accessapi/balance"))
    assert_curl_refused_by_tls(
        world, mtls_args(world, pair), f"https://127.0.0.1:{world.port()}/accessapi/balance"
    )
    assert tls_outcome(world.port(), pair, world.ca_path, sni=None)[0] == "refused"

    # Registering it again makes it work again, without a restart.
    world.register("acme", "cat", "mtls", pair)
    wait_until(
        lambda: tls_outcome(world.port(), pair, world.ca_path)[0].startswith("HTTP/1.1 200"), PROPAGATION
    )
    status, body, _ = curl(
        world, *mtls_args(world, pair), url=f"https://127.0.0.1:{world.port()}/accessapi/balance"
    )
    assert status == 200, body
    world.remove("acme", "cat", pair)


def test_no_session_tickets_and_a_resumed_tls12_session_does_not_outlive_a_removal(
    world: World, tmp_path: Path
) -> None:
    """Resumption would skip the handshake's certificate check: TLS 1.3 gets no session
    ticket, and a TLS 1.2 session offered again after the removal gets no 200."""
    pair = ec_pair(tmp_path, "resume", "acme-resume-cat")
    world.register("acme", "cat", "mtls", pair)
    world.sync()
    modern = world.client_context(pair)
    modern.minimum_version = ssl.TLSVersion.TLSv1_3
    outcome, ticket_session = tls_outcome(world.port(), pair, world.ca_path, context=modern)
    assert outcome.startswith("HTTP/1.1 200"), outcome
    assert ticket_session is not None
    assert not ticket_session.has_ticket

    context = world.client_context(pair)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    first, session = tls_outcome(world.port(), pair, world.ca_path, context=context)
    assert first.startswith("HTTP/1.1 200"), first
    world.remove("acme", "cat", pair)
    world.sync()
    outcome, _ = tls_outcome(world.port(), pair, world.ca_path, context=context, session=session)
    assert outcome == "refused" or outcome.startswith("HTTP/1.1 401"), outcome


# --- two organisations ----------------------------------------------------------------------


def test_globex_cannot_sign_with_acmes_key(world: World) -> None:
    with world.client(world.orgs["globex"].mtls) as client:
        error = assert_refusal(
            client.post(
                "/tsapi/v1/payments",
                content=signed(world, "acme", payment()),
                headers={"Content-Type": "application/jose"},
            ),
            401,
            "jws_signature_invalid",
        )
    assert "globex" in error["message"]


def test_globex_cannot_see_acmes_payments(world: World) -> None:
    request = payment()
    e2e = request["payments"]["paymentIdentifiers"]["endToEndId"]
    with world.client(world.orgs["acme"].mtls) as acme:
        created = acme.post(
            "/tsapi/v1/payments",
            content=signed(world, "acme", request),
            headers={"Content-Type": "application/jose"},
        )
        assert created.status_code == 202, created.text
        assert acme.get("/tsapi/v1/payments/status", params={"endToEndId": e2e}).status_code == 200
    with world.client(world.orgs["globex"].mtls) as globex:
        assert_refusal(
            globex.get("/tsapi/v1/payments/status", params={"endToEndId": e2e}), 404, "payment_not_found"
        )
        # globex may use the same endToEndId for a payment of its own
        again = globex.post(
            "/tsapi/v1/payments",
            content=signed(world, "globex", request),
            headers={"Content-Type": "application/jose"},
        )
        assert again.status_code == 202, again.text
        assert again.json()["paymentInitiationResponse"]["endToEndId"] == e2e
        assert (
            again.json()["paymentInitiationResponse"]["firmRootId"]
            != created.json()["paymentInitiationResponse"]["firmRootId"]
        )


# --- observability ---------------------------------------------------------------------------


def test_healthz_and_readyz_answer_with_the_registry_version(world: World) -> None:
    assert httpx.get(f"{world.admin}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{world.admin}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["registry_version"] == world.version()


def test_metrics_count_requests_by_environment_product_and_outcome(world: World) -> None:
    name = "twofold_gateway_requests_total"
    ok = {"environment": "cat", "product": "balance", "outcome": "ok"}
    refused = {"environment": "cat", "product": "payments", "outcome": "signature_required"}
    unknown = {"environment": "cat", "product": "-", "outcome": "no_such_api"}
    before = {
        k: world.metric(name, **labels)
        for k, labels in (("ok", ok), ("refused", refused), ("unknown", unknown))
    }
    latency_before = world.metric("twofold_gateway_request_seconds_count", environment="cat")
    with world.client(world.orgs["acme"].mtls) as client:
        for _ in range(3):
            assert client.get("/accessapi/balance").status_code == 200
        assert client.post("/tsapi/v1/payments", json=payment()).status_code == 415
        assert client.get("/nowhere").status_code == 404
    assert world.metric(name, **ok) == before["ok"] + 3
    assert world.metric(name, **refused) == before["refused"] + 1
    assert world.metric(name, **unknown) == before["unknown"] + 1
    assert world.metric("twofold_gateway_request_seconds_count", environment="cat") == latency_before + 5
    text = world.metrics_text()
    assert 'twofold_gateway_request_seconds_bucket{environment="cat",le="0.005"}' in text
    assert 'twofold_gateway_request_seconds_bucket{environment="cat",le="+Inf"}' in text


def test_a_refused_handshake_is_counted(world: World, tmp_path: Path) -> None:
    stranger = ec_pair(tmp_path, "stranger", "stranger-metrics")
    name = "twofold_gateway_tls_handshake_failures_total"
    before = world.metric(name, environment="cat")
    assert tls_outcome(world.port(), stranger, world.ca_path)[0] == "refused"
    wait_until(lambda: world.metric(name, environment="cat") >= before + 1, 3)
    # a good handshake is not counted as a failure
    settled = world.metric(name, environment="cat")
    assert tls_outcome(world.port(), world.orgs["acme"].mtls, world.ca_path)[0].startswith("HTTP/1.1 200")
    time.sleep(0.1)
    assert world.metric(name, environment="cat") == settled


def test_certificates_expiring_within_30_days_are_a_gauge(world: World, tmp_path: Path) -> None:
    name = "twofold_certificates_expiring_30d"
    before = world.metric(name, environment="cat")
    short = ec_pair(tmp_path, "short", "initech-short-cat", days=10)
    world.register("initech", "cat", "mtls", short)
    world.sync()
    assert world.metric(name, environment="cat") == before + 1
    world.remove("initech", "cat", short)
    world.sync()
    assert world.metric(name, environment="cat") == before


def test_one_json_access_log_line_per_request_without_bodies_or_jws(world: World) -> None:
    acme, globex = world.orgs["acme"], world.orgs["globex"]
    assert acme.sign is not None
    marker = token_parts()
    good = signed(world, "acme", payment(marker))
    bad = signed(world, "globex", payment(marker + "-bad"))
    mark = world.access.mark()
    with world.client(acme.mtls) as client:
        assert client.get("/accessapi/balance").status_code == 200
        assert (
            client.post(
                "/tsapi/v1/payments", content=good, headers={"Content-Type": "application/jose"}
            ).status_code
            == 202
        )
        assert (
            client.post(
                "/tsapi/v1/payments", content=bad, headers={"Content-Type": "application/jose"}
            ).status_code
            == 401
        )
        assert client.post("/echo", json={"secret": marker}).status_code == 200
        assert client.get("/unknown").status_code == 404
    with world.client(globex.mtls) as client:
        assert client.get("/ledger").status_code == 403
    lines = world.access.since(mark)
    assert len(lines) == 6, lines
    for line in lines:
        assert {"org", "cert", "product", "outcome", "ms", "status", "env"} <= set(line), line
        assert isinstance(line["ms"], (int, float))
        assert line["ms"] >= 0
        assert line["env"] == "cat"
    assert [(x["org"], x["product"], x["status"], x["outcome"]) for x in lines] == [
        ("acme", "balance", 200, "ok"),
        ("acme", "payments", 202, "ok"),
        ("acme", "payments", 401, "jws_signature_invalid"),
        ("acme", "echo", 200, "ok"),
        ("acme", None, 404, "no_such_api"),
        ("globex", "ledger", 403, "product_not_in_project"),
    ]
    assert {x["cert"] for x in lines[:5]} == {acme.mtls.fingerprint}
    assert lines[5]["cert"] == globex.mtls.fingerprint
    assert lines[1]["signed_by"] == acme.sign.fingerprint
    raw = "\n".join(world.access.raw_since(mark))
    assert marker not in raw
    for token in (good, bad):
        for segment in token.split("."):
            assert segment not in raw
    assert "eyJ" not in raw


# --- the same on PostgreSQL --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with own_postgres_database("twofold_gw") as name:
        url = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"

        def nothing_left_open() -> None:
            # A stopped `twofold serve` leaves no connection behind (the LISTEN one included).
            wait_until(lambda: _pg_connections(name) == 0, 3)

        with running_world(
            tmp_path_factory.mktemp("gateway-pg"), db=url, after_stop=nothing_left_open
        ) as running:
            running.extra["database"] = name
            yield running
            running.assert_no_internal_errors()


def _pg_value(sql: str, *args: object) -> Any:
    import asyncpg

    async def fetch() -> Any:
        conn = await asyncpg.connect(
            host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", database="postgres", timeout=5
        )
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return _in_thread(fetch)


def _pg_connections(database: str, query_prefix: str = "") -> int:
    return int(
        _pg_value(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query LIKE $2 || '%'",
            database,
            query_prefix,
        )
    )


@pytest.mark.postgres
def test_on_postgresql_the_happy_path_works_and_a_removal_reaches_the_gateway_within_a_second(
    pg_world: World, tmp_path: Path
) -> None:
    world = pg_world
    assert world.facts["db"].startswith("postgresql://")
    # the gateway listens for registry notifications (polling is the fallback)
    assert _pg_connections(world.extra["database"], "LISTEN") >= 1
    acme = world.orgs["acme"]
    status, body, _ = curl(world, *mtls_args(world, acme.mtls), url=world.url("/accessapi/balance"))
    assert status == 200, body
    request = payment()
    e2e = request["payments"]["paymentIdentifiers"]["endToEndId"]
    with world.client(acme.mtls) as client:
        created = client.post(
            "/tsapi/v1/payments",
            content=signed(world, "acme", request),
            headers={"Content-Type": "application/jose"},
        )
        assert created.status_code == 202, created.text
        assert created.json()["paymentInitiationResponse"]["endToEndId"] == e2e
        status_response = client.get("/tsapi/v1/payments/status", params={"endToEndId": e2e})
        assert status_response.status_code == 200, status_response.text
        assert status_response.json()["paymentStatus"]["status"] == "PENDING"

    pair = ec_pair(tmp_path, "pg-revoke", "acme-pg-revoke")
    world.register("acme", "cat", "mtls", pair)
    assert world.sync() < PROPAGATION
    with world.client(pair) as client:
        first = client.get("/accessapi/balance")
        assert first.status_code == 200, first.text
        connection = _connection(first)
        world.remove("acme", "cat", pair)
        removed_at = time.monotonic()
        while (response := client.get("/accessapi/balance")).status_code == 200:
            assert time.monotonic() - removed_at < PROPAGATION, "the removal did not reach the gateway in 1 s"
            time.sleep(0.02)
        assert _connection(response) == connection
        assert_refusal(response, 401, "certificate_not_registered")
    assert tls_outcome(world.port(), pair, world.ca_path, sni=None)[0] == "refused"


def test_the_organisations_recent_calls_reach_its_dashboard(world: World) -> None:
    """The gateway records each call off the request path; within about a second the
    organisation's dashboard lists it, with the refusal message — and nobody else's does."""
    initech = world.orgs["initech"]

    def newest_id(calls: list[dict[str, Any]]) -> int:
        return max((c["id"] for c in calls), default=0)

    time.sleep(1.2)  # the earlier tests' calls are stored by now
    with world.api("initech") as api:
        before = newest_id(api.get("/api/v1/calls", params={"env": "cat"}).json())
    with world.client(initech.mtls) as client:
        assert client.get("/accessapi/balance").status_code == 200
        refused = client.post(
            "/tsapi/v1/payments",
            content=signed(world, "acme", payment()),
            headers={"Content-Type": "application/jose", "X-Secret-Header": "hush-42"},
        )
        assert refused.status_code == 401
    message = refused.json()["error"]["message"]
    with world.api("initech") as api:
        deadline = time.monotonic() + 5
        while True:
            calls = api.get("/api/v1/calls", params={"env": "cat"}).json()
            if newest_id(calls) >= before + 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        board = api.get("/api/v1/dashboard", params={"env": "cat"}).json()
    newest, older = calls[0], calls[1]
    assert (newest["method"], newest["path"], newest["status"]) == ("POST", "/tsapi/v1/payments", 401)
    assert newest["product"] == "payments"
    assert newest["message"] == message  # what a developer can act on
    assert (older["path"], older["status"], older["outcome"], older["message"]) == (
        "/accessapi/balance",
        200,
        "ok",
        None,
    )
    assert "hush-42" not in json.dumps(calls)  # no header values, no bodies
    assert {i["item"]: i["done"] for i in board["checklist"]}["call"] is True
    with world.api("globex") as other:
        theirs = other.get("/api/v1/calls", params={"env": "cat", "org": "initech"}).json()
    assert "initech" in message
    assert "initech" not in json.dumps(theirs)  # ?org= is for operators: globex sees its own
