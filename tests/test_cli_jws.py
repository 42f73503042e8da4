"""`twofold jws sign|verify`: exact payload bytes, headers, the algorithm allow-list, and
interoperability with PyJWT and `openssl dgst` — what bank sample code and tooling use."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from clientkit import PASSPHRASE, TWOFOLD, Pair, cli, make_pair, run_tool, twofold_subprocess
from twofold.crypto import certs, keys

PAYMENT = (
    b'{"paymentIdentifiers": {"endToEndId": "E2E-1"},\n "value": {"amount": "125.50", "currency": "USD"}}\n'
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def parts(token: str) -> tuple[bytes, bytes, bytes]:
    """Raw header JSON, payload and signature of a compact JWS."""
    header, payload, signature = token.strip().split(".")
    return unb64url(header), unb64url(payload), unb64url(signature)


def header_of(token: str) -> dict[str, object]:
    value = json.loads(parts(token)[0])
    assert isinstance(value, dict)
    return value


@dataclass(frozen=True)
class Signers:
    directory: Path
    rsa: Pair
    other_rsa: Pair
    ec: Pair
    payment: Path


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Signers:
    directory = tmp_path_factory.mktemp("signers")
    payment = directory / "payment.json"
    payment.write_bytes(PAYMENT)
    return Signers(
        directory,
        make_pair(directory, "sign", cn="acme-cat-sign", usage="signature"),
        make_pair(directory, "other", cn="mallory-sign", usage="signature"),
        make_pair(directory, "ec", cn="acme-ec-sign", kind="ec", usage="signature"),
        payment,
    )


def sign(signers: Signers, *args: object, key: Path | None = None, input: bytes | None = None) -> str:
    result = cli("jws", "sign", "--key", key or signers.rsa.key_path, *args, input=input)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n")
    assert result.stdout.count("\n") == 1
    return result.stdout.strip()


def token_file(directory: Path, token: str, name: str = "token.jws") -> Path:
    path = directory / name
    path.write_text(token + "\n")
    return path


# --- signing ------------------------------------------------------------------------------


def test_jws_sign_defaults_to_rs256_over_the_exact_payload_bytes(
    openssl: str, signers: Signers, tmp_path: Path
) -> None:
    token = sign(signers, signers.payment)
    header, payload, signature = parts(token)
    assert header == b'{"alg":"RS256"}'
    assert payload == PAYMENT  # not re-serialised: spaces, key order and the trailing newline kept
    assert len(signature) == 256
    # openssl checks the RS256 signature over "header.payload" with the certificate's key.
    signing_input, _, _ = token.rpartition(".")
    (tmp_path / "input").write_text(signing_input)
    (tmp_path / "sig").write_bytes(signature)
    public = tmp_path / "pub.pem"
    run_tool(openssl, "x509", "-in", signers.rsa.cert_path, "-noout", "-pubkey", "-out", public)
    checked = run_tool(
        openssl, "dgst", "-sha256", "-verify", public, "-signature", tmp_path / "sig", tmp_path / "input"
    )
    assert checked.stdout.strip() == b"Verified OK"


def test_jws_verify_prints_the_exact_payload_and_exits_0(signers: Signers, tmp_path: Path) -> None:
    token = token_file(tmp_path, sign(signers, signers.payment))
    result = cli("jws", "verify", "--cert", signers.rsa.cert_path, token)
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == PAYMENT
    assert result.stderr == ""
    no_newline = tmp_path / "compact.json"
    no_newline.write_bytes(b'{"a":1}')
    again = cli("jws", "verify", "--cert", signers.rsa.cert_path, input=sign(signers, no_newline))
    assert again.exit_code == 0, again.stderr
    assert again.stdout_bytes == b'{"a":1}'  # nothing added when stdout is not a terminal


def test_jws_sign_and_verify_read_stdin_given_as_dash(signers: Signers) -> None:
    token = sign(signers, "-", input=PAYMENT)
    assert parts(token)[1] == PAYMENT
    result = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=token + "\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == PAYMENT


def test_jws_sign_canonical_reserialises_the_json_compactly_with_sorted_keys(signers: Signers) -> None:
    token = sign(
        signers, "--canonical", "-", input=b'{ "b": 2,\n  "a": [1, 2], "c": {"z": 0, "y": "\xc3\xa9"} }\n'
    )
    assert parts(token)[1] == b'{"a":[1,2],"b":2,"c":{"y":"\\u00e9","z":0}}'
    refused = cli("jws", "sign", "--key", signers.rsa.key_path, "--canonical", "-", input=b"<xml/>")
    assert refused.exit_code == 2
    assert refused.error_lines() == [
        "error[usage]: --canonical needs a JSON payload, and this is not valid JSON"
    ]


def test_jws_sign_kid_goes_into_the_protected_header(signers: Signers, tmp_path: Path) -> None:
    thumbprint = certs.sha1_thumbprint(signers.rsa.certificate)
    token = sign(signers, "--kid", thumbprint, signers.payment)
    assert parts(token)[0] == f'{{"alg":"RS256","kid":"{thumbprint}"}}'.encode()
    # The verifier picks the certificate the kid names among several.
    result = cli(
        "jws", "verify", "--cert", signers.other_rsa.cert_path, "--cert", signers.rsa.cert_path, "--json",
        token_file(tmp_path, token),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["signer"] == str(signers.rsa.cert_path)


@pytest.mark.parametrize("option", ["--sign-cert", "--x5t"])  # documented, and its earlier name
def test_jws_sign_cert_puts_the_sha256_thumbprint_of_the_certificate(
    openssl: str, signers: Signers, option: str
) -> None:
    token = sign(signers, option, signers.rsa.cert_path, signers.payment)
    der = run_tool(openssl, "x509", "-in", signers.rsa.cert_path, "-outform", "DER").stdout
    assert header_of(token) == {"alg": "RS256", "x5t#S256": b64url(hashlib.sha256(der).digest())}


def test_jws_sign_refuses_kid_and_a_signing_certificate_together(signers: Signers) -> None:
    result = cli(
        "jws", "sign", "--key", signers.rsa.key_path, "--kid", "k1", "--sign-cert", signers.rsa.cert_path,
        signers.payment,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.error_lines() == ["error[usage]: give --kid or --sign-cert, not both"]
    assert result.stdout == ""


def test_jws_es256_with_an_ec_key(signers: Signers, tmp_path: Path) -> None:
    token = sign(signers, signers.payment, key=signers.ec.key_path)
    header, payload, signature = parts(token)
    assert header == b'{"alg":"ES256"}'
    assert payload == PAYMENT
    assert len(signature) == 64  # JOSE form r‖s, not DER
    path = token_file(tmp_path, token)
    allowed = cli("jws", "verify", "--cert", signers.ec.cert_path, "--alg", "ES256", path)
    assert allowed.exit_code == 0, allowed.stderr
    assert allowed.stdout_bytes == PAYMENT
    by_default = cli("jws", "verify", "--cert", signers.ec.cert_path, path)
    assert by_default.exit_code == 1
    assert "error[jws_alg_not_allowed]: the JWS algorithm 'ES256' is not allowed here" in by_default.stderr
    assert by_default.stdout == ""
    # RS256 cannot be made with an EC key.
    wrong = cli("jws", "sign", "--key", signers.ec.key_path, "--alg", "RS256", signers.payment)
    assert wrong.exit_code == 1
    assert wrong.error_lines() == ["error[jws_key_mismatch]: RS256 needs an RSA private key"]


def test_jws_ps256_is_refused_unless_allowed(signers: Signers, tmp_path: Path) -> None:
    token = sign(signers, "--alg", "PS256", signers.payment)
    assert header_of(token) == {"alg": "PS256"}
    path = token_file(tmp_path, token)
    refused = cli("jws", "verify", "--cert", signers.rsa.cert_path, path)
    assert refused.exit_code == 1
    assert refused.error_lines() == [
        "error[jws_alg_not_allowed]: the JWS algorithm 'PS256' is not allowed here; sign with RS256"
    ]
    assert refused.stdout == ""
    allowed = cli("jws", "verify", "--cert", signers.rsa.cert_path, "--alg", "RS256", "--alg", "PS256", path)
    assert allowed.exit_code == 0, allowed.stderr
    assert allowed.stdout_bytes == PAYMENT


# --- verifying: refusals ------------------------------------------------------------------


def test_jws_verify_with_the_wrong_certificate_fails_with_jws_signature_invalid(
    signers: Signers, tmp_path: Path
) -> None:
    path = token_file(tmp_path, sign(signers, signers.payment))
    result = cli("jws", "verify", "--cert", signers.other_rsa.cert_path, path)
    assert result.exit_code == 1
    assert result.error_lines() == [
        "error[jws_signature_invalid]: the signature does not verify against any of the keys"
    ]
    assert result.stdout == ""


def test_jws_verify_refuses_a_changed_payload(signers: Signers) -> None:
    header, _, signature = sign(signers, signers.payment).split(".")
    forged = f"{header}.{b64url(PAYMENT.replace(b'125.50', b'925.50'))}.{signature}"
    result = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=forged)
    assert result.exit_code == 1
    assert "jws_signature_invalid" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"], ids=["empty-signature", "bogus-signature"])
def test_jws_verify_refuses_alg_none(signers: Signers, signature: str) -> None:
    token = b64url(b'{"alg":"none"}') + "." + b64url(PAYMENT) + "." + signature
    result = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=token)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.error_lines()
    assert len(lines) == 1
    expected = "jws_malformed" if not signature else "jws_alg_not_allowed"
    assert lines[0].startswith(f"error[{expected}]: ")


def test_jws_verify_refuses_hs256_even_keyed_with_the_public_key(signers: Signers) -> None:
    """The classic downgrade: HMAC keyed with the PEM of the RSA public key the verifier holds."""
    public_pem = keys.public_key_bytes(signers.rsa.certificate.public_key())  # type: ignore[arg-type]
    signing_input = b64url(b'{"alg":"HS256"}') + "." + b64url(PAYMENT)
    mac = hmac.new(public_pem, signing_input.encode(), "sha256").digest()
    token = f"{signing_input}.{b64url(mac)}"
    result = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=token)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.error_lines() == [
        "error[jws_alg_not_allowed]: the JWS algorithm 'HS256' is not allowed here; sign with RS256"
    ]
    pyjwt_made = jwt.encode({"a": 1}, "s" * 64, algorithm="HS256")
    also = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=pyjwt_made)
    assert also.exit_code == 1
    assert "jws_alg_not_allowed" in also.stderr
    # HMAC cannot even be asked for on the command line.
    asked = cli("jws", "verify", "--cert", signers.rsa.cert_path, "--alg", "HS256", "-", input=token)
    assert asked.exit_code == 2
    assert asked.stdout == ""


def test_jws_verify_refuses_the_json_serialization(signers: Signers) -> None:
    header, payload, signature = sign(signers, signers.payment).split(".")
    flattened = json.dumps({"protected": header, "payload": payload, "signature": signature})
    result = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=flattened)
    assert result.exit_code == 1
    assert result.error_lines() == [
        "error[jws_malformed]: JWS JSON serialization is not accepted; send the compact form "
        "header.payload.signature"
    ]


def test_jws_verify_needs_the_signers_cert_or_key(signers: Signers) -> None:
    result = cli("jws", "verify", "-", input="a.b.c")
    assert result.exit_code == 2
    assert result.error_lines() == ["error[usage]: give the signer's --cert or --key"]


# --- verifying: output and key sources --------------------------------------------------------


def test_jws_verify_json_reports_valid_and_invalid(signers: Signers, tmp_path: Path) -> None:
    path = token_file(tmp_path, sign(signers, "--kid", "key-1", signers.payment))
    good = cli("jws", "verify", "--cert", signers.rsa.cert_path, "--json", path)
    assert good.exit_code == 0, good.stderr
    assert json.loads(good.stdout) == {
        "valid": True,
        "alg": "RS256",
        "header": {"alg": "RS256", "kid": "key-1"},
        "signer": str(signers.rsa.cert_path),
        "payload": json.loads(PAYMENT),
    }
    bad = cli("jws", "verify", "--cert", signers.other_rsa.cert_path, "--json", path)
    assert bad.exit_code == 1
    assert json.loads(bad.stdout) == {
        "valid": False,
        "error": {
            "code": "jws_signature_invalid",
            "message": "the signature does not verify against any of the keys",
        },
    }


def test_jws_verify_with_a_public_key_file_from_openssl(
    openssl: str, signers: Signers, tmp_path: Path
) -> None:
    public = tmp_path / "pub.pem"
    run_tool(openssl, "pkey", "-in", signers.rsa.key_path, "-pubout", "-out", public)
    path = token_file(tmp_path, sign(signers, signers.payment))
    result = cli("jws", "verify", "--key", public, path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == PAYMENT


def test_jws_sign_with_an_encrypted_pkcs12_signing_key(
    openssl: str, signers: Signers, tmp_path: Path
) -> None:
    pass_file = tmp_path / "pass.txt"
    pass_file.write_text(PASSPHRASE + "\n")
    p12 = tmp_path / "sign.p12"
    run_tool(
        openssl, "pkcs12", "-export", "-inkey", signers.rsa.key_path, "-in", signers.rsa.cert_path,
        "-passout", f"file:{pass_file}", "-out", p12,
    )  # fmt: skip
    without = cli("jws", "sign", "--key", p12, signers.payment)
    assert without.exit_code == 1
    assert "key_passphrase_required" in without.stderr
    token = cli("jws", "sign", "--key", p12, "--passphrase-file", pass_file, signers.payment)
    assert token.exit_code == 0, token.stderr
    verified = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=token.stdout)
    assert verified.exit_code == 0, verified.stderr
    assert verified.stdout_bytes == PAYMENT


# --- PyJWT, as bank sample code uses it ------------------------------------------------------


def test_a_pyjwt_token_verifies_with_the_cli(signers: Signers) -> None:
    body = {"paymentIdentifiers": {"endToEndId": "E2E-PYJWT"}, "value": {"amount": "1.00"}}
    token = jwt.encode(body, signers.rsa.key, "RS256")
    result = cli("jws", "verify", "--cert", signers.rsa.cert_path, "--json", "-", input=token)
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["payload"] == body
    assert seen["header"] == {"alg": "RS256", "typ": "JWT"}
    raw = cli("jws", "verify", "--cert", signers.rsa.cert_path, "-", input=token)
    assert raw.stdout_bytes == parts(token)[1]


def test_a_cli_token_verifies_in_pyjwt(signers: Signers) -> None:
    token = sign(signers, "--kid", "k-7", signers.payment)
    decoded = jwt.api_jws.decode_complete(
        token, key=signers.rsa.certificate.public_key(), algorithms=["RS256"]
    )
    assert decoded["payload"] == PAYMENT
    assert decoded["header"] == {"alg": "RS256", "kid": "k-7"}
    public_pem = keys.public_key_bytes(signers.rsa.certificate.public_key())  # type: ignore[arg-type]
    assert jwt.PyJWS().decode(token, public_pem, algorithms=["RS256"]) == PAYMENT
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.PyJWS().decode(token, signers.other_rsa.certificate.public_key(), algorithms=["RS256"])


@pytest.mark.parametrize(("alg", "which"), [("PS256", "rsa"), ("ES256", "ec")])
def test_cli_ps256_and_es256_tokens_verify_in_pyjwt(signers: Signers, alg: str, which: str) -> None:
    pair: Pair = getattr(signers, which)
    token = sign(signers, "--alg", alg, signers.payment, key=pair.key_path)
    assert jwt.PyJWS().decode(token, pair.certificate.public_key(), algorithms=[alg]) == PAYMENT


# --- as a user types it ---------------------------------------------------------------------


def test_story_sign_piped_into_verify_as_real_processes(signers: Signers) -> None:
    signer = subprocess.Popen(
        [
            TWOFOLD,
            "jws",
            "sign",
            "--key",
            str(signers.rsa.key_path),
            "--x5t",
            str(signers.rsa.cert_path),
            "-",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    token, sign_err = signer.communicate(PAYMENT, timeout=60)
    assert signer.returncode == 0, sign_err.decode()
    verified = twofold_subprocess("jws", "verify", "--cert", signers.rsa.cert_path, input=token)
    assert verified.returncode == 0, verified.stderr.decode()
    assert verified.stdout == PAYMENT
    refused = twofold_subprocess("jws", "verify", "--cert", signers.other_rsa.cert_path, input=token)
    assert refused.returncode == 1
    assert refused.stdout == b""
    assert refused.stderr.decode().splitlines() == [
        "error[jws_signature_invalid]: the signature does not verify against any of the keys"
    ]
