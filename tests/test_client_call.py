"""Calling an mTLS (+ JWS) API: `twofold call`, the Python client (`twofold.Client`,
`twofold.AsyncClient`) and the real peers bank documentation shows (`curl`, `requests`),
all against one local endpoint (EchoServer) that pins the client certificate and
verifies signed bodies against the registered signature certificate."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests

import twofold
import twofold.tls
from clientkit import (
    PASSPHRASE,
    SUBJECT_RFC4514,
    Kit,
    cli,
    free_port,
    run_tool,
    running_kit,
    twofold_subprocess,
)
from conftest import require_binary
from twofold.client import explain_tls_failure
from twofold.crypto import certs, jws
from twofold.errors import ClientError, TwofoldError

PAYMENT = b'{"paymentIdentifiers": {"endToEndId": "E2E-CALL-1"},\n "value": {"amount": "125.50", "currency": "USD"}}\n'
PAYMENT_JSON = json.loads(PAYMENT)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    with running_kit(tmp_path_factory.mktemp("kit")) as running:
        (running.directory / "payment.json").write_bytes(PAYMENT)
        (running.directory / "pass.txt").write_text(PASSPHRASE + "\n")
        yield running


@pytest.fixture(scope="module")
def pass_file(kit: Kit) -> Path:
    return kit.directory / "pass.txt"


@pytest.fixture(scope="module")
def client_p12(kit: Kit, pass_file: Path) -> Path:
    """The pinned mTLS key and certificate as a password-protected PKCS#12, made by openssl."""
    path = kit.directory / "client.p12"
    run_tool(
        require_binary("openssl"), "pkcs12", "-export", "-inkey", kit.mtls.key_path, "-in", kit.mtls.cert_path,
        "-passout", f"file:{pass_file}", "-out", path,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def encrypted_mtls_key(kit: Kit, pass_file: Path) -> Path:
    """The pinned mTLS key as encrypted PKCS#8 (AES-256), made by openssl."""
    path = kit.directory / "mtls-encrypted.key"
    run_tool(
        require_binary("openssl"), "pkcs8", "-topk8", "-v2", "aes256", "-in", kit.mtls.key_path,
        "-passout", f"file:{pass_file}", "-out", path,
    )  # fmt: skip
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    return path


def mtls_args(kit: Kit) -> list[object]:
    return ["--cert", kit.mtls.cert_path, "--key", kit.mtls.key_path, "--cacert", kit.ca_pem]


def signed_args(kit: Kit) -> list[object]:
    return [*mtls_args(kit), "--sign-key", kit.sign.key_path]


def echoed(stdout: str) -> dict[str, object]:
    seen = json.loads(stdout)
    assert isinstance(seen, dict)
    return seen


def jws_header(token: bytes) -> dict[str, object]:
    segment = token.split(b".")[0]
    value = json.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def server_fingerprint(kit: Kit) -> str:
    return certs.fingerprint_sha256(kit.server.server_certificate)


# --- twofold call: what reaches the endpoint -------------------------------------------------


def test_call_get_without_body_is_sent_unsigned_with_the_client_certificate(kit: Kit) -> None:
    result = cli("call", f"{kit.url}/accessapi/balance?account=1", *mtls_args(kit))
    assert result.exit_code == 0, result.stderr
    seen = echoed(result.stdout)
    assert seen["method"] == "GET"
    assert seen["path"] == "/accessapi/balance"
    assert seen["query"] == {"account": "1"}
    assert seen["client_certificate"] == {"sha256": kit.mtls.fingerprint, "subject": SUBJECT_RFC4514}
    assert "signature" not in seen
    assert seen["body"] is None
    assert "Content-Type" not in seen["headers"]  # type: ignore[operator]
    assert result.stderr == ""


def test_call_post_json_is_sent_as_application_json(kit: Kit) -> None:
    result = cli("call", f"{kit.url}/accessapi/echo", "-d", '{"amount": "1.00"}', *mtls_args(kit))
    assert result.exit_code == 0, result.stderr
    seen = echoed(result.stdout)
    assert seen["method"] == "POST"
    assert seen["headers"]["Content-Type"] == "application/json"  # type: ignore[index]
    assert seen["body"] == {"amount": "1.00"}
    assert "signature" not in seen


def test_call_with_signed_body_is_verified_by_the_endpoint(kit: Kit) -> None:
    result = cli(
        "call", f"{kit.url}/tsapi/v1/payments", "-d", f"@{kit.directory / 'payment.json'}", *signed_args(kit),
        "--sign-cert", kit.sign.cert_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    seen = echoed(result.stdout)
    assert seen["method"] == "POST"
    assert seen["headers"]["Content-Type"] == "application/jose"  # type: ignore[index]
    assert seen["signature"] == {"verified": True, "alg": "RS256", "signer": kit.sign.fingerprint}
    assert seen["body"] == PAYMENT_JSON
    assert seen["client_certificate"]["sha256"] == kit.mtls.fingerprint  # type: ignore[index]


def test_call_signed_body_with_legacy_text_xml_content_type(kit: Kit) -> None:
    result = cli(
        "call", f"{kit.url}/tsapi/v1/payments", "-d", PAYMENT.decode(), *signed_args(kit),
        "--content-type", "text/xml",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    seen = echoed(result.stdout)
    assert seen["headers"]["Content-Type"] == "text/xml"  # type: ignore[index]
    assert seen["signature"]["verified"] is True  # type: ignore[index]
    assert seen["body"] == PAYMENT_JSON


def test_call_unsigned_legacy_text_xml_body_is_accepted(kit: Kit) -> None:
    xml = "<Payment><Amount>1.00</Amount></Payment>"
    result = cli("call", f"{kit.url}/legacy", "-H", "Content-Type: text/xml", "-d", xml, *mtls_args(kit))
    assert result.exit_code == 0, result.stderr
    seen = echoed(result.stdout)
    assert seen["headers"]["Content-Type"] == "text/xml"  # type: ignore[index]
    assert seen["body"] == xml
    assert "signature" not in seen


def test_call_text_xml_signed_by_an_unknown_key_is_still_refused(kit: Kit) -> None:
    result = cli(
        "call", f"{kit.url}/tsapi/v1/payments", "-d", PAYMENT.decode(), *mtls_args(kit),
        "--sign-key", kit.other_sign.key_path, "--content-type", "text/xml",
    )  # fmt: skip
    assert result.exit_code == 4
    assert "error[http_401]: HTTP 401 Unauthorized: jws_signature_invalid:" in result.stderr


def test_call_verbose_shows_tls_version_server_certificate_and_what_was_signed(kit: Kit) -> None:
    result = cli("call", f"{kit.url}/tsapi/v1/payments", "-d", PAYMENT.decode(), *signed_args(kit), "-v")
    assert result.exit_code == 0, result.stderr
    assert echoed(result.stdout)["signature"]["verified"] is True  # type: ignore[index]
    err = result.stderr.splitlines()
    assert re.fullmatch(r"\* TLS 1\.[23], cipher \S+", err[0]), err
    assert "* server certificate: CN=localhost,O=twofold" in err
    assert f"*   SHA-256 {server_fingerprint(kit)}" in err
    assert any(line.startswith("*   issued by CN=twofold echo CA,O=twofold, expires ") for line in err)
    assert f'* signed {len(PAYMENT)} payload bytes as JWS {{"alg": "RS256"}}; sent ' in result.stderr, (
        result.stderr
    )
    assert " bytes as application/jose" in result.stderr
    assert "> POST /tsapi/v1/payments HTTP/1.1" in err
    assert "> content-type: application/jose" in err
    assert "< HTTP/1.1 200 OK" in err
    unsigned = cli("call", f"{kit.url}/accessapi/balance", *mtls_args(kit), "-v")
    assert unsigned.exit_code == 0, unsigned.stderr
    assert unsigned.stderr.startswith("* TLS 1.")
    assert "* signed" not in unsigned.stderr


def test_call_include_prints_the_status_line_and_headers(kit: Kit) -> None:
    result = cli("call", f"{kit.url}/accessapi/balance", *mtls_args(kit), "-i")
    assert result.exit_code == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")
    lines = head.splitlines()
    assert lines[0] == "HTTP/1.1 200 OK"
    assert "content-type: application/json; charset=utf-8" in lines
    assert echoed(body)["method"] == "GET"


def test_call_json_output_has_status_headers_body_and_tls(kit: Kit) -> None:
    result = cli("call", f"{kit.url}/tsapi/v1/payments", "-d", PAYMENT.decode(), *signed_args(kit), "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"status", "headers", "body", "tls", "signed"}
    assert out["status"] == 200
    assert out["headers"]["content-type"] == "application/json; charset=utf-8"
    assert out["body"]["signature"]["verified"] is True
    assert out["body"]["body"] == PAYMENT_JSON
    assert out["signed"] is True
    assert out["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert out["tls"]["version"] == out["body"]["tls"]
    assert out["tls"]["server_certificate"]["sha256_fingerprint"] == server_fingerprint(kit)
    assert out["tls"]["server_certificate"]["subject"] == "CN=localhost,O=twofold"
    unsigned = json.loads(cli("call", f"{kit.url}/x", *mtls_args(kit), "--json").stdout)
    assert unsigned["signed"] is False


def test_call_insecure_skips_the_server_check(kit: Kit) -> None:
    result = cli("call", f"{kit.url}/x", "--cert", kit.mtls.cert_path, "--key", kit.mtls.key_path, "-k")
    assert result.exit_code == 0, result.stderr
    assert echoed(result.stdout)["client_certificate"]["sha256"] == kit.mtls.fingerprint  # type: ignore[index]


# --- twofold call: HTTP refusals --------------------------------------------------------------


def test_call_signed_with_a_key_the_endpoint_does_not_know_gets_401_and_exit_4(kit: Kit) -> None:
    result = cli(
        "call", f"{kit.url}/tsapi/v1/payments", "-d", PAYMENT.decode(), *mtls_args(kit),
        "--sign-key", kit.other_sign.key_path,
    )  # fmt: skip
    assert result.exit_code == 4
    assert echoed(result.stdout)["error"]["code"] == "jws_signature_invalid"  # type: ignore[index]
    assert result.error_lines() == [
        "error[http_401]: HTTP 401 Unauthorized: jws_signature_invalid: "
        "the signature does not verify against any of the keys"
    ]


def test_call_signed_with_an_ec_key_is_refused_by_an_rs256_endpoint(kit: Kit) -> None:
    result = cli(
        "call", f"{kit.url}/tsapi/v1/payments", "-d", PAYMENT.decode(), *mtls_args(kit),
        "--sign-key", kit.stranger.key_path,
    )  # fmt: skip
    assert result.exit_code == 4
    assert "error[http_401]: HTTP 401 Unauthorized: jws_alg_not_allowed:" in result.stderr


# --- twofold call: TLS and connection failures (exit 3) -------------------------------------


def assert_one_line_error(result_stderr: str, code: str) -> str:
    lines = [line for line in result_stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result_stderr
    assert lines[0].startswith(f"error[{code}]: "), result_stderr
    return lines[0]


def test_call_without_a_client_certificate_exits_3_saying_none_was_sent(kit: Kit) -> None:
    result = cli("call", f"{kit.url}/accessapi/balance", "--cacert", kit.ca_pem)
    assert result.exit_code == 3
    line = assert_one_line_error(result.stderr, "tls_no_client_cert")
    assert "requires a client certificate" in line
    assert "--cert and --key" in line
    assert result.stdout == ""


def test_call_with_a_certificate_the_server_does_not_trust_exits_3(kit: Kit) -> None:
    result = cli(
        "call", f"{kit.url}/accessapi/balance", "--cert", kit.stranger.cert_path, "--key", kit.stranger.key_path,
        "--cacert", kit.ca_pem, "-d", '{"a": 1}',
    )  # fmt: skip
    assert result.exit_code == 3
    line = assert_one_line_error(result.stderr, "tls_client_cert_refused")
    assert "did not accept the client certificate" in line


@pytest.mark.parametrize("cacert", ["none", "other"], ids=["system-cas", "wrong-ca-file"])
def test_call_to_a_server_from_an_unknown_ca_exits_3_and_points_to_cacert(kit: Kit, cacert: str) -> None:
    trust = [] if cacert == "none" else ["--cacert", kit.other_ca_pem]
    result = cli("call", f"{kit.url}/x", "--cert", kit.mtls.cert_path, "--key", kit.mtls.key_path, *trust)
    assert result.exit_code == 3
    line = assert_one_line_error(result.stderr, "tls_server_untrusted")
    assert "the server's certificate is not trusted" in line
    assert "--cacert" in line


def test_call_to_a_port_where_nothing_listens_exits_3_connection_refused(kit: Kit) -> None:
    port = free_port()
    result = cli("call", f"https://127.0.0.1:{port}/x", *mtls_args(kit))
    assert result.exit_code == 3
    line = assert_one_line_error(result.stderr, "connect_refused")
    assert f"nothing accepts connections at 127.0.0.1:{port}" in line


def test_call_plain_http_with_a_client_certificate_is_a_usage_error(kit: Kit) -> None:
    plain_url = kit.url.replace("https://", "http://") + "/x?a=1"
    result = cli("call", plain_url, "--cert", kit.mtls.cert_path, "--key", kit.mtls.key_path)
    assert result.exit_code == 2
    line = assert_one_line_error(result.stderr, "usage")
    assert f"a client certificate is only sent over TLS: call {kit.url}/x?a=1, not http://" in line


def test_call_plain_http_to_a_tls_port_says_to_use_https(kit: Kit) -> None:
    result = cli("call", kit.url.replace("https://", "http://") + "/x")
    assert result.exit_code == 3
    line = assert_one_line_error(result.stderr, "connect_closed")
    assert "plain http:// request" in line
    assert "call https://" in line
    assert "client certificate" not in line  # no TLS happened: no certificate to blame


def test_call_https_to_a_plain_http_server_says_it_is_not_tls(kit: Kit) -> None:
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # not into the captured stderr
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = cli("call", f"https://127.0.0.1:{port}/x", *mtls_args(kit))
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 3
    line = assert_one_line_error(result.stderr, "tls_not_tls")
    assert "did not answer with TLS" in line


# --- twofold call: client credentials in every form ------------------------------------------


@pytest.mark.parametrize("option", ["--cert", "--key"])
def test_call_with_pkcs12_client_credentials_and_a_password_file(
    kit: Kit, client_p12: Path, pass_file: Path, option: str
) -> None:
    result = cli(
        "call", f"{kit.url}/x", option, client_p12, "--passphrase-file", pass_file, "--cacert", kit.ca_pem
    )
    assert result.exit_code == 0, result.stderr
    assert echoed(result.stdout)["client_certificate"]["sha256"] == kit.mtls.fingerprint  # type: ignore[index]
    without = cli("call", f"{kit.url}/x", option, client_p12, "--cacert", kit.ca_pem)
    assert without.exit_code == 1
    line = assert_one_line_error(without.stderr, "key_passphrase_required")
    # It says how to give the passphrase (a .p12 given as --cert too).
    for way in ("--passphrase-file FILE", "TWOFOLD_KEY_PASSPHRASE", "--passphrase-env VAR"):
        assert way in line, line


def test_call_with_a_combined_pem_holding_key_and_certificate(kit: Kit) -> None:
    combined = kit.directory / "combined.pem"
    combined.write_bytes(kit.mtls.key_path.read_bytes() + kit.mtls.cert_path.read_bytes())
    result = cli("call", f"{kit.url}/x", "--cert", combined, "--cacert", kit.ca_pem)
    assert result.exit_code == 0, result.stderr
    assert echoed(result.stdout)["client_certificate"]["sha256"] == kit.mtls.fingerprint  # type: ignore[index]


@pytest.mark.parametrize("source", ["file", "env"])
def test_call_with_an_encrypted_client_key(
    kit: Kit, encrypted_mtls_key: Path, pass_file: Path, source: str
) -> None:
    args: list[object] = ["--cert", kit.mtls.cert_path, "--key", encrypted_mtls_key, "--cacert", kit.ca_pem]
    if source == "file":
        result = cli("call", f"{kit.url}/x", *args, "--passphrase-file", pass_file)
    else:
        result = cli("call", f"{kit.url}/x", *args, env={"TWOFOLD_KEY_PASSPHRASE": PASSPHRASE})
    assert result.exit_code == 0, result.stderr
    assert echoed(result.stdout)["client_certificate"]["sha256"] == kit.mtls.fingerprint  # type: ignore[index]


def test_call_with_the_wrong_passphrase_for_the_client_key_exits_1(
    kit: Kit, encrypted_mtls_key: Path
) -> None:
    result = cli(
        "call", f"{kit.url}/x", "--cert", kit.mtls.cert_path, "--key", encrypted_mtls_key, "--cacert", kit.ca_pem,
        env={"TWOFOLD_KEY_PASSPHRASE": "not the passphrase"},
    )  # fmt: skip
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "key_passphrase_wrong")


def test_call_with_a_key_that_does_not_match_the_certificate_is_a_clear_error(kit: Kit) -> None:
    result = cli(
        "call",
        f"{kit.url}/x",
        "--cert",
        kit.mtls.cert_path,
        "--key",
        kit.stranger.key_path,
        "--cacert",
        kit.ca_pem,
    )
    assert result.exit_code == 1  # bad input, not a TLS failure
    line = assert_one_line_error(result.stderr, "key_cert_mismatch")
    assert "the private key does not belong to the certificate" in line


def test_call_with_a_missing_certificate_file_is_a_usage_error(kit: Kit) -> None:
    missing = kit.directory / "nope.crt"
    result = cli(
        "call", f"{kit.url}/x", "--cert", missing, "--key", kit.mtls.key_path, "--cacert", kit.ca_pem
    )
    assert result.exit_code == 2
    line = assert_one_line_error(result.stderr, "file_not_found")
    assert f"{missing} does not exist" in line


# --- twofold call as a user types it ---------------------------------------------------------


def test_story_signed_call_from_the_shell_with_the_body_on_stdin(kit: Kit) -> None:
    done = twofold_subprocess(
        "call", f"{kit.url}/tsapi/v1/payments", "-d", "@-", *signed_args(kit), "--sign-cert", kit.sign.cert_path,
        "-v", input=PAYMENT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout)
    assert seen["signature"]["verified"] is True
    assert seen["body"] == PAYMENT_JSON
    assert f'"x5t#S256": "{certs.x5t_s256(kit.sign.certificate)}"' in done.stderr.decode()


def test_story_refused_calls_from_the_shell_exit_3_and_4_without_a_traceback(kit: Kit) -> None:
    no_cert = twofold_subprocess("call", f"{kit.url}/x", "--cacert", kit.ca_pem)
    assert no_cert.returncode == 3
    assert no_cert.stderr.decode().startswith("error[tls_no_client_cert]: ")
    assert no_cert.stderr.count(b"\n") == 1
    bad_signature = twofold_subprocess(
        "call", f"{kit.url}/tsapi/v1/payments", "-d", PAYMENT.decode(), *mtls_args(kit),
        "--sign-key", kit.other_sign.key_path,
    )  # fmt: skip
    assert bad_signature.returncode == 4
    assert b"jws_signature_invalid" in bad_signature.stderr
    assert b"Traceback" not in no_cert.stderr + bad_signature.stderr


# --- real peers: curl and requests -------------------------------------------------------------


def test_curl_posts_a_token_from_twofold_jws_sign_and_the_endpoint_verifies_it(kit: Kit, curl: str) -> None:
    signed = twofold_subprocess("jws", "sign", "--key", kit.sign.key_path, kit.directory / "payment.json")
    assert signed.returncode == 0, signed.stderr.decode()
    token = kit.directory / "token.jws"
    token.write_bytes(signed.stdout)
    done = run_tool(
        curl, "-sS", "--cert", kit.mtls.cert_path, "--key", kit.mtls.key_path, "--cacert", kit.ca_pem,
        "--header", "Content-Type: application/jose", "--data", f"@{token}", f"{kit.url}/tsapi/v1/payments",
    )  # fmt: skip
    seen = json.loads(done.stdout)
    assert seen["signature"] == {"verified": True, "alg": "RS256", "signer": kit.sign.fingerprint}
    assert seen["body"] == PAYMENT_JSON
    assert seen["headers"]["User-Agent"].startswith("curl/")
    assert seen["client_certificate"]["sha256"] == kit.mtls.fingerprint


def test_curl_with_a_token_signed_by_an_unknown_key_gets_401(kit: Kit, curl: str) -> None:
    token = jws.sign(PAYMENT, kit.other_sign.key)
    done = run_tool(
        curl, "-sS", "--cert", kit.mtls.cert_path, "--key", kit.mtls.key_path, "--cacert", kit.ca_pem,
        "--header", "Content-Type: application/jose", "--data", token, "-w", "\n%{http_code}",
        f"{kit.url}/tsapi/v1/payments",
    )  # fmt: skip
    body, _, status = done.stdout.decode().rpartition("\n")
    assert status == "401"
    assert json.loads(body)["error"]["code"] == "jws_signature_invalid"


def test_curl_without_a_client_certificate_fails(kit: Kit, curl: str) -> None:
    done = run_tool(curl, "-sS", "--cacert", kit.ca_pem, f"{kit.url}/accessapi/balance", check=False)
    assert done.returncode != 0
    assert b"client_certificate" not in done.stdout
    with_cert = run_tool(
        curl, "-sS", "--cert", kit.mtls.cert_path, "--key", kit.mtls.key_path, "--cacert", kit.ca_pem,
        f"{kit.url}/accessapi/balance",
    )  # fmt: skip
    assert json.loads(with_cert.stdout)["client_certificate"]["sha256"] == kit.mtls.fingerprint


def test_requests_posts_json_with_a_client_certificate(kit: Kit) -> None:
    response = requests.post(
        f"{kit.url}/accessapi/echo",
        cert=(str(kit.mtls.cert_path), str(kit.mtls.key_path)),
        verify=str(kit.ca_pem),
        json=PAYMENT_JSON,
        timeout=30,
    )
    assert response.status_code == 200
    seen = response.json()
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["body"] == PAYMENT_JSON
    assert seen["client_certificate"]["sha256"] == kit.mtls.fingerprint
    signed = requests.post(
        f"{kit.url}/tsapi/v1/payments",
        cert=(str(kit.mtls.cert_path), str(kit.mtls.key_path)),
        verify=str(kit.ca_pem),
        data=jws.sign(PAYMENT, kit.sign.key),
        headers={"Content-Type": "application/jose"},
        timeout=30,
    )
    assert signed.status_code == 200
    assert signed.json()["signature"]["verified"] is True


# --- the Python client ----------------------------------------------------------------------


def test_client_json_bodies_are_signed_and_verified_by_the_endpoint(kit: Kit) -> None:
    with twofold.Client(
        kit.url,
        cert=kit.mtls.cert_path,
        key=kit.mtls.key_path,
        signing_key=kit.sign.key_path,
        verify=kit.ca_pem,
    ) as api:
        response = api.post("/tsapi/v1/payments", json=PAYMENT_JSON)
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["signature"] == {"verified": True, "alg": "RS256", "signer": kit.sign.fingerprint}
    assert seen["body"] == PAYMENT_JSON
    assert seen["headers"]["Content-Type"] == "application/jose"
    assert seen["client_certificate"]["sha256"] == kit.mtls.fingerprint
    sent = response.request.content
    assert jws_header(sent) == {"alg": "RS256"}
    assert (
        jws.verify(sent, kit.sign.certificate).payload
        == response.request.extensions["twofold.signed_payload"]
    )


def test_client_get_without_a_body_is_not_signed(kit: Kit) -> None:
    with twofold.Client(
        kit.url,
        cert=kit.mtls.cert_path,
        key=kit.mtls.key_path,
        signing_key=kit.sign.key_path,
        verify=str(kit.ca_pem),
    ) as api:
        response = api.get("/accessapi/balance")
    assert response.status_code == 200
    seen = response.json()
    assert "signature" not in seen
    assert "Content-Type" not in seen["headers"]
    assert response.request.content == b""
    assert "twofold.signed_payload" not in response.request.extensions


def test_client_content_type_text_xml_for_legacy_gateways(kit: Kit) -> None:
    with twofold.Client(
        kit.url,
        cert=kit.mtls.cert_path,
        key=kit.mtls.key_path,
        signing_key=kit.sign.key_path,
        verify=kit.ca_pem,
        content_type="text/xml",
    ) as api:
        response = api.post("/tsapi/v1/payments", content=PAYMENT)
    seen = response.json()
    assert seen["headers"]["Content-Type"] == "text/xml"
    assert seen["signature"]["verified"] is True
    assert seen["body"] == PAYMENT_JSON


@pytest.mark.parametrize("as_", ["key", "cert"])
def test_client_with_pkcs12_and_passphrase(kit: Kit, client_p12: Path, as_: str) -> None:
    credentials: dict[str, object] = {as_: client_p12}
    with twofold.Client(kit.url, passphrase=PASSPHRASE, verify=kit.ca_pem, **credentials) as api:  # type: ignore[arg-type]
        response = api.get("/x")
    assert response.json()["client_certificate"]["sha256"] == kit.mtls.fingerprint


def test_client_with_in_memory_keys_and_certificates(kit: Kit) -> None:
    with twofold.Client(
        kit.url,
        cert=kit.mtls.certificate,
        key=kit.mtls.key,
        signing_key=kit.sign.key,
        signing_cert=kit.sign.certificate,
        verify=kit.ca_pem.read_bytes(),
    ) as api:
        response = api.post("/tsapi/v1/payments", json={"n": 1})
    seen = response.json()
    assert seen["client_certificate"]["sha256"] == kit.mtls.fingerprint
    assert seen["signature"]["verified"] is True
    assert seen["body"] == {"n": 1}


def test_client_signing_cert_puts_x5t_s256_in_the_header(kit: Kit) -> None:
    with twofold.Client(
        kit.url,
        cert=kit.mtls.cert_path,
        key=kit.mtls.key_path,
        signing_key=kit.sign.key_path,
        signing_cert=kit.sign.cert_path,
        kid=None,
        verify=kit.ca_pem,
    ) as api:
        response = api.post("/tsapi/v1/payments", json=PAYMENT_JSON)
    assert response.json()["signature"]["verified"] is True
    der = certs.certificate_der(kit.sign.certificate)
    thumb = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert jws_header(response.request.content) == {"alg": "RS256", "x5t#S256": thumb}


def test_client_passphrase_callback_is_asked_only_for_an_encrypted_key(
    kit: Kit, encrypted_mtls_key: Path
) -> None:
    asked: list[str] = []

    def passphrase() -> str:
        asked.append("asked")
        return PASSPHRASE

    with twofold.Client(
        kit.url, cert=kit.mtls.cert_path, key=kit.mtls.key_path, passphrase=passphrase, verify=kit.ca_pem
    ):
        pass
    assert asked == []
    with twofold.Client(
        kit.url, cert=kit.mtls.cert_path, key=encrypted_mtls_key, passphrase=passphrase, verify=kit.ca_pem
    ) as api:
        assert api.get("/x").json()["client_certificate"]["sha256"] == kit.mtls.fingerprint
    assert asked == ["asked"]


async def test_async_client_signs_and_the_endpoint_verifies(kit: Kit) -> None:
    async with twofold.AsyncClient(
        kit.url,
        cert=kit.mtls.cert_path,
        key=kit.mtls.key_path,
        signing_key=kit.sign.key_path,
        signing_cert=kit.sign.certificate,
        verify=kit.ca_pem,
    ) as api:
        signed = await api.post("/tsapi/v1/payments", json=PAYMENT_JSON)
        plain = await api.get("/accessapi/balance")
    assert signed.json()["signature"] == {"verified": True, "alg": "RS256", "signer": kit.sign.fingerprint}
    assert signed.json()["body"] == PAYMENT_JSON
    assert jws_header(signed.request.content)["x5t#S256"] == certs.x5t_s256(kit.sign.certificate)
    assert "signature" not in plain.json()
    assert plain.json()["client_certificate"]["sha256"] == kit.mtls.fingerprint


def test_client_key_that_does_not_match_the_certificate_raises(kit: Kit) -> None:
    with pytest.raises(ClientError) as raised:
        twofold.Client(kit.url, cert=kit.mtls.cert_path, key=kit.stranger.key_path, verify=kit.ca_pem)
    assert raised.value.code == "key_cert_mismatch"


def test_client_certificate_object_without_its_key_is_refused_clearly(kit: Kit) -> None:
    with pytest.raises(ClientError) as raised:
        twofold.Client(kit.url, cert=kit.mtls.certificate, verify=kit.ca_pem)
    assert raised.value.code == "usage"
    assert "private key" in raised.value.message
    with pytest.raises(TwofoldError) as from_file:
        twofold.Client(kit.url, cert=kit.mtls.cert_path, verify=kit.ca_pem)
    assert f"{kit.mtls.cert_path} is a certificate, but a private key was expected" in from_file.value.message


def test_client_tls_refusal_is_explained(kit: Kit) -> None:
    with twofold.Client(kit.url, verify=kit.ca_pem) as api, pytest.raises(httpx.TransportError) as raised:
        api.get("/x")
    assert explain_tls_failure(raised.value, sent_client_cert=False).code == "tls_no_client_cert"
    with (
        twofold.Client(
            kit.url, cert=kit.stranger.cert_path, key=kit.stranger.key_path, verify=kit.ca_pem
        ) as api,
        pytest.raises(httpx.TransportError) as refused,
    ):
        api.get("/x")
    assert explain_tls_failure(refused.value, sent_client_cert=True).code == "tls_client_cert_refused"


# --- no plaintext private key on disk ----------------------------------------------------------


def _open_memfds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "twofold-key" in target:
            found.append(target)
    return found


@pytest.mark.parametrize("memfd", ["memfd", "no-memfd"])
def test_client_leaves_no_private_key_file_behind(
    kit: Kit,
    encrypted_mtls_key: Path,
    client_p12: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    memfd: str,
) -> None:
    """The key reaches OpenSSL through an anonymous memory file, or (without memfd) a private
    temporary file removed at once; nothing stays in the temporary directory."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    if memfd == "no-memfd":
        monkeypatch.delattr(os, "memfd_create", raising=False)
    opened: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def watching_mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, path = real_mkstemp(*args, **kwargs)  # type: ignore[call-overload]
        opened.append(path)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", watching_mkstemp)
    handed_to_openssl: list[bytes] = []
    real_private_file = twofold.tls._private_file

    def watching_private_file(data: bytes) -> contextlib.AbstractContextManager[str]:
        handed_to_openssl.append(data)
        return real_private_file(data)

    monkeypatch.setattr(twofold.tls, "_private_file", watching_private_file)
    assert tempfile.gettempdir() == str(scratch)
    with (
        twofold.Client(
            kit.url,
            cert=kit.mtls.cert_path,
            key=encrypted_mtls_key,
            passphrase=PASSPHRASE,
            signing_key=kit.sign.key,
            verify=kit.ca_pem,
        ) as api,
        twofold.Client(kit.url, key=client_p12, passphrase=PASSPHRASE, verify=kit.ca_pem) as p12_api,
    ):
        assert api.post("/tsapi/v1/payments", json={"a": 1}).json()["signature"]["verified"] is True
        assert p12_api.get("/x").status_code == 200
        assert list(scratch.iterdir()) == []
        assert _open_memfds() == []
    assert len(handed_to_openssl) == 2
    for data in handed_to_openssl:  # even the in-memory file holds the key encrypted
        assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        assert b"-----BEGIN PRIVATE KEY-----" not in data
        assert b"-----BEGIN CERTIFICATE-----" in data
    if memfd == "no-memfd":
        assert len(opened) == 2  # the fallback really ran, once per client
        assert all(Path(p).parent == scratch for p in opened)
    else:
        assert opened == []
    assert list(scratch.iterdir()) == []
