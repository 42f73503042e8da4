"""Keys, certificates and CSRs against the real `openssl` binary: twofold reads every form
integrators meet (as OpenSSL 3 writes them), and OpenSSL reads everything twofold writes."""

from __future__ import annotations

import base64
import datetime as dt
import shlex
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import require, require_binary
from twofold.crypto import certs, keys
from twofold.crypto._pem import looks_like_private_key
from twofold.crypto.keys import PrivateKey
from twofold.errors import CertificateError, KeyLoadError

PASSPHRASE = "correct horse battery staple"
SUBJECT = "/C=US/ST=NY/L=New York/O=Acme/OU=Treasury/CN=acme-cat"


def run(openssl: str, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([openssl, *map(str, args)], capture_output=True, timeout=60, cwd=cwd)


def ok(openssl: str, *args: str | Path, cwd: Path | None = None) -> str:
    done = run(openssl, *args, cwd=cwd)
    assert done.returncode == 0, f"openssl {' '.join(map(str, args))}: {done.stderr.decode(errors='replace')}"
    return done.stdout.decode()


def sh(openssl: str, cwd: Path, command: str) -> str:
    """Run an openssl command line exactly as an integrator types it, inside `cwd`."""
    return ok(openssl, *shlex.split(command), cwd=cwd)


def spki(key: PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return keys.public_key_bytes(key, der=True)


@pytest.fixture(scope="module")
def openssl_bin(request: pytest.FixtureRequest) -> str:
    return require_binary("openssl", request)


# --- keys twofold generates ----------------------------------------------------------------


@pytest.fixture(scope="module")
def generated() -> dict[str, PrivateKey]:
    """One key per supported kind, made once per module (RSA 4096 takes a while)."""
    return {
        "rsa-2048": keys.generate_private_key("rsa", bits=2048),
        "rsa-3072": keys.generate_private_key("rsa", bits=3072),
        "rsa-4096": keys.generate_private_key("rsa", bits=4096),
        "ec-P-256": keys.generate_private_key("ec", curve="P-256"),
        "ec-P-384": keys.generate_private_key("ec", curve="P-384"),
        "ec-P-521": keys.generate_private_key("ec", curve="P-521"),
    }


KINDS = ["rsa-2048", "rsa-3072", "rsa-4096", "ec-P-256", "ec-P-384", "ec-P-521"]
DESCRIPTIONS = {
    "rsa-2048": "RSA 2048",
    "rsa-3072": "RSA 3072",
    "rsa-4096": "RSA 4096",
    "ec-P-256": "EC P-256",
    "ec-P-384": "EC P-384",
    "ec-P-521": "EC P-521",
}


@pytest.mark.parametrize("kind", KINDS)
def test_generated_key_has_the_requested_type_and_size(kind: str, generated: dict[str, PrivateKey]) -> None:
    key = generated[kind]

    assert keys.describe_key(key) == DESCRIPTIONS[kind]
    assert keys.describe_key(key.public_key()) == DESCRIPTIONS[kind]
    if isinstance(key, rsa.RSAPrivateKey):
        assert key.private_numbers().public_numbers.e == 65537


def test_default_key_is_rsa_2048() -> None:
    assert keys.describe_key(keys.generate_private_key()) == "RSA 2048"


@pytest.mark.parametrize(
    ("alias", "expected"), [("prime256v1", "EC P-256"), ("secp384r1", "EC P-384"), ("p521", "EC P-521")]
)
def test_openssl_curve_names_are_understood(alias: str, expected: str) -> None:
    assert keys.describe_key(keys.generate_private_key("ec", curve=alias)) == expected


@pytest.mark.parametrize(
    ("kind", "options", "code"),
    [
        ("rsa", {"bits": 1024}, "key_size_unsupported"),
        ("rsa", {"bits": 2047}, "key_size_unsupported"),
        ("ec", {"curve": "secp256k1"}, "key_curve_unsupported"),
        ("dsa", {}, "key_type_unsupported"),
    ],
)
def test_unsupported_key_requests_are_refused(kind: str, options: dict[str, object], code: str) -> None:
    with pytest.raises(KeyLoadError) as exc:
        keys.generate_private_key(kind, **options)  # type: ignore[arg-type]
    assert exc.value.code == code


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("der", [False, True], ids=["pem", "der"])
def test_openssl_reads_key_written_by_twofold(
    kind: str, der: bool, generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    key = generated[kind]
    path = tmp_path / ("key.der" if der else "key.pem")
    path.write_bytes(keys.private_key_bytes(key, der=der))
    if not der:
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8

    public = ok(openssl_bin, "pkey", "-inform", "DER" if der else "PEM", "-in", path, "-pubout")

    assert public.encode() == keys.public_key_bytes(key)
    assert keys.load_private_key(path.read_bytes()).private_numbers() == key.private_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["rsa-2048", "ec-P-256", "ec-P-521"])
@pytest.mark.parametrize("der", [False, True], ids=["pem", "der"])
def test_openssl_reads_encrypted_key_written_by_twofold(
    kind: str, der: bool, generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    key = generated[kind]
    path = tmp_path / "key.enc"
    path.write_bytes(keys.private_key_bytes(key, der=der, passphrase=PASSPHRASE.encode()))
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    (tmp_path / "wrong").write_text("not it\n")
    inform = "DER" if der else "PEM"
    if not der:
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")

    public = sh(openssl_bin, tmp_path, f"pkey -inform {inform} -in key.enc -passin file:pass -pubout")
    wrong = run(
        openssl_bin, *shlex.split(f"pkey -inform {inform} -in key.enc -passin file:wrong"), cwd=tmp_path
    )
    scheme = sh(openssl_bin, tmp_path, f"asn1parse -inform {inform} -in key.enc")

    assert public.encode() == keys.public_key_bytes(key)
    assert wrong.returncode != 0  # it really is encrypted
    assert "PBES2" in scheme
    assert "aes-256-cbc" in scheme


# --- every form integrators meet, made by the openssl binary -------------------------------


@pytest.fixture(scope="module")
def made(openssl_bin: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Key, certificate and CSR files in every form, written by `openssl` itself."""
    d = tmp_path_factory.mktemp("openssl-made")
    (d / "pass").write_text(PASSPHRASE + "\n")
    for command in (
        # private keys
        "genrsa -out rsa.pem 2048",  # PKCS#8 in OpenSSL 3
        "genrsa -traditional -out rsa_pkcs1.pem 2048",  # PKCS#1
        "ecparam -name prime256v1 -genkey -out ec_sec1.pem",  # SEC1, after an EC PARAMETERS block
        "genpkey -algorithm ed25519 -out ed25519.pem",
        "pkcs8 -topk8 -v2 aes-256-cbc -in rsa.pem -out rsa_pkcs8_enc.pem -passout file:pass",
        "pkcs8 -topk8 -v2 aes-256-cbc -in rsa.pem -outform DER -out rsa_pkcs8_enc.der -passout file:pass",
        # OpenSSL 3's `rsa -aes256` writes encrypted PKCS#8; -traditional gives the Proc-Type PEM.
        "rsa -aes256 -traditional -in rsa_pkcs1.pem -out rsa_legacy_enc.pem -passout file:pass",
        "ec -aes256 -in ec_sec1.pem -out ec_legacy_enc.pem -passout file:pass",
        "pkcs8 -topk8 -nocrypt -in rsa.pem -outform DER -out rsa_pkcs8.der",
        "rsa -traditional -in rsa_pkcs1.pem -outform DER -out rsa_pkcs1.der",
        "ec -in ec_sec1.pem -outform DER -out ec_sec1.der",
        # public keys
        "pkey -in rsa.pem -pubout -out rsa_pub.pem",
        "pkey -in rsa.pem -pubout -outform DER -out rsa_pub.der",
        "rsa -in rsa.pem -RSAPublicKey_out -out rsa_pub_pkcs1.pem",
        "pkey -in ec_sec1.pem -pubout -out ec_pub.pem",
        "pkey -in rsa_pkcs1.pem -pubout -out rsa_pkcs1_pub.pem",
        # certificates and CSRs
        f"req -new -x509 -key rsa.pem -subj '{SUBJECT}' -days 30 -out cert.pem",
        "x509 -in cert.pem -outform DER -out cert.der",
        "req -new -x509 -key ec_sec1.pem -subj /CN=acme-ec -days 30 -out ec_cert.pem",
        f"req -new -key rsa.pem -subj '{SUBJECT}' -out csr.pem",
        f"req -new -key rsa.pem -subj '{SUBJECT}' -outform DER -out csr.der",
        # PKCS#12 bundles
        "pkcs12 -export -inkey rsa.pem -in cert.pem -out bundle_nopass.p12 -passout pass:",
        "pkcs12 -export -inkey rsa.pem -in cert.pem -out bundle.p12 -passout file:pass",
        "pkcs12 -export -inkey ec_sec1.pem -in ec_cert.pem -out bundle_ec.p12 -passout file:pass",
    ):
        sh(openssl_bin, d, command)
    # one PEM holding key and certificate, as some portals hand them out; and a Windows copy
    (d / "key_and_cert.pem").write_bytes((d / "rsa.pem").read_bytes() + (d / "cert.pem").read_bytes())
    (d / "rsa_crlf.pem").write_bytes((d / "rsa.pem").read_bytes().replace(b"\n", b"\r\n"))
    (d / "two_keys.pem").write_bytes((d / "rsa.pem").read_bytes() + (d / "ec_sec1.pem").read_bytes())
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 3)
    (d / "empty.pem").write_bytes(b"")
    return {p.name: p for p in d.iterdir()}


# file → (passphrase needed, expected description, source key whose public key must match, has cert)
PRIVATE_FORMS = {
    "rsa.pem": (False, "RSA 2048", "rsa_pub.pem", False),
    "rsa_pkcs1.pem": (False, "RSA 2048", "rsa_pkcs1_pub.pem", False),
    "ec_sec1.pem": (False, "EC P-256", "ec_pub.pem", False),
    "rsa_pkcs8_enc.pem": (True, "RSA 2048", "rsa_pub.pem", False),
    "rsa_pkcs8_enc.der": (True, "RSA 2048", "rsa_pub.pem", False),
    "rsa_legacy_enc.pem": (True, "RSA 2048", "rsa_pkcs1_pub.pem", False),
    "ec_legacy_enc.pem": (True, "EC P-256", "ec_pub.pem", False),
    "rsa_pkcs8.der": (False, "RSA 2048", "rsa_pub.pem", False),
    "rsa_pkcs1.der": (False, "RSA 2048", "rsa_pkcs1_pub.pem", False),
    "ec_sec1.der": (False, "EC P-256", "ec_pub.pem", False),
    "bundle_nopass.p12": (False, "RSA 2048", "rsa_pub.pem", True),
    "bundle.p12": (True, "RSA 2048", "rsa_pub.pem", True),
    "bundle_ec.p12": (True, "EC P-256", "ec_pub.pem", True),
    "key_and_cert.pem": (False, "RSA 2048", "rsa_pub.pem", True),
    "rsa_crlf.pem": (False, "RSA 2048", "rsa_pub.pem", False),
}
ENCRYPTED_FORMS = [name for name, (encrypted, *_) in PRIVATE_FORMS.items() if encrypted]


def test_openssl_made_the_forms_these_tests_claim(made: dict[str, Path]) -> None:
    first_line = {name: made[name].read_bytes().split(b"\n", 1)[0] for name in made if name.endswith(".pem")}

    assert first_line["rsa.pem"] == b"-----BEGIN PRIVATE KEY-----"
    assert first_line["rsa_pkcs1.pem"] == b"-----BEGIN RSA PRIVATE KEY-----"
    assert first_line["ec_sec1.pem"] == b"-----BEGIN EC PARAMETERS-----"
    assert b"-----BEGIN EC PRIVATE KEY-----" in made["ec_sec1.pem"].read_bytes()
    assert first_line["rsa_pkcs8_enc.pem"] == b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
    assert b"Proc-Type: 4,ENCRYPTED" in made["rsa_legacy_enc.pem"].read_bytes()
    assert b"Proc-Type: 4,ENCRYPTED" in made["ec_legacy_enc.pem"].read_bytes()
    assert first_line["rsa_pub_pkcs1.pem"] == b"-----BEGIN RSA PUBLIC KEY-----"
    assert made["rsa_pkcs1.der"].read_bytes() != made["rsa_pkcs8.der"].read_bytes()


@pytest.mark.parametrize("name", sorted(PRIVATE_FORMS))
def test_every_private_key_form_loads(name: str, made: dict[str, Path]) -> None:
    encrypted, description, public_file, has_cert = PRIVATE_FORMS[name]

    creds = keys.load_credentials(made[name].read_bytes(), PASSPHRASE if encrypted else None, name=name)

    assert keys.describe_key(creds.key) == description
    expected_public = keys.load_public_key(made[public_file].read_bytes())
    assert spki(creds.key) == spki(expected_public)
    assert (creds.certificate is not None) == has_cert
    if creds.certificate is not None:
        assert spki(creds.certificate.public_key()) == spki(creds.key)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ENCRYPTED_FORMS)
@pytest.mark.parametrize("form", ["str", "bytes", "callable"])
def test_passphrase_may_be_str_bytes_or_a_prompt(name: str, form: str, made: dict[str, Path]) -> None:
    asked: list[bool] = []

    def prompt() -> str:
        asked.append(True)
        return PASSPHRASE

    passphrase: keys.Passphrase = {"str": PASSPHRASE, "bytes": PASSPHRASE.encode(), "callable": prompt}[form]

    key = keys.load_private_key(made[name].read_bytes(), passphrase)

    assert keys.describe_key(key) in ("RSA 2048", "EC P-256")
    assert asked == ([True] if form == "callable" else [])


@pytest.mark.parametrize("name", ["rsa.pem", "rsa_pkcs1.der", "ec_sec1.pem", "bundle_nopass.p12"])
def test_prompt_is_not_called_for_an_unencrypted_key(name: str, made: dict[str, Path]) -> None:
    def prompt() -> str:
        raise AssertionError("asked for a passphrase the key does not need")

    assert keys.load_private_key(made[name].read_bytes(), prompt)


@pytest.mark.parametrize("name", ENCRYPTED_FORMS)
def test_wrong_passphrase_is_reported_as_such(name: str, made: dict[str, Path]) -> None:
    with pytest.raises(KeyLoadError) as exc:
        keys.load_private_key(made[name].read_bytes(), "Tr0ub4dor&3", name=name)

    assert exc.value.code == "key_passphrase_wrong"
    assert name in exc.value.message
    assert "passphrase" in exc.value.message


@pytest.mark.parametrize("name", ENCRYPTED_FORMS)
@pytest.mark.parametrize("passphrase", [None, "", b""], ids=["none", "empty-str", "empty-bytes"])
def test_missing_passphrase_is_reported_as_such(
    name: str, passphrase: str | bytes | None, made: dict[str, Path]
) -> None:
    with pytest.raises(KeyLoadError) as exc:
        keys.load_private_key(made[name].read_bytes(), passphrase, name=name)

    assert exc.value.code == "key_passphrase_required"
    assert "encrypted" in exc.value.message
    assert "no passphrase" in exc.value.message


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("cert.pem", "is a certificate"),
        ("cert.der", "is a certificate"),
        ("rsa_pub.pem", "is a public key"),
        ("rsa_pub.der", "is a public key"),
        ("rsa_pub_pkcs1.pem", "public key"),
        ("csr.pem", "certificate signing request"),
        ("csr.der", "certificate signing request"),
        ("garbage.bin", "neither PEM nor DER"),
        ("empty.pem", "empty file"),
    ],
)
def test_file_that_is_not_a_private_key_is_named_for_what_it_is(
    name: str, says: str, made: dict[str, Path]
) -> None:
    with pytest.raises(KeyLoadError) as exc:
        keys.load_private_key(made[name].read_bytes(), PASSPHRASE, name=name)

    assert exc.value.code == "key_not_private"
    message = exc.value.message
    assert message.startswith(f"{name} ")
    assert says in message
    assert "a private key was expected" in message
    if "certificate" in says and "request" not in says:
        assert "give the private key file that belongs to it" in message
    else:  # the certificate hint is for certificates only
        assert "belongs to it" not in message
    if "public key" in says:
        assert "cannot sign" in message


def test_ed25519_key_is_refused_with_the_supported_types(made: dict[str, Path]) -> None:
    with pytest.raises(KeyLoadError) as exc:
        keys.load_private_key(made["ed25519.pem"].read_bytes(), name="ed25519.pem")

    assert exc.value.code == "key_type_unsupported"
    assert "Ed25519" in exc.value.message
    assert "RSA or EC" in exc.value.message


def test_file_with_two_private_keys_is_refused_as_ambiguous(made: dict[str, Path]) -> None:
    with pytest.raises(KeyLoadError) as exc:
        keys.load_private_key(made["two_keys.pem"].read_bytes())

    assert exc.value.code == "key_ambiguous"


def test_damaged_key_is_refused_without_a_traceback(made: dict[str, Path]) -> None:
    pem = made["rsa.pem"].read_bytes()
    lines = pem.splitlines()
    damaged = b"\n".join([*lines[:5], *lines[8:]]) + b"\n"  # three lines of the key removed

    with pytest.raises(KeyLoadError) as exc:
        keys.load_private_key(damaged)

    assert exc.value.code == "key_invalid"


@pytest.fixture(scope="module")
def legacy_p12(made: dict[str, Path], openssl_bin: str, request: pytest.FixtureRequest) -> bytes:
    """RC2/3DES PKCS#12, what older Windows and Java exports produce (needs the legacy provider)."""
    d = made["rsa.pem"].parent
    command = "pkcs12 -export -legacy -inkey rsa.pem -in cert.pem -out legacy.p12 -passout file:pass"
    done = run(openssl_bin, *shlex.split(command), cwd=d)
    require("openssl legacy provider (pkcs12 -legacy)", done.returncode == 0, request.node.nodeid)
    return (d / "legacy.p12").read_bytes()


def test_legacy_pkcs12_bundle_loads(legacy_p12: bytes, made: dict[str, Path]) -> None:
    creds = keys.load_credentials(legacy_p12, PASSPHRASE)

    assert spki(creds.key) == spki(keys.load_public_key(made["rsa_pub.pem"].read_bytes()))
    assert creds.certificate is not None
    with pytest.raises(KeyLoadError) as exc:
        keys.load_credentials(legacy_p12, "wrong")
    assert exc.value.code == "key_passphrase_wrong"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rsa_pub.pem", "rsa_pub.pem"),
        ("rsa_pub.der", "rsa_pub.pem"),
        ("rsa_pub_pkcs1.pem", "rsa_pub.pem"),
        ("cert.pem", "rsa_pub.pem"),
        ("cert.der", "rsa_pub.pem"),
        ("rsa.pem", "rsa_pub.pem"),
        ("ec_sec1.pem", "ec_pub.pem"),
    ],
)
def test_public_key_loads_from_public_key_certificate_or_private_key(
    name: str, expected: str, made: dict[str, Path]
) -> None:
    public = keys.load_public_key(made[name].read_bytes())

    assert (
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        == made[expected].read_bytes()
    )


@pytest.mark.parametrize("name", ["csr.pem", "garbage.bin", "empty.pem"])
def test_public_key_loader_names_what_it_got_instead(name: str, made: dict[str, Path]) -> None:
    with pytest.raises(KeyLoadError) as exc:
        keys.load_public_key(made[name].read_bytes(), name=name)

    assert exc.value.code == "key_not_public"
    assert "a public key or certificate was expected" in exc.value.message


# --- looks_like_private_key: the upload guard ----------------------------------------------


@pytest.mark.parametrize("name", [*sorted(PRIVATE_FORMS), "ed25519.pem", "two_keys.pem"])
def test_every_private_key_form_is_recognised_as_secret(name: str, made: dict[str, Path]) -> None:
    assert looks_like_private_key(made[name].read_bytes())


def test_twofold_written_keys_are_recognised_as_secret(generated: dict[str, PrivateKey]) -> None:
    key = generated["ec-P-256"]
    for der in (False, True):
        assert looks_like_private_key(keys.private_key_bytes(key, der=der))
        assert looks_like_private_key(keys.private_key_bytes(key, der=der, passphrase=b"pw"))


@pytest.mark.parametrize(
    "name",
    [
        "cert.pem",
        "cert.der",
        "ec_cert.pem",
        "csr.pem",
        "csr.der",
        "rsa_pub.pem",
        "rsa_pub.der",
        "rsa_pub_pkcs1.pem",
        "ec_pub.pem",
        "garbage.bin",
        "empty.pem",
    ],
)
def test_public_material_is_not_mistaken_for_a_secret(name: str, made: dict[str, Path]) -> None:
    assert not looks_like_private_key(made[name].read_bytes())


# --- certificates and CSRs twofold writes, read by openssl ---------------------------------


@pytest.mark.parametrize(
    ("kind", "signature"), [("rsa-2048", "sha256WithRSAEncryption"), ("ec-P-256", "ecdsa-with-SHA256")]
)
def test_openssl_reads_self_signed_client_certificate(
    kind: str, signature: str, generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    cert = certs.self_signed_certificate(generated[kind], SUBJECT, sans=["DNS:acme.example", "IP:127.0.0.1"])
    path = tmp_path / "cert.pem"
    path.write_bytes(certs.certificate_pem(cert))

    text = ok(openssl_bin, "x509", "-in", path, "-noout", "-text")

    assert f"Signature Algorithm: {signature}" in text
    assert "X509v3 Key Usage: critical" in text
    assert "Digital Signature" in text
    assert "X509v3 Extended Key Usage" in text
    assert "TLS Web Client Authentication" in text
    assert "TLS Web Server Authentication" not in text
    assert "CA:FALSE" in text
    assert "DNS:acme.example, IP Address:127.0.0.1" in text
    assert ok(openssl_bin, "x509", "-in", path, "-noout", "-checkend", "86400")  # valid for more than a day


def test_openssl_reads_der_certificate_written_by_twofold(
    generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    cert = certs.self_signed_certificate(generated["rsa-2048"], "/CN=acme-der")
    (tmp_path / "cert.der").write_bytes(certs.certificate_der(cert))

    subject = ok(openssl_bin, "x509", "-inform", "DER", "-in", tmp_path / "cert.der", "-noout", "-subject")

    assert subject.strip() == "subject=CN = acme-der"


@pytest.mark.parametrize("kind", ["rsa-2048", "ec-P-256", "ec-P-384"])
def test_openssl_verifies_csr_written_by_twofold(
    kind: str, generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    csr = certs.build_csr(generated[kind], SUBJECT, sans=["DNS:api.acme.example"])
    path = tmp_path / "req.csr"
    path.write_bytes(certs.csr_pem(csr))

    done = run(openssl_bin, "req", "-verify", "-in", path, "-noout")
    text = ok(openssl_bin, "req", "-in", path, "-noout", "-text")

    assert done.returncode == 0
    assert b"verify OK" in done.stdout + done.stderr
    assert "Subject: C = US, ST = NY, L = New York, O = Acme, OU = Treasury, CN = acme-cat" in text
    assert "DNS:api.acme.example" in text
    pub = ok(openssl_bin, "req", "-in", path, "-noout", "-pubkey")
    assert pub.encode() == keys.public_key_bytes(generated[kind])


def test_openssl_refuses_a_tampered_csr(
    generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    """Control for the CSR check above: `openssl req -verify` can fail."""
    der = bytearray(
        certs.build_csr(generated["rsa-2048"], "/CN=acme-cat").public_bytes(serialization.Encoding.DER)
    )
    der[-10] ^= 0x01  # inside the signature
    (tmp_path / "bad.csr").write_bytes(bytes(der))

    done = run(openssl_bin, "req", "-verify", "-inform", "DER", "-in", tmp_path / "bad.csr", "-noout")

    # OpenSSL 3.0 exits 0 here: only the message tells (hence the "verify OK" check above).
    assert b"verify failure" in done.stdout + done.stderr
    assert b"verify OK" not in done.stdout + done.stderr


@pytest.mark.parametrize("form", ["openssl", "rfc4514"])
def test_subject_parses_the_way_openssl_req_subj_does(
    form: str, made: dict[str, Path], generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    text = SUBJECT if form == "openssl" else "CN=acme-cat,OU=Treasury,O=Acme,L=New York,ST=NY,C=US"
    ours = tmp_path / "ours.pem"
    ours.write_bytes(certs.certificate_pem(certs.self_signed_certificate(generated["rsa-2048"], text)))

    theirs = ok(openssl_bin, "x509", "-in", made["cert.pem"], "-noout", "-subject")

    assert ok(openssl_bin, "x509", "-in", ours, "-noout", "-subject") == theirs
    assert theirs.strip() == "subject=C = US, ST = NY, L = New York, O = Acme, OU = Treasury, CN = acme-cat"
    openssl_name = x509.load_pem_x509_certificate(made["cert.pem"].read_bytes()).subject
    assert (
        certs.parse_subject(text).public_bytes() == openssl_name.public_bytes()
    )  # same DER, string types too


def test_escaped_slash_in_subject_matches_openssl(
    openssl_bin: str, generated: dict[str, PrivateKey], tmp_path: Path
) -> None:
    subject = r"/O=Acme\/Widgets/CN=acme-cat"
    (tmp_path / "key.pem").write_bytes(keys.private_key_bytes(generated["rsa-2048"]))
    ok(
        openssl_bin,
        "req",
        "-new",
        "-x509",
        "-key",
        tmp_path / "key.pem",
        "-subj",
        subject,
        "-out",
        tmp_path / "theirs.pem",
    )
    theirs = x509.load_pem_x509_certificate((tmp_path / "theirs.pem").read_bytes()).subject

    ours = certs.parse_subject(subject)

    assert ours.public_bytes() == theirs.public_bytes()
    assert ours.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Acme/Widgets"


@pytest.mark.parametrize(
    ("subject", "code"),
    [
        ("", "subject_invalid"),
        ("/C=USA/CN=x", "subject_invalid"),
        ("/XX=1/CN=x", "subject_invalid"),
        ("/CN", "subject_invalid"),
        ("/CN=", "subject_invalid"),
    ],
)
def test_bad_subject_is_refused_with_a_hint(subject: str, code: str) -> None:
    with pytest.raises(CertificateError) as exc:
        certs.parse_subject(subject)
    assert exc.value.code == code


def test_sans_of_every_kind_are_written_and_described(
    generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    sans = [
        "DNS:api.acme.example",
        "api2.acme.example",
        "IP:127.0.0.1",
        "IP:::1",
        "email:ops@acme.example",
        "URI:https://acme.example/id",
    ]
    cert = certs.self_signed_certificate(generated["ec-P-256"], "/CN=acme-cat", sans=sans)
    (tmp_path / "c.pem").write_bytes(certs.certificate_pem(cert))

    text = ok(openssl_bin, "x509", "-in", tmp_path / "c.pem", "-noout", "-ext", "subjectAltName")

    assert (
        "DNS:api.acme.example, DNS:api2.acme.example, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, "
        "email:ops@acme.example, URI:https://acme.example/id"
    ) in text
    assert certs.describe_certificate(cert).subject_alt_names == [
        "DNS:api.acme.example",
        "DNS:api2.acme.example",
        "IP:127.0.0.1",
        "IP:::1",
        "email:ops@acme.example",
        "URI:https://acme.example/id",
    ]
    with pytest.raises(CertificateError) as exc:
        certs.parse_san(["IP:not-an-ip"])
    assert exc.value.code == "san_invalid"


# --- describe_certificate against openssl's own view ------------------------------------


def _openssl_hex(output: str) -> str:
    return output.strip().split("=", 1)[1].replace(":", "")


@pytest.mark.parametrize("name", ["cert.pem", "cert.der", "ec_cert.pem"])
def test_fingerprints_match_openssl(name: str, made: dict[str, Path], openssl_bin: str) -> None:
    path = made[name]
    inform = "DER" if name.endswith(".der") else "PEM"
    sha256 = _openssl_hex(
        ok(openssl_bin, "x509", "-inform", inform, "-in", path, "-noout", "-fingerprint", "-sha256")
    )
    sha1 = _openssl_hex(
        ok(openssl_bin, "x509", "-inform", inform, "-in", path, "-noout", "-fingerprint", "-sha1")
    )
    serial = _openssl_hex(ok(openssl_bin, "x509", "-inform", inform, "-in", path, "-noout", "-serial"))

    info = certs.describe_certificate(certs.load_certificate(path.read_bytes()))

    assert info.sha256_fingerprint == sha256.lower()
    assert info.sha1_thumbprint == sha1.upper()
    assert info.x5t_s256 == base64.urlsafe_b64encode(bytes.fromhex(sha256)).rstrip(b"=").decode()
    assert info.serial == serial.lstrip("0").upper()
    assert info.self_signed is True
    assert info.subject.startswith("CN=acme-")


def test_description_of_an_openssl_certificate(made: dict[str, Path], openssl_bin: str) -> None:
    info = certs.describe_certificate(certs.load_certificate(made["cert.pem"].read_bytes()))

    assert info.subject == "CN=acme-cat,OU=Treasury,O=Acme,L=New York,ST=NY,C=US"
    assert info.common_name == "acme-cat"
    assert info.issuer == info.subject
    assert (info.key, info.key_type, info.key_size) == ("RSA 2048", "RSA", 2048)
    assert info.signature_algorithm == "sha256WithRSAEncryption"
    assert info.expired is False
    assert info.not_yet_valid is False
    assert 28 <= info.days_left <= 30
    assert info.to_dict()["sha256_fingerprint"] == info.sha256_fingerprint


def test_twofold_client_certificate_has_no_warnings(generated: dict[str, PrivateKey]) -> None:
    cert = certs.self_signed_certificate(generated["rsa-2048"], SUBJECT, days=365)

    info = certs.describe_certificate(cert)

    assert info.warnings == []
    assert info.self_signed is True
    assert info.is_ca is False
    assert info.key_usage == ["digital_signature"]
    assert info.extended_key_usage == ["clientAuth"]


def test_signature_certificate_is_marked_for_non_repudiation(generated: dict[str, PrivateKey]) -> None:
    info = certs.describe_certificate(
        certs.self_signed_certificate(generated["ec-P-256"], "/CN=sig", usage="signature")
    )

    assert info.key_usage == ["digital_signature", "content_commitment"]
    assert info.extended_key_usage is None
    assert info.warnings == []


@pytest.fixture(scope="module")
def warned(made: dict[str, Path], openssl_bin: str) -> dict[str, x509.Certificate]:
    """Certificates with one problem each, made by openssl."""
    d = made["rsa.pem"].parent / "warned"
    d.mkdir()
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
        "default_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n"
    )
    for command in (
        "req -x509 -newkey rsa:1024 -nodes -keyout k1024.pem -subj /CN=weak -days 30 -out rsa1024.pem",
        "req -x509 -key ../rsa.pem -sha1 -subj /CN=sha1 -days 90 -out sha1.pem",
        "req -x509 -key ../rsa.pem -subj /CN=server -addext extendedKeyUsage=serverAuth -days 90 -out server.pem",
        # Expired: in OpenSSL 3.0 only `openssl ca` takes explicit dates.
        "req -new -key ../rsa.pem -subj /CN=expired -out expired.csr",
        "ca -batch -config ca.cnf -selfsign -keyfile ../rsa.pem -in expired.csr -notext"
        " -startdate 20200101000000Z -enddate 20200201000000Z -out expired.pem",
    ):
        sh(openssl_bin, d, command)
    return {
        name: x509.load_pem_x509_certificate((d / f"{name}.pem").read_bytes())
        for name in ("rsa1024", "sha1", "server", "expired")
    }


def test_expired_certificate_is_flagged(
    warned: dict[str, x509.Certificate], openssl_bin: str, tmp_path: Path
) -> None:
    cert = warned["expired"]
    (tmp_path / "c.pem").write_bytes(certs.certificate_pem(cert))
    assert (
        run(openssl_bin, "x509", "-in", tmp_path / "c.pem", "-noout", "-checkend", "0").returncode == 1
    )  # openssl agrees

    info = certs.describe_certificate(cert)

    assert info.expired is True
    assert info.days_left < 0
    assert info.warnings == ["expired on 2020-02-01"]
    assert info.self_signed is True


def test_certificate_that_will_expire_is_flagged_at_the_time_asked(generated: dict[str, PrivateKey]) -> None:
    cert = certs.self_signed_certificate(generated["rsa-2048"], "/CN=acme-cat", days=365)
    now = dt.datetime.now(dt.UTC)

    assert (
        certs.describe_certificate(cert, now + dt.timedelta(days=350)).warnings[0].startswith("expires in ")
    )
    later = certs.describe_certificate(cert, now + dt.timedelta(days=400))
    assert later.expired is True
    assert later.warnings[0].startswith("expired on ")
    earlier = certs.describe_certificate(cert, now - dt.timedelta(days=1))
    assert earlier.not_yet_valid is True
    assert earlier.warnings[0].startswith("not valid before ")


def test_rsa_1024_certificate_is_flagged_as_weak(warned: dict[str, x509.Certificate]) -> None:
    info = certs.describe_certificate(warned["rsa1024"])

    assert info.key == "RSA 1024"
    assert "RSA key of 1024 bits is too weak (2048 is the minimum)" in info.warnings


def test_sha1_certificate_is_flagged(warned: dict[str, x509.Certificate]) -> None:
    info = certs.describe_certificate(warned["sha1"])

    assert info.signature_algorithm == "sha1WithRSAEncryption"
    assert "signed with SHA1, which banks refuse; reissue with SHA-256" in info.warnings
    assert info.self_signed is True  # still self-signed, even though the hash is weak


def test_server_only_certificate_is_flagged_as_unusable_for_mtls(warned: dict[str, x509.Certificate]) -> None:
    info = certs.describe_certificate(warned["server"])

    assert info.extended_key_usage == ["serverAuth"]
    assert info.warnings == ["extended key usage lacks clientAuth: unusable for mTLS"]


# --- chains ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(made: dict[str, Path], openssl_bin: str) -> dict[str, Path]:
    """An openssl CA and a leaf it issued, and the usual leaf+CA bundle."""
    d = made["rsa.pem"].parent / "chain"
    d.mkdir()
    for command in (
        "req -x509 -new -key ../rsa_pkcs1.pem -subj '/O=Acme Bank/CN=Acme Test CA' -days 30 -out ca.pem",
        "req -new -key ../ec_sec1.pem -subj /O=Acme/CN=acme-cat -out leaf.csr",
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ../rsa_pkcs1.pem -set_serial 4097 -days 30 -out leaf.pem",
    ):
        sh(openssl_bin, d, command)
    (d / "bundle.pem").write_bytes((d / "leaf.pem").read_bytes() + (d / "ca.pem").read_bytes())
    return {p.name: p for p in d.iterdir()}


def test_certificate_bundle_loads_in_order(chain: dict[str, Path]) -> None:
    loaded = certs.load_certificates(chain["bundle.pem"].read_bytes())

    assert [certs.common_name(c.subject) for c in loaded] == ["acme-cat", "Acme Test CA"]
    leaf = certs.describe_certificate(loaded[0])
    assert leaf.self_signed is False
    assert leaf.issuer == "CN=Acme Test CA,O=Acme Bank"
    assert leaf.serial == "1001"
    assert certs.describe_certificate(loaded[1]).self_signed is True


def test_single_certificate_loader_refuses_a_chain(chain: dict[str, Path]) -> None:
    with pytest.raises(CertificateError) as exc:
        certs.load_certificate(chain["bundle.pem"].read_bytes(), name="bundle.pem")

    assert exc.value.code == "certificate_chain"
    assert "holds 2 certificates" in exc.value.message


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("rsa.pem", "private key"),
        ("csr.pem", "signing request"),
        ("garbage.bin", "neither"),
        ("empty.pem", "empty"),
    ],
)
def test_certificate_loader_names_what_it_got_instead(name: str, says: str, made: dict[str, Path]) -> None:
    with pytest.raises(CertificateError) as exc:
        certs.load_certificate(made[name].read_bytes(), name=name)

    assert exc.value.code == "certificate_invalid"
    assert says in exc.value.message
    assert "a certificate was expected" in exc.value.message


def test_openssl_verifies_a_leaf_issued_by_a_twofold_ca(
    generated: dict[str, PrivateKey], openssl_bin: str, tmp_path: Path
) -> None:
    ca_key, leaf_key = generated["rsa-3072"], generated["ec-P-384"]
    ca = certs.self_signed_certificate(ca_key, "/O=Acme Bank/CN=Acme Test CA", usage="ca")
    leaf = certs.issue_certificate(
        subject="/O=Acme/CN=acme-cat", public_key=leaf_key.public_key(), issuer_key=ca_key, issuer=ca
    )
    (tmp_path / "ca.pem").write_bytes(certs.certificate_pem(ca))
    (tmp_path / "leaf.pem").write_bytes(certs.certificate_pem(leaf))
    (tmp_path / "stranger.pem").write_bytes(
        certs.certificate_pem(certs.self_signed_certificate(leaf_key, "/CN=acme-cat"))
    )

    good = run(
        openssl_bin, "verify", "-purpose", "sslclient", "-CAfile", tmp_path / "ca.pem", tmp_path / "leaf.pem"
    )
    bad = run(openssl_bin, "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "stranger.pem")

    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.strip().endswith(b": OK")
    assert bad.returncode != 0
    assert certs.describe_certificate(ca).is_ca is True


@pytest.mark.parametrize("name", ["csr.pem", "csr.der"])
def test_openssl_csr_loads(name: str, made: dict[str, Path]) -> None:
    csr = certs.load_csr(made[name].read_bytes())

    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=acme-cat,OU=Treasury,O=Acme,L=New York,ST=NY,C=US"


@pytest.mark.parametrize("name", ["cert.pem", "rsa.pem", "garbage.bin"])
def test_csr_loader_names_what_it_got_instead(name: str, made: dict[str, Path]) -> None:
    with pytest.raises(CertificateError) as exc:
        certs.load_csr(made[name].read_bytes())
    assert exc.value.code == "csr_invalid"
