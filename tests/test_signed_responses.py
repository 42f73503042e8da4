"""Signed responses (issue 11): products with ``sign_responses`` answer with a compact JWS of
the upstream's JSON, signed by the gateway's key, whose ``kid`` is in the portal's JWKS. Verified
by PyJWT (the README's snippet, run as written), by ``twofold.Client``/``AsyncClient`` with
``verify_response`` and by ``twofold call --verify-response``."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import twofold
from gatewaykit import World, assert_refusal, payment, running_world
from twofold.client import ResponseSignatureError, ResponseVerifier
from twofold.crypto import jws, keys
from twofold.crypto.jwk import jwk_from_public_key
from twofold.lifecycle import NoticeSigner
from twofold.provider_keys import JWKS_PATH, ProviderKey
from twofold.registry.auth import SYSTEM

README = Path(__file__).resolve().parent.parent / "README.md"
TWOFOLD = str(Path(sys.executable).with_name("twofold"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("signed-responses")) as running:
        running.call(
            running.registry.save_product(
                SYSTEM,
                "signedup",
                name="Signed answers",
                path_prefix="/signedup",
                upstream=running.upstream.url,
                signature="none",
                content_types=["application/json"],
                sign_responses=True,
            )
        )
        for product in ("balance", "payments"):
            running.call(running.registry.set_product_protection(SYSTEM, product, sign_responses=True))
        with running.api("acme") as api:
            added = api.put(f"/api/v1/projects/{running.orgs['acme'].project_id}/products/cat/signedup")
            assert added.status_code == 200, added.text
        running.sync()
        yield running
        running.assert_no_internal_errors()


def jwks_url(world: World) -> str:
    return world.portal + JWKS_PATH


def client(world: World, **options: Any) -> twofold.Client:
    acme = world.orgs["acme"]
    return twofold.Client(
        world.url(), cert=acme.mtls.cert_path, key=acme.mtls.key_path, verify=world.ca_path, **options
    )


def test_the_readme_pyjwt_snippet_verifies_a_signed_response(world: World) -> None:
    text = README.read_text()
    snippet = re.search(r"<!-- pyjwt-response-snippet -->\n```\n(.*?)```", text, re.S)
    assert snippet is not None, "the README's PyJWT snippet"
    acme = world.orgs["acme"].mtls
    code = (
        snippet.group(1)
        .replace('"data/ca/ca.crt"', repr(str(world.ca_path)))
        .replace("https://localhost:8000", world.portal)
        .replace("https://localhost:8443", world.url())
        .replace('"acme-cat/mtls.crt"', repr(str(acme.cert_path)))
        .replace('"acme-cat/mtls.key"', repr(str(acme.key_path)))
    )
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md (PyJWT snippet)", "exec"), namespace)
    assert namespace["balance"]["organisation"] == "acme"
    assert namespace["balance"]["accountBalances"][0]["accountId"] == "ACME-000123456789"
    header = jws.unverified_header(namespace["token"])
    assert header["alg"] == "ES256"
    assert header["kid"] == ProviderKey.load_or_create(world.config.response_key_path).kid


def test_the_client_verifies_and_gives_the_upstreams_json_bound_to_the_request(world: World) -> None:
    mark = world.upstream.count()
    with client(world, verify_response=jwks_url(world)) as api:
        response = api.get("/signedup/accounts", headers={"X-Request-Id": "req-4711"})
    assert response.status_code == 200
    assert response.json() == {"upstream": "recorder", "path": "/signedup/accounts", "received": 0}
    assert response.headers["Content-Type"] == "application/json"
    token = response.extensions["twofold.response_jws"]
    header = response.extensions["twofold.response_header"]
    assert header["request_id"] == "req-4711"
    assert header["typ"] == "JOSE"
    assert abs(header["iat"] - time.time()) < 60
    # The signature covers the upstream's bytes exactly as they came.
    assert (
        jws.verify(
            token,
            ProviderKey.load_or_create(world.config.response_key_path).key.public_key(),
            algorithms=("ES256",),
        ).payload
        == response.content
    )
    seen = world.upstream.since(mark)
    assert len(seen) == 1
    assert seen[0].header("X-Request-Id") == ["req-4711"]
    assert seen[0].header("Accept-Encoding") == []  # asked for an answer it can sign


def test_a_signed_sandbox_payment_with_the_async_client(world: World) -> None:
    acme = world.orgs["acme"]
    assert acme.sign is not None

    async def pay() -> tuple[httpx.Response, httpx.Response]:
        async with twofold.AsyncClient(
            world.url(),
            cert=acme.mtls.cert_path,
            key=acme.mtls.key_path,
            verify=world.ca_path,
            signing_key=acme.sign.key_path,
            verify_response=jwks_url(world),
        ) as api:
            body = payment("E2E-SIGNED-ANSWER")
            return await api.post("/tsapi/v1/payments", json=body), await api.post(
                "/tsapi/v1/payments", json=body
            )

    created, duplicate = asyncio.run(pay())
    assert created.status_code == 202, created.text
    assert created.json()["paymentInitiationResponse"]["endToEndId"] == "E2E-SIGNED-ANSWER"
    # A refusal of the API (not of the gateway) is the API's answer: signed too.
    assert duplicate.status_code == 409, duplicate.text
    assert "twofold.response_jws" in duplicate.extensions
    assert duplicate.json()["error"]["code"]


def test_what_is_not_signed_and_what_a_verifying_client_makes_of_it(world: World) -> None:
    with client(world, verify_response=jwks_url(world)) as api:
        # The gateway's own refusal is not the API's answer: unsigned, and passed on as it is.
        refused = api.get("/ledger/x")
        assert_refusal(refused, 403, "product_not_in_project")
        # A product that does not sign: its 2xx cannot be trusted by a client that wants signatures.
        with pytest.raises(ResponseSignatureError) as unsigned:
            api.get("/echo")
        assert unsigned.value.code == "response_not_signed"
        # Not JSON (256 KB of text): left unsigned, so refused by the verifying client too.
        with pytest.raises(ResponseSignatureError):
            api.get("/signedup/large")
    with client(world) as plain:
        large = plain.get("/signedup/large")
        assert large.headers["Content-Type"].startswith("text/plain")


def test_a_key_the_jwks_does_not_list_and_a_tampered_answer_are_refused(world: World, tmp_path: Path) -> None:
    stranger = keys.generate_private_key("ec")
    other = tmp_path / "other-jwks.json"
    other.write_text(
        json.dumps({"keys": [{**jwk_from_public_key(stranger.public_key()), "kid": "x", "alg": "ES256"}]})
    )
    with client(world, verify_response=other) as api, pytest.raises(ResponseSignatureError) as refused:
        api.get("/signedup/a")
    assert refused.value.code == "response_signature_invalid"

    with client(world) as plain:
        answer = plain.get("/signedup/b")
    header, _payload, signature = answer.text.split(".")
    forged_payload = jws.b64url_encode(b'{"upstream":"recorder","path":"/signedup/b","received":1}')
    forged = httpx.Response(
        200, headers={"Content-Type": "application/jose"}, content=f"{header}.{forged_payload}.{signature}"
    )
    verifier = ResponseVerifier(jwks_url(world), verify=world.ca_path)
    assert verifier.verified(answer).json()["path"] == "/signedup/b"
    with pytest.raises(ResponseSignatureError):
        verifier.verified(forged)
    # An expiry notice is signed by a key of the same JWKS, but it is not a response.
    notice = NoticeSigner.load_or_create(world.config.data / "portal" / "notice-signing.key")
    signed_notice = notice.sign({"type": "certificate.expiring", "iat": 1})
    with pytest.raises(ResponseSignatureError) as not_a_response:
        verifier.verified(
            httpx.Response(200, headers={"Content-Type": "application/jose"}, content=signed_notice)
        )
    assert "not as a gateway response" in not_a_response.value.message


def test_twofold_call_verify_response(world: World, tmp_path: Path) -> None:
    acme = world.orgs["acme"].mtls
    base = [
        TWOFOLD,
        "call",
        world.url("/signedup/cli"),
        "--cert",
        str(acme.cert_path),
        "--key",
        str(acme.key_path),
        "--cacert",
        str(world.ca_path),
    ]
    done = subprocess.run(
        [*base, "--verify-response", jwks_url(world), "-v"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"upstream": "recorder", "path": "/signedup/cli", "received": 0}
    assert "response signature verified" in done.stderr
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(httpx.get(jwks_url(world), verify=world.client_context(None)).text)
    done = subprocess.run(
        [*base, "--verify-response", str(jwks_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    jwks_file.write_text(json.dumps({"keys": []}))
    done = subprocess.run(
        [*base, "--verify-response", str(jwks_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "response_signature_invalid" in done.stderr
    assert "Traceback" not in done.stderr
