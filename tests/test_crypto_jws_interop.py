"""twofold's compact JWS against real peers (PyJWT, joserfc, jwcrypto, `openssl dgst`) and
against hostile tokens: every refusal carries the expected stable `JWSError.code`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from joserfc import jws as joserfc_jws
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey, RSAKey
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws

from conftest import require_binary
from twofold.crypto import certs, jws, keys
from twofold.crypto.jwk import jwk_from_public_key
from twofold.crypto.keys import PrivateKey
from twofold.errors import JWSError

BODY = {"paymentId": "P-1001", "amount": "125.50", "currency": "USD", "memo": "café ✓"}
BODY_BYTES = json.dumps(BODY, separators=(",", ":"), ensure_ascii=False).encode()
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def header_segment(header: dict[str, Any] | bytes) -> str:
    return b64(header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode())


def raw_signature(alg: str, key: PrivateKey | bytes, data: bytes) -> bytes:
    """A JWS signature made with `cryptography` directly, independent of twofold's signer."""
    if alg == "HS256":
        assert isinstance(key, bytes)
        return hmac.new(key, data, hashlib.sha256).digest()
    if alg == "ES256":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert isinstance(key, rsa.RSAPrivateKey)
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if alg == "RS256"
        else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    )
    return key.sign(data, pad, hashes.SHA256())


def forge(header: dict[str, Any] | bytes, payload: bytes, key: PrivateKey | bytes, alg: str = "RS256") -> str:
    """A compact JWS with exactly this header (as given) and a real signature by `key`."""
    signing_input = f"{header_segment(header)}.{b64(payload)}"
    return f"{signing_input}.{b64(raw_signature(alg, key, signing_input.encode()))}"


def refused(verifier: jws.Verifier, token: str | bytes) -> JWSError:
    with pytest.raises(JWSError) as exc:
        verifier.verify(token)
    return exc.value


def refused_call(action: Callable[[], object]) -> JWSError:
    with pytest.raises(JWSError) as exc:
        action()
    return exc.value


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    key = keys.generate_private_key("rsa")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    key = keys.generate_private_key("rsa")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    key = keys.generate_private_key("rsa")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    key = keys.generate_private_key("ec", curve="P-256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@pytest.fixture(scope="module")
def signing_keys(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> dict[str, PrivateKey]:
    return {"RS256": rsa_key, "PS256": rsa_key, "ES256": ec_key}


@pytest.fixture(scope="module")
def victim(rsa_key: rsa.RSAPrivateKey) -> jws.Verifier:
    """The gateway's view: one registered RSA signature key, RS256 only (the default)."""
    return jws.Verifier([rsa_key.public_key()])


@pytest.fixture(scope="module")
def openssl_bin(request: pytest.FixtureRequest) -> str:
    return require_binary("openssl", request)


# --- real peers ------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_pyjwt_token_verifies_in_twofold(alg: str, signing_keys: dict[str, PrivateKey]) -> None:
    key = signing_keys[alg]
    token = jwt.encode(BODY, key, alg)  # what bank sample code does; adds "typ": "JWT"

    verified = jws.verify(token, key.public_key(), algorithms=(alg,))

    assert verified.json() == BODY
    assert verified.header == {"alg": alg, "typ": "JWT"}


def test_pyjwt_token_signed_by_another_key_is_refused(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier
) -> None:
    token = jwt.encode(BODY, other_rsa_key, "RS256")
    assert jws.verify(token, other_rsa_key.public_key()).json() == BODY  # a well-made token…

    assert refused(victim, token).code == "jws_signature_invalid"  # …but not by our key


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_twofold_token_verifies_in_pyjwt(alg: str, signing_keys: dict[str, PrivateKey]) -> None:
    key = signing_keys[alg]
    token = jws.sign(BODY_BYTES, key, alg=alg, kid="sig-1")

    assert jwt.decode(token, key.public_key(), algorithms=[alg]) == BODY
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "sig-1"}


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_twofold_token_verifies_in_joserfc(alg: str, signing_keys: dict[str, PrivateKey]) -> None:
    key = signing_keys[alg]
    token = jws.sign(BODY_BYTES, key, alg=alg)
    key_type = ECKey if alg == "ES256" else RSAKey
    public = key_type.import_key(keys.public_key_bytes(key))

    result = joserfc_jws.deserialize_compact(token, public, algorithms=[alg])

    assert result.payload == BODY_BYTES
    assert result.protected == {"alg": alg}


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_twofold_token_verifies_in_jwcrypto(alg: str, signing_keys: dict[str, PrivateKey]) -> None:
    key = signing_keys[alg]
    token = jws.sign(BODY_BYTES, key, alg=alg)
    public = jwcrypto_jwk.JWK.from_pem(keys.public_key_bytes(key))

    obj = jwcrypto_jws.JWS()
    obj.deserialize(token, key=public, alg=alg)

    assert obj.payload == BODY_BYTES


@pytest.mark.parametrize("lib", ["pyjwt", "joserfc", "jwcrypto"])
def test_tampered_twofold_token_is_refused_by_every_peer(lib: str, rsa_key: rsa.RSAPrivateKey) -> None:
    header, _, signature = jws.sign(BODY_BYTES, rsa_key).split(".")
    tampered = f"{header}.{b64(BODY_BYTES.replace(b'125.50', b'925.50'))}.{signature}"
    pem = keys.public_key_bytes(rsa_key)

    checks: dict[str, tuple[type[Exception], Callable[[], object]]] = {
        "pyjwt": (
            jwt.InvalidSignatureError,
            lambda: jwt.decode(tampered, rsa_key.public_key(), algorithms=["RS256"]),
        ),
        "joserfc": (
            BadSignatureError,
            lambda: joserfc_jws.deserialize_compact(tampered, RSAKey.import_key(pem), algorithms=["RS256"]),
        ),
        "jwcrypto": (
            jwcrypto_jws.InvalidJWSSignature,
            lambda: jwcrypto_jws.JWS().deserialize(tampered, key=jwcrypto_jwk.JWK.from_pem(pem), alg="RS256"),
        ),
    }
    error, check = checks[lib]

    with pytest.raises(error):
        check()


def _openssl_dgst(openssl: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([openssl, "dgst", "-sha256", *args], capture_output=True, text=True, timeout=30)


_PSS_OPTS = [
    "-sigopt",
    "rsa_padding_mode:pss",
    "-sigopt",
    "rsa_pss_saltlen:32",
    "-sigopt",
    "rsa_mgf1_md:sha256",
]


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_signature_made_by_openssl_dgst_verifies_in_twofold(
    alg: str, signing_keys: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    key = signing_keys[alg]
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(keys.private_key_bytes(key))
    signing_input = f"{header_segment({'alg': alg, 'typ': 'JOSE'})}.{b64(BODY_BYTES)}"
    (tmp_path / "input").write_bytes(signing_input.encode())

    opts = _PSS_OPTS if alg == "PS256" else []
    done = _openssl_dgst(
        openssl_bin, ["-sign", str(key_file), *opts, "-out", str(tmp_path / "sig"), str(tmp_path / "input")]
    )
    assert done.returncode == 0, done.stderr
    signature = (tmp_path / "sig").read_bytes()
    if alg == "ES256":  # openssl writes DER; JWS wants raw r‖s
        r, s = decode_dss_signature(signature)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    token = f"{signing_input}.{b64(signature)}"

    verified = jws.verify(token, key.public_key(), algorithms=(alg,))

    assert verified.payload == BODY_BYTES
    assert verified.header == {"alg": alg, "typ": "JOSE"}


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_openssl_dgst_accepts_twofold_signature(
    alg: str, signing_keys: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    key = signing_keys[alg]
    pub_file = tmp_path / "pub.pem"
    pub_file.write_bytes(keys.public_key_bytes(key))
    token = jws.sign(BODY_BYTES, key, alg=alg)
    signing_input, _, signature_segment = token.rpartition(".")
    signature = base64.urlsafe_b64decode(signature_segment + "=" * (-len(signature_segment) % 4))
    if alg == "ES256":  # raw r‖s back to the DER openssl expects
        signature = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
    (tmp_path / "sig").write_bytes(signature)
    (tmp_path / "input").write_bytes(signing_input.encode())
    (tmp_path / "tampered").write_bytes(signing_input.encode() + b"x")
    opts = _PSS_OPTS if alg == "PS256" else []

    good = _openssl_dgst(
        openssl_bin,
        ["-verify", str(pub_file), *opts, "-signature", str(tmp_path / "sig"), str(tmp_path / "input")],
    )
    bad = _openssl_dgst(
        openssl_bin,
        ["-verify", str(pub_file), *opts, "-signature", str(tmp_path / "sig"), str(tmp_path / "tampered")],
    )

    assert good.returncode == 0, good.stdout + good.stderr
    assert "Verified OK" in good.stdout
    assert bad.returncode != 0
    assert "Verification failure" in bad.stdout + bad.stderr


def test_detached_payload_verifies_only_with_the_original_bytes(
    rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier
) -> None:
    header, _, signature = jws.sign(BODY_BYTES, rsa_key).split(".")
    detached = f"{header}..{signature}"

    assert victim.verify(detached, detached_payload=BODY_BYTES).payload == BODY_BYTES
    assert (
        refused_call(lambda: victim.verify(detached, detached_payload=BODY_BYTES + b" ")).code
        == "jws_signature_invalid"
    )


# --- hostile tokens --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_without_signature_is_refused(alg: str, victim: jws.Verifier) -> None:
    token = f"{header_segment({'alg': alg})}.{b64(BODY_BYTES)}."

    error = refused(victim, token)

    assert error.code == "jws_malformed"
    assert "none" in error.message


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_with_a_signature_is_refused(
    alg: str, rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier
) -> None:
    signing_input = f"{header_segment({'alg': alg})}.{b64(BODY_BYTES)}"
    real_signature = raw_signature("RS256", rsa_key, signing_input.encode())  # even a real one

    for signature in (real_signature, b"\x00", b"none"):
        assert refused(victim, f"{signing_input}.{b64(signature)}").code == "jws_alg_not_allowed"
    everything = jws.Verifier([rsa_key.public_key()], algorithms=jws.SUPPORTED_ALGORITHMS)
    assert refused(everything, f"{signing_input}.{b64(real_signature)}").code == "jws_alg_not_allowed"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_can_never_be_allowed(alg: str, rsa_key: rsa.RSAPrivateKey) -> None:
    error = refused_call(lambda: jws.Verifier([rsa_key.public_key()], algorithms=("RS256", alg)))

    assert error.code == "jws_alg_not_allowed"


@pytest.fixture(scope="module")
def confusion_tokens(rsa_key: rsa.RSAPrivateKey) -> dict[str, tuple[bytes, str]]:
    """HS256 tokens keyed with the RSA public key's bytes, as the attacker downloads them."""
    public = rsa_key.public_key()
    secrets = {
        "spki-pem": keys.public_key_bytes(public),
        "spki-pem-no-newline": keys.public_key_bytes(public).rstrip(b"\n"),
        "spki-der": keys.public_key_bytes(public, der=True),
        "pkcs1-pem": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
    }
    return {
        name: (secret, forge({"alg": "HS256", "typ": "JWT"}, BODY_BYTES, secret, "HS256"))
        for name, secret in secrets.items()
    }


@pytest.mark.parametrize("form", ["spki-pem", "spki-pem-no-newline", "spki-der", "pkcs1-pem"])
def test_hs256_keyed_with_the_rsa_public_key_is_refused(
    form: str, confusion_tokens: dict[str, tuple[bytes, str]], rsa_key: rsa.RSAPrivateKey
) -> None:
    secret, token = confusion_tokens[form]
    public = rsa_key.public_key()
    cert = certs.self_signed_certificate(rsa_key, "/CN=acme-signature", usage="signature")

    # The token is a correct HMAC over those bytes...
    header, payload, signature = token.split(".")
    expected = hmac.new(secret, f"{header}.{payload}".encode(), "sha256").digest()
    assert jws.b64url_decode(signature) == expected
    # ...yet even a caller who hands the public key's bytes over as an HMAC secret is refused:
    # key material that is a public key is never used as a MAC secret.
    assert refused(jws.Verifier([secret], algorithms=("HS256",)), token).code == "jws_no_key"

    assert refused(jws.Verifier([public], algorithms=("RS256",)), token).code == "jws_alg_not_allowed"
    assert refused(jws.Verifier([public], algorithms=("RS256", "HS256")), token).code == "jws_no_key"
    assert refused(jws.Verifier([cert], algorithms=("RS256", "HS256")), token).code == "jws_no_key"


def test_unknown_critical_header_is_refused(rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier) -> None:
    name = "urn:example:must-understand"
    token = forge({"alg": "RS256", "crit": [name], name: True}, BODY_BYTES, rsa_key)

    assert refused(victim, token).code == "jws_crit_unsupported"
    # A verifier that declares it understands the extension accepts the very same token.
    assert jws.verify(token, rsa_key.public_key(), critical=[name]).payload == BODY_BYTES


@pytest.mark.parametrize("registered", ["alg", "kid", "typ", "jwk", "x5t#S256", "crit"])
def test_crit_listing_a_registered_header_is_refused(registered: str, rsa_key: rsa.RSAPrivateKey) -> None:
    header = {"alg": "RS256", "kid": "k1", "typ": "JOSE", "jwk": {}, "x5t#S256": "x", "crit": [registered]}
    token = forge(header, BODY_BYTES, rsa_key)

    error = refused(jws.Verifier([rsa_key.public_key()], critical=[registered]), token)

    assert error.code == "jws_header_invalid"


@pytest.mark.parametrize("crit", ["exp", [], [""], ["exp", "exp"], [1], {"exp": True}])
def test_malformed_crit_is_refused(crit: object, rsa_key: rsa.RSAPrivateKey) -> None:
    token = forge({"alg": "RS256", "crit": crit, "exp": 1}, BODY_BYTES, rsa_key)

    assert refused(jws.Verifier([rsa_key.public_key()], critical=["exp"]), token).code == "jws_header_invalid"


def test_crit_naming_a_parameter_the_header_lacks_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    token = forge({"alg": "RS256", "crit": ["exp"]}, BODY_BYTES, rsa_key)

    assert refused(jws.Verifier([rsa_key.public_key()], critical=["exp"]), token).code == "jws_header_invalid"


def _unencoded(payload: bytes, key: rsa.RSAPrivateKey, *, crit: bool) -> str:
    # RFC 7797: the signing input is the header segment, ".", and the raw payload bytes.
    header = {"alg": "RS256", "b64": False, **({"crit": ["b64"]} if crit else {})}
    signing_input = header_segment(header).encode() + b"." + payload
    return signing_input.decode() + "." + b64(raw_signature("RS256", key, signing_input))


def test_unencoded_payload_b64_false_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    payload = b"pay-100_USD"  # raw bytes that happen to fit the compact alphabet, so the header is read
    public = rsa_key.public_key()

    assert (
        refused(jws.Verifier([public]), _unencoded(payload, rsa_key, crit=True)).code
        == "jws_crit_unsupported"
    )
    for crit in (True, False):
        token = _unencoded(payload, rsa_key, crit=crit)
        assert refused(jws.Verifier([public], critical=["b64"]), token).code == "jws_header_invalid"
    assert (
        refused(jws.Verifier([public]), _unencoded(payload, rsa_key, crit=False)).code == "jws_header_invalid"
    )


@pytest.mark.parametrize("crit", [True, False])
def test_unencoded_json_payload_is_refused_as_malformed(crit: bool, rsa_key: rsa.RSAPrivateKey) -> None:
    token = _unencoded(BODY_BYTES, rsa_key, crit=crit)

    assert refused(jws.Verifier([rsa_key.public_key()], critical=["b64"]), token).code == "jws_malformed"


@pytest.mark.parametrize(
    "raw_header",
    [
        b'{"alg":"HS256","alg":"RS256"}',
        b'{"alg":"RS256","alg":"RS256"}',
        b'{"alg":"RS256","kid":"attacker","kid":"sig-1"}',
        b'{"alg":"RS256","x":{"a":1,"a":2}}',
    ],
    ids=["alg-twice-last-wins-elsewhere", "alg-twice-same", "kid-twice", "nested-duplicate"],
)
def test_duplicate_header_names_are_refused(
    raw_header: bytes, rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier
) -> None:
    token = forge(raw_header, BODY_BYTES, rsa_key)
    # Python's json keeps the last value: without the duplicate check these would verify.
    assert json.loads(raw_header)["alg"] == "RS256"

    assert refused(victim, token).code == "jws_header_invalid"


@pytest.mark.parametrize(
    ("raw_header", "code"),
    [
        (b"[]", "jws_malformed"),
        (b'["RS256"]', "jws_malformed"),
        (b'"RS256"', "jws_malformed"),
        (b"null", "jws_malformed"),
        (b"42", "jws_malformed"),
        (b"true", "jws_malformed"),
        (b"{alg:RS256}", "jws_malformed"),
        (b'{"alg":"RS256"', "jws_malformed"),
        (b'{"alg":"RS256"} x', "jws_malformed"),
        (b"\xff\xfe{}", "jws_malformed"),
        # deeper than CPython's recursion limit, yet under the header size cap
        (b'{"alg":"RS256","x":' + b"[" * 1200 + b"]" * 1200 + b"}", "jws_malformed"),
        (b"{}", "jws_header_invalid"),
        (b'{"alg":["RS256"]}', "jws_header_invalid"),
        (b'{"alg":null}', "jws_header_invalid"),
    ],
    ids=[
        "empty-array",
        "array",
        "string",
        "null",
        "number",
        "bool",
        "not-json",
        "truncated-json",
        "trailing-garbage",
        "not-utf8",
        "deeply-nested",
        "no-alg",
        "alg-not-string",
        "alg-null",
    ],
)
def test_header_that_is_not_a_json_object_with_alg_is_refused(
    raw_header: bytes, code: str, rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier
) -> None:
    token = forge(raw_header, BODY_BYTES, rsa_key)

    assert refused(victim, token).code == code
    with pytest.raises(JWSError):
        jws.unverified_header(token)


def test_an_oversized_header_is_refused_before_it_is_parsed(
    rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier
) -> None:
    token = forge(b'{"alg":"RS256","pad":"' + b"x" * 5000 + b'"}', BODY_BYTES, rsa_key)
    error = refused(victim, token)
    assert error.code == "jws_header_invalid"
    assert "4096" in error.message


def test_refused_tokens_do_not_fill_the_header_cache(rsa_key: rsa.RSAPrivateKey) -> None:
    """Each distinct header is parsed once and cached — but only after a signature verified
    with it, so a client sending endless distinct headers with bad signatures grows nothing."""
    verifier = jws.Verifier([rsa_key.public_key()])
    for i in range(300):
        token = forge(b'{"alg":"RS256","n":%d}' % i, BODY_BYTES, rsa_key)
        header, payload, _signature = token.split(".")
        assert refused(verifier, f"{header}.{payload}.{'A' * 342}").code == "jws_signature_invalid"
    assert len(verifier._prepared) == 0
    good = jws.sign(BODY_BYTES, rsa_key)
    assert verifier.verify(good).payload == BODY_BYTES
    assert len(verifier._prepared) == 1


@pytest.fixture(scope="module")
def good_token(rsa_key: rsa.RSAPrivateKey) -> str:
    # Payload bytes chosen so that the payload segment contains both "-" and "_".
    token = jws.sign(b"\xfb\xff\xfe" + BODY_BYTES, rsa_key)
    assert "-" in token.split(".")[1]
    assert "_" in token.split(".")[1]
    return token


def test_the_good_token_verifies(good_token: str, victim: jws.Verifier) -> None:
    """Control for the hostile variants below: each differs from this one in one way only."""
    assert victim.verify(good_token).payload.endswith(BODY_BYTES)
    assert victim.verify(good_token.encode()).payload.endswith(BODY_BYTES)
    assert victim.verify(good_token + "\r\n").payload.endswith(
        BODY_BYTES
    )  # a trailing newline, as curl -d @file sends


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("char", ["é", "\u00a0", "\uff21", "\x00", " ", "\t", "!", "*", "~", "%"])
def test_foreign_characters_anywhere_are_refused(
    where: int, char: str, good_token: str, victim: jws.Verifier
) -> None:
    parts = good_token.split(".")
    parts[where] = parts[where][:5] + char + parts[where][5:]
    token = ".".join(parts)

    assert refused(victim, token).code == "jws_malformed"
    if not char.isascii():
        assert refused(victim, token.encode("utf-8")).code == "jws_malformed"


def test_json_serialization_is_refused_with_a_hint_about_the_compact_form(
    good_token: str, victim: jws.Verifier
) -> None:
    header, payload, signature = good_token.split(".")
    flattened = json.dumps({"protected": header, "payload": payload, "signature": signature})
    general = json.dumps({"payload": payload, "signatures": [{"protected": header, "signature": signature}]})

    for token in (flattened, general):
        error = refused(victim, token)
        assert error.code == "jws_malformed"
        assert "compact" in error.message


@pytest.mark.parametrize(
    ("shape", "parts"),
    [("two", 2), ("four", 4), ("four-empty-last", 4), ("five", 5), ("one", 1)],
)
def test_wrong_number_of_segments_is_refused(
    shape: str, parts: int, good_token: str, victim: jws.Verifier
) -> None:
    header, payload, signature = good_token.split(".")
    token = {
        "two": f"{header}.{signature}",
        "four": f"{good_token}.{signature}",
        "four-empty-last": f"{good_token}.",
        "five": f"{header}.{payload}.{payload}.{payload}.{signature}",
        "one": header,
    }[shape]

    error = refused(victim, token)

    assert error.code == "jws_malformed"
    assert f"this has {parts}" in error.message


@pytest.mark.parametrize("token", ["", ".", "..", "...", " ", "\n"])
def test_empty_and_dot_only_tokens_are_refused(token: str, victim: jws.Verifier) -> None:
    assert refused(victim, token).code == "jws_malformed"


@pytest.mark.parametrize("segment", [0, 1, 2])
@pytest.mark.parametrize("pad", ["=", "=="])
def test_base64_padding_is_refused(segment: int, pad: str, good_token: str, victim: jws.Verifier) -> None:
    parts = good_token.split(".")
    parts[segment] += pad

    assert refused(victim, ".".join(parts)).code == "jws_malformed"


def test_standard_base64_alphabet_is_refused(good_token: str, victim: jws.Verifier) -> None:
    header, payload, signature = good_token.split(".")
    standard_payload = payload.replace("-", "+").replace("_", "/")
    assert standard_payload != payload

    assert refused(victim, f"{header}.{standard_payload}.{signature}").code == "jws_malformed"
    standard = good_token.replace("-", "+").replace("_", "/")
    assert refused(victim, standard).code == "jws_malformed"
    padded_standard = ".".join(
        base64.b64encode(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))).decode()
        for p in (header, payload, signature)
    )
    assert refused(victim, padded_standard).code == "jws_malformed"


def test_truncated_signature_is_refused(good_token: str, victim: jws.Verifier) -> None:
    signing_input, _, signature = good_token.rpartition(".")
    assert len(signature) == 342  # 256 bytes

    assert refused(victim, f"{signing_input}.{signature[:-2]}").code == "jws_signature_invalid"  # 255 bytes
    assert refused(victim, f"{signing_input}.{signature[:-1]}").code == "jws_malformed"  # impossible length
    assert refused(victim, f"{signing_input}.{signature[:4]}").code == "jws_signature_invalid"
    assert refused(victim, f"{signing_input}.").code == "jws_malformed"
    assert refused(victim, f"{signing_input}.AA{signature}").code == "jws_signature_invalid"  # too long


def test_non_canonical_last_character_is_refused(good_token: str, victim: jws.Verifier) -> None:
    signing_input, _, signature = good_token.rpartition(".")
    # 342 characters carry 2 unused bits in the last one: "A"→"B" decodes to the same bytes.
    assert signature[-1] in "AQgw"
    sibling = B64URL_ALPHABET[B64URL_ALPHABET.index(signature[-1]) + 1]
    same_bytes = f"{signing_input}.{signature[:-1]}{sibling}"
    assert base64.urlsafe_b64decode(same_bytes.rpartition(".")[2] + "==") == base64.urlsafe_b64decode(
        signature + "=="
    )

    assert refused(victim, same_bytes).code == "jws_malformed"


def test_oversized_token_is_refused_before_any_work(rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier) -> None:
    big = jws.sign(b"x" * (jws.DEFAULT_MAX_SIZE), rsa_key)
    assert len(big) > jws.DEFAULT_MAX_SIZE

    error = refused(victim, big)

    assert error.code == "jws_too_large"
    assert error.status == 413
    assert str(jws.DEFAULT_MAX_SIZE) in error.message
    small = jws.sign(BODY_BYTES, rsa_key)
    limited = jws.Verifier([rsa_key.public_key()], max_size=len(small) - 1)
    assert refused(limited, small).code == "jws_too_large"
    assert jws.Verifier([rsa_key.public_key()], max_size=len(small)).verify(small).payload == BODY_BYTES
    assert refused(victim, "A" * (jws.DEFAULT_MAX_SIZE + 1)).code == "jws_too_large"


@pytest.fixture(scope="module")
def attacker_cert(attacker_key: rsa.RSAPrivateKey) -> Any:
    return certs.self_signed_certificate(attacker_key, "/O=Acme/CN=acme-signature", usage="signature")


@pytest.mark.parametrize("embedded", ["jwk", "jku", "x5u", "x5c", "x5t#S256", "all"])
def test_keys_embedded_in_the_header_are_never_used(
    embedded: str,
    attacker_key: rsa.RSAPrivateKey,
    attacker_cert: Any,
    rsa_key: rsa.RSAPrivateKey,
    victim: jws.Verifier,
) -> None:
    victim_cert = certs.self_signed_certificate(rsa_key, "/O=Acme/CN=acme-signature", usage="signature")
    carried = {
        "jwk": jwk_from_public_key(attacker_key.public_key(), kid="sig-1"),
        "jku": "https://attacker.example/.well-known/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "x5c": [base64.b64encode(certs.certificate_der(attacker_cert)).decode()],
        "x5t#S256": certs.x5t_s256(victim_cert),  # names the victim's certificate
    }
    extra = carried if embedded == "all" else {embedded: carried[embedded]}
    token = forge({"alg": "RS256", "kid": "sig-1", **extra}, BODY_BYTES, attacker_key)
    # Control: the attacker's token is well made; its own key verifies it.
    assert jws.verify(token, attacker_key.public_key()).payload == BODY_BYTES

    assert refused(victim, token).code == "jws_signature_invalid"
    assert refused(jws.Verifier([victim_cert]), token).code == "jws_signature_invalid"


def test_kid_only_orders_keys_and_never_substitutes_for_a_real_key(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, attacker_key: rsa.RSAPrivateKey
) -> None:
    verifier = jws.Verifier(
        [
            jws.VerificationKey(rsa_key.public_key(), frozenset({"a"}), label="a"),
            jws.VerificationKey(other_rsa_key.public_key(), frozenset({"b"}), label="b"),
        ]
    )

    # kid names key "a" but "b" signed: verified — by "b", the key that really signed.
    assert verifier.verify(jws.sign(BODY_BYTES, other_rsa_key, kid="a")).key.label == "b"
    # kid names no key at all: still only a real signature counts.
    assert verifier.verify(jws.sign(BODY_BYTES, rsa_key, kid="nobody")).key.label == "a"
    # The attacker may name any kid; without one of our keys nothing verifies.
    for kid in ("a", "b", "nobody"):
        assert refused(verifier, jws.sign(BODY_BYTES, attacker_key, kid=kid)).code == "jws_signature_invalid"


def test_keys_of_another_type_give_no_key(
    ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jws.sign(BODY_BYTES, rsa_key)

    assert refused(jws.Verifier([ec_key.public_key()]), token).code == "jws_no_key"
    pinned = jws.VerificationKey(rsa_key.public_key(), alg="PS256")
    assert refused(jws.Verifier([pinned], algorithms=("RS256", "PS256")), token).code == "jws_no_key"


def test_header_cache_does_not_let_a_refused_header_through(
    rsa_key: rsa.RSAPrivateKey, victim: jws.Verifier
) -> None:
    """The verifier caches parsed headers; a refused header must stay refused on every call."""
    token = forge({"alg": "RS256", "crit": ["x"], "x": 1}, BODY_BYTES, rsa_key)
    for _ in range(3):
        assert refused(victim, token).code == "jws_crit_unsupported"
    good = jws.sign(BODY_BYTES, rsa_key)
    header = good.split(".")[0]
    for _ in range(3):
        assert victim.verify(good).payload == BODY_BYTES
        assert (
            refused(victim, f"{header}.{b64(b'other')}.{good.split('.')[2]}").code == "jws_signature_invalid"
        )


# --- properties --------------------------------------------------------------------------

ROUND_TRIP_ALGS = ["RS256", "PS256", "ES256", "HS256"]
HMAC_SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def key_sets(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> dict[str, tuple[Any, jws.Verifier]]:
    return {
        "RS256": (rsa_key, jws.Verifier([rsa_key.public_key()], algorithms=("RS256",))),
        "PS256": (rsa_key, jws.Verifier([rsa_key.public_key()], algorithms=("PS256",))),
        "ES256": (ec_key, jws.Verifier([ec_key.public_key()], algorithms=("ES256",))),
        "HS256": (HMAC_SECRET, jws.Verifier([HMAC_SECRET], algorithms=("HS256",))),
    }


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=4096), alg=st.sampled_from(ROUND_TRIP_ALGS))
def test_any_payload_bytes_survive_sign_then_verify(
    payload: bytes, alg: str, key_sets: dict[str, tuple[Any, jws.Verifier]]
) -> None:
    key, verifier = key_sets[alg]

    verified = verifier.verify(jws.sign(payload, key, alg=alg))

    assert verified.payload == payload
    assert verified.alg == alg


@pytest.fixture(scope="module")
def signed_tokens(key_sets: dict[str, tuple[Any, jws.Verifier]]) -> dict[str, tuple[str, jws.Verifier]]:
    out = {}
    for alg, (key, verifier) in key_sets.items():
        token = jws.sign(BODY_BYTES, key, alg=alg, kid="sig-1")
        assert verifier.verify(token).payload == BODY_BYTES
        out[alg] = (token, verifier)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_changing_any_single_character_never_verifies(
    data: st.DataObject, signed_tokens: dict[str, tuple[str, jws.Verifier]]
) -> None:
    alg = data.draw(st.sampled_from(ROUND_TRIP_ALGS), label="alg")
    token, verifier = signed_tokens[alg]
    index = data.draw(st.integers(0, len(token) - 1), label="index")
    replacement = data.draw(st.sampled_from(B64URL_ALPHABET + ".=+/ ") | st.characters(), label="char")
    assume(replacement != token[index])
    forged = token[:index] + replacement + token[index + 1 :]

    with pytest.raises(JWSError):
        verifier.verify(forged)


@pytest.mark.parametrize("alg", ROUND_TRIP_ALGS)
def test_every_position_changed_to_its_alphabet_neighbour_never_verifies(
    alg: str, signed_tokens: dict[str, tuple[str, jws.Verifier]]
) -> None:
    """Exhaustive companion of the property above: every index, including the last character of
    each segment, where a neighbour may decode to the same bytes (non-canonical base64url)."""
    token, verifier = signed_tokens[alg]
    for index, char in enumerate(token):
        if char == ".":
            continue
        neighbour = B64URL_ALPHABET[(B64URL_ALPHABET.index(char) + 1) % 64]
        with pytest.raises(JWSError):
            verifier.verify(token[:index] + neighbour + token[index + 1 :])
