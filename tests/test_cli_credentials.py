"""`twofold key new`, `csr new`, `cert selfsign`, `cert show` and `init`, checked with the real
`openssl`: what twofold writes, openssl reads; what openssl writes, twofold reads."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import stat
from pathlib import Path

import pytest

from clientkit import PASSPHRASE, SUBJECT, SUBJECT_RFC4514, cli, run_tool, twofold_subprocess
from twofold.crypto import certs, keys


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_text(openssl: str, *args: object) -> str:
    return run_tool(openssl, *args).stdout.decode()


def openssl_pubkey_of_key(openssl: str, key: Path, *extra: object) -> str:
    return openssl_text(openssl, "pkey", "-in", key, "-pubout", *extra)


@pytest.fixture
def pass_file(tmp_path: Path) -> Path:
    path = tmp_path / "pass.txt"
    path.write_text(PASSPHRASE + "\n")
    return path


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RSA key for the certificate tests (keys cost)."""
    path = tmp_path_factory.mktemp("rsa") / "rsa.key"
    path.write_bytes(keys.private_key_bytes(keys.generate_private_key("rsa")))
    return path


# --- twofold key new ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "openssl_says", "described"),
    [
        pytest.param([], "Private-Key: (2048 bit", "RSA 2048", id="rsa-2048-default"),
        pytest.param(["--bits", "3072"], "Private-Key: (3072 bit", "RSA 3072", id="rsa-3072"),
        pytest.param(["--type", "ec", "--curve", "P-256"], "NIST CURVE: P-256", "EC P-256", id="ec-p256"),
        pytest.param(["--type", "ec", "--curve", "P-384"], "NIST CURVE: P-384", "EC P-384", id="ec-p384"),
    ],
)
def test_key_new_writes_a_pkcs8_pem_key_openssl_reads_with_mode_0600(
    openssl: str, tmp_path: Path, args: list[str], openssl_says: str, described: str
) -> None:
    out = tmp_path / "new.key"
    result = cli("key", "new", *args, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert mode(out) == 0o600
    assert openssl_says in openssl_text(openssl, "pkey", "-in", out, "-noout", "-text")
    run_tool(openssl, "pkey", "-in", out, "-check", "-noout")
    assert f"wrote {described} private key to {out}" in result.stderr


def test_key_new_der_is_pkcs8_der_that_openssl_reads(openssl: str, tmp_path: Path) -> None:
    out = tmp_path / "key.der"
    result = cli("key", "new", "--type", "ec", "--der", "--out", out)
    assert result.exit_code == 0, result.stderr
    der = out.read_bytes()
    assert not der.startswith(b"-----")
    assert "NIST CURVE: P-256" in openssl_text(
        openssl, "pkey", "-inform", "DER", "-in", out, "-noout", "-text"
    )
    # `openssl pkcs8 -nocrypt` reads PrivateKeyInfo only: it refuses SEC1 or PKCS#1 DER.
    run_tool(openssl, "pkcs8", "-inform", "DER", "-nocrypt", "-in", out, "-out", "/dev/null")
    assert ":id-ecPublicKey" in openssl_text(openssl, "asn1parse", "-inform", "DER", "-in", out)
    assert mode(out) == 0o600


def test_key_new_with_passphrase_file_is_encrypted_and_openssl_reads_it_with_passin(
    openssl: str, tmp_path: Path, pass_file: Path
) -> None:
    out = tmp_path / "enc.key"
    result = cli("key", "new", "--passphrase-file", pass_file, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert b"BEGIN PRIVATE KEY" not in out.read_bytes()
    assert mode(out) == 0o600
    refused = run_tool(openssl, "pkey", "-in", out, "-noout", "-passin", "pass:not-it", check=False)
    assert refused.returncode != 0
    text = openssl_text(openssl, "pkey", "-in", out, "-noout", "-text", "-passin", f"file:{pass_file}")
    assert "Private-Key: (2048 bit" in text
    scheme = openssl_text(openssl, "asn1parse", "-in", out)
    assert "PBES2" in scheme
    assert "PBKDF2" in scheme
    assert "aes-256-cbc" in scheme
    assert "encrypted" in result.stderr


def test_key_new_refuses_to_overwrite_an_existing_file_without_force(tmp_path: Path) -> None:
    out = tmp_path / "precious.key"
    out.write_bytes(b"my only copy\n")
    result = cli("key", "new", "--type", "ec", "--out", out)
    assert result.exit_code == 2
    assert out.read_bytes() == b"my only copy\n"
    assert result.error_lines() == [f"error[usage]: {out} already exists; pass --force to overwrite it"]


def test_key_new_force_overwrites_a_0644_file_and_leaves_it_0600(openssl: str, tmp_path: Path) -> None:
    out = tmp_path / "old.key"
    out.write_bytes(b"old")
    out.chmod(0o644)
    result = cli("key", "new", "--type", "ec", "--force", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert mode(out) == 0o600
    run_tool(openssl, "pkey", "-in", out, "-check", "-noout")


def test_key_new_json_summarises_the_key(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    result = cli("key", "new", "--type", "ec", "--curve", "P-384", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "file": str(out),
        "key": "EC P-384",
        "format": "PKCS#8 PEM",
        "encrypted": False,
    }


def test_key_new_to_stdout_is_a_key_openssl_reads(openssl: str) -> None:
    result = cli("key", "new", "--type", "ec", "--out", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("-----BEGIN PRIVATE KEY-----")
    text = run_tool(openssl, "pkey", "-noout", "-text", input=result.stdout_bytes).stdout.decode()
    assert "NIST CURVE: P-256" in text


# --- twofold csr new ---------------------------------------------------------------------


def test_csr_new_is_verified_by_openssl_and_carries_the_subject(
    openssl: str, tmp_path: Path, rsa_key: Path
) -> None:
    out = tmp_path / "mtls.csr"
    result = cli("csr", "new", "--key", rsa_key, "--subject", SUBJECT, "--out", out)
    assert result.exit_code == 0, result.stderr
    checked = run_tool(openssl, "req", "-in", out, "-verify", "-noout", "-subject", "-nameopt", "compat")
    assert checked.stdout.decode().strip() == f"subject={SUBJECT}"
    assert b"verify OK" in checked.stdout + checked.stderr
    csr_public = openssl_text(openssl, "req", "-in", out, "-noout", "-pubkey")
    assert csr_public == openssl_pubkey_of_key(openssl, rsa_key)
    assert f"wrote CSR for {SUBJECT_RFC4514} to {out}" in result.stderr


def test_csr_new_with_subject_alternative_names(openssl: str, tmp_path: Path) -> None:
    key_path = tmp_path / "ec.key"
    run_tool(openssl, "ecparam", "-genkey", "-name", "prime256v1", "-out", key_path)
    result = cli(
        "csr", "new", "--key", key_path, "--subject", "/O=Acme/CN=acme-cat",
        "--san", "DNS:api.acme.example", "--san", "IP:10.0.0.7", "--san", "email:treasury@acme.example",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    text = run_tool(openssl, "req", "-noout", "-text", input=result.stdout_bytes).stdout.decode()
    assert "DNS:api.acme.example, IP Address:10.0.0.7, email:treasury@acme.example" in text


def _openssl_key(openssl: str, form: str, directory: Path, pass_file: Path) -> tuple[Path, list[object]]:
    """A key in one of the forms openssl writes, and the passphrase options openssl needs for it."""
    passin: list[object] = ["-passin", f"file:{pass_file}"]
    if form == "pkcs1":
        path = directory / "trad.key"
        run_tool(openssl, "genrsa", "-traditional", "-out", path, "2048")
        assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
        return path, []
    if form == "sec1":
        path = directory / "sec1.key"
        run_tool(openssl, "ecparam", "-genkey", "-name", "prime256v1", "-out", path)
        assert b"-----BEGIN EC PRIVATE KEY-----" in path.read_bytes()
        return path, []
    if form in ("sec1-der", "pkcs8-der", "pkcs8-encrypted-der"):
        pem = directory / "p384.pem"
        run_tool(openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", pem)
        path = directory / f"{form}.der"
        if form == "sec1-der":  # what `openssl pkey -outform DER` writes (OpenSSL 3.0)
            run_tool(openssl, "pkey", "-in", pem, "-outform", "DER", "-out", path)
            return path, ["-inform", "DER"]
        if form == "pkcs8-der":
            run_tool(openssl, "pkcs8", "-topk8", "-nocrypt", "-in", pem, "-outform", "DER", "-out", path)
            return path, ["-inform", "DER"]
        run_tool(
            openssl, "pkcs8", "-topk8", "-v2", "aes256", "-in", pem, "-outform", "DER",
            "-passout", f"file:{pass_file}", "-out", path,
        )  # fmt: skip
        return path, ["-inform", "DER", *passin]
    if form in ("pkcs8-encrypted", "pkcs8-encrypted-env", "pkcs8-encrypted-named-env"):
        path = directory / "enc.key"
        run_tool(
            openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-aes256", "-pass", f"file:{pass_file}", "-out", path,
        )  # fmt: skip
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        return path, passin
    assert form == "pkcs12"
    key_path = directory / "for-p12.key"
    crt_path = directory / "for-p12.crt"
    run_tool(openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key_path)
    run_tool(openssl, "req", "-x509", "-key", key_path, "-subj", "/CN=p12", "-days", "2", "-out", crt_path)
    path = directory / "client.p12"
    run_tool(
        openssl, "pkcs12", "-export", "-inkey", key_path, "-in", crt_path,
        "-passout", f"file:{pass_file}", "-out", path,
    )  # fmt: skip
    return key_path, []  # the public key to compare with is the one that went in


@pytest.mark.parametrize(
    "form",
    [
        "pkcs1",
        "sec1",
        "sec1-der",
        "pkcs8-der",
        "pkcs8-encrypted",
        "pkcs8-encrypted-der",
        "pkcs8-encrypted-env",
        "pkcs8-encrypted-named-env",
        "pkcs12",
    ],
)
def test_csr_new_reads_keys_in_the_forms_openssl_writes(
    openssl: str, tmp_path: Path, pass_file: Path, form: str
) -> None:
    key_path, openssl_opts = _openssl_key(openssl, form, tmp_path, pass_file)
    given = tmp_path / "client.p12" if form == "pkcs12" else key_path
    options: list[object] = []
    env: dict[str, str | None] = {}
    if form in ("pkcs8-encrypted", "pkcs8-encrypted-der", "pkcs12"):
        options = ["--passphrase-file", pass_file]
    elif form == "pkcs8-encrypted-env":
        env = {"TWOFOLD_KEY_PASSPHRASE": PASSPHRASE}
    elif form == "pkcs8-encrypted-named-env":
        options = ["--passphrase-env", "ACME_KEY_PASS"]
        env = {"ACME_KEY_PASS": PASSPHRASE}
    out = tmp_path / "req.csr"
    result = cli("csr", "new", "--key", given, "--subject", SUBJECT, "--out", out, *options, env=env)
    assert result.exit_code == 0, result.stderr
    run_tool(openssl, "req", "-in", out, "-verify", "-noout")
    csr_public = openssl_text(openssl, "req", "-in", out, "-noout", "-pubkey")
    assert csr_public == openssl_pubkey_of_key(openssl, key_path, *openssl_opts)


def test_csr_new_with_a_wrong_passphrase_fails_in_one_line(
    openssl: str, tmp_path: Path, pass_file: Path
) -> None:
    key_path, _ = _openssl_key(openssl, "pkcs8-encrypted", tmp_path, pass_file)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("Tr0ub4dor&3\n")
    out = tmp_path / "never.csr"
    result = cli(
        "csr", "new", "--key", key_path, "--subject", SUBJECT, "--passphrase-file", wrong, "--out", out
    )
    assert result.exit_code == 1
    assert result.error_lines() == [
        f"error[key_passphrase_wrong]: the passphrase does not decrypt the private key in {key_path} "
        "(wrong passphrase?)"
    ]
    assert not out.exists()
    # The environment variable is not consulted when a passphrase file is given.
    from_env = cli(
        "csr", "new", "--key", key_path, "--subject", SUBJECT, "--passphrase-file", wrong,
        env={"TWOFOLD_KEY_PASSPHRASE": PASSPHRASE},
    )  # fmt: skip
    assert from_env.exit_code == 1
    assert "key_passphrase_wrong" in from_env.stderr


def test_csr_new_with_an_encrypted_key_and_no_passphrase_says_one_is_needed(
    openssl: str, tmp_path: Path, pass_file: Path
) -> None:
    key_path, _ = _openssl_key(openssl, "pkcs8-encrypted", tmp_path, pass_file)
    result = cli("csr", "new", "--key", key_path, "--subject", SUBJECT)
    assert result.exit_code == 1
    assert result.error_lines() == [
        f"error[key_passphrase_required]: the private key in {key_path} is encrypted: give its passphrase "
        "with --passphrase-file FILE, in the variable TWOFOLD_KEY_PASSPHRASE, or in a variable of your "
        "choice named by --passphrase-env VAR (in a terminal, twofold asks for it)"
    ]


def test_csr_new_with_a_certificate_as_key_names_it_a_certificate(openssl: str, tmp_path: Path) -> None:
    key_path = tmp_path / "k.key"
    crt_path = tmp_path / "mtls.crt"
    run_tool(openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key_path)
    run_tool(
        openssl, "req", "-x509", "-key", key_path, "-subj", "/CN=acme-cat", "-days", "2", "-out", crt_path
    )
    result = cli("csr", "new", "--key", crt_path, "--subject", SUBJECT)
    assert result.exit_code == 1
    lines = result.error_lines()
    assert len(lines) == 1
    assert lines[0].startswith("error[key_not_private]: ")
    assert f"{crt_path} is a certificate, but a private key was expected" in lines[0]
    assert result.stdout == ""


def test_csr_new_with_a_public_key_as_key_is_refused(openssl: str, tmp_path: Path, rsa_key: Path) -> None:
    public = tmp_path / "pub.pem"
    run_tool(openssl, "pkey", "-in", rsa_key, "-pubout", "-out", public)
    result = cli("csr", "new", "--key", public, "--subject", SUBJECT)
    assert result.exit_code == 1
    lines = result.error_lines()
    assert len(lines) == 1
    assert f"{public} is a public key, but a private key was expected" in lines[0]
    assert "a public key cannot sign" in lines[0]


# --- twofold cert selfsign ---------------------------------------------------------------


def test_cert_selfsign_for_mtls_has_client_auth_digital_signature_and_sha256(
    openssl: str, tmp_path: Path, rsa_key: Path
) -> None:
    out = tmp_path / "mtls.crt"
    result = cli("cert", "selfsign", "--key", rsa_key, "--subject", SUBJECT, "--out", out)
    assert result.exit_code == 0, result.stderr
    text = openssl_text(openssl, "x509", "-in", out, "-noout", "-text")
    assert "X509v3 Extended Key Usage: \n                TLS Web Client Authentication\n" in text
    assert "X509v3 Key Usage: critical\n                Digital Signature\n" in text
    assert "Signature Algorithm: sha256WithRSAEncryption" in text
    assert "CA:FALSE" in text
    purposes = openssl_text(openssl, "x509", "-in", out, "-noout", "-purpose")
    assert "SSL client : Yes" in purposes
    subject = openssl_text(openssl, "x509", "-in", out, "-noout", "-subject", "-issuer", "-nameopt", "compat")
    assert subject.splitlines() == [f"subject={SUBJECT}", f"issuer={SUBJECT}"]
    assert openssl_text(openssl, "x509", "-in", out, "-noout", "-pubkey") == openssl_pubkey_of_key(
        openssl, rsa_key
    )
    fingerprint = certs.fingerprint_sha256(certs.load_certificate(out.read_bytes()))
    assert f"SHA-256 {fingerprint}" in result.stderr


def test_cert_selfsign_for_signature_has_no_client_auth_eku(
    openssl: str, tmp_path: Path, rsa_key: Path
) -> None:
    out = tmp_path / "sign.crt"
    result = cli(
        "cert", "selfsign", "--key", rsa_key, "--subject", "/O=Acme/CN=acme-cat-sign", "--use", "signature",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    text = openssl_text(openssl, "x509", "-in", out, "-noout", "-text")
    assert "Extended Key Usage" not in text
    assert "TLS Web Client Authentication" not in text
    assert "Digital Signature, Non Repudiation" in text


def test_cert_selfsign_days_sets_the_validity(openssl: str, tmp_path: Path, rsa_key: Path) -> None:
    out = tmp_path / "short.crt"
    result = cli("cert", "selfsign", "--key", rsa_key, "--subject", "/CN=short", "--days", "30", "--out", out)
    assert result.exit_code == 0, result.stderr
    day = 24 * 3600
    assert run_tool(openssl, "x509", "-in", out, "-noout", "-checkend", 29 * day, check=False).returncode == 0
    assert run_tool(openssl, "x509", "-in", out, "-noout", "-checkend", 31 * day, check=False).returncode == 1


def test_cert_selfsign_with_an_ec_p384_key_signs_with_ecdsa_sha384(openssl: str, tmp_path: Path) -> None:
    key_path = tmp_path / "p384.key"
    run_tool(openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", key_path)
    result = cli("cert", "selfsign", "--key", key_path, "--subject", "/CN=ec384", "--out", "-")
    assert result.exit_code == 0, result.stderr
    text = run_tool(openssl, "x509", "-noout", "-text", input=result.stdout_bytes).stdout.decode()
    assert "Signature Algorithm: ecdsa-with-SHA384" in text


# --- twofold cert show -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_crt(tmp_path_factory: pytest.TempPathFactory, rsa_key: Path) -> Path:
    out = tmp_path_factory.mktemp("show") / "mtls.crt"
    result = cli("cert", "selfsign", "--key", rsa_key, "--subject", SUBJECT, "--out", out)
    assert result.exit_code == 0, result.stderr
    return out


def _openssl_fingerprint(openssl: str, path: Path, digest: str) -> str:
    line = openssl_text(openssl, "x509", "-in", path, "-noout", "-fingerprint", f"-{digest}").strip()
    return line.split("=", 1)[1].replace(":", "")


def _openssl_date(openssl: str, path: Path, which: str) -> dt.datetime:
    line = openssl_text(openssl, "x509", "-in", path, "-noout", f"-{which}").strip()
    return dt.datetime.strptime(line.split("=", 1)[1], "%b %d %H:%M:%S %Y GMT").replace(tzinfo=dt.UTC)


STABLE_KEYS = {
    "subject", "issuer", "serial", "not_before", "not_after", "days_left", "key", "sha256_fingerprint",
    "x5t_s256", "sha1_thumbprint", "self_signed", "warnings", "chain",
}  # fmt: skip


def test_cert_show_json_has_the_stable_keys_and_agrees_with_openssl(openssl: str, mtls_crt: Path) -> None:
    result = cli("cert", "show", "--json", mtls_crt)
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info.keys() >= STABLE_KEYS
    assert info["subject"] == SUBJECT_RFC4514
    assert info["issuer"] == SUBJECT_RFC4514
    rfc2253 = openssl_text(openssl, "x509", "-in", mtls_crt, "-noout", "-subject", "-nameopt", "RFC2253")
    assert rfc2253.strip() == f"subject={info['subject']}"
    serial = openssl_text(openssl, "x509", "-in", mtls_crt, "-noout", "-serial").strip().split("=", 1)[1]
    assert int(info["serial"], 16) == int(serial, 16)
    assert info["sha256_fingerprint"] == _openssl_fingerprint(openssl, mtls_crt, "sha256").lower()
    assert info["sha1_thumbprint"] == _openssl_fingerprint(openssl, mtls_crt, "sha1")
    assert info["sha1_thumbprint"] == info["sha1_thumbprint"].upper()
    der = run_tool(openssl, "x509", "-in", mtls_crt, "-outform", "DER").stdout
    assert info["x5t_s256"] == base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert dt.datetime.fromisoformat(info["not_before"]) == _openssl_date(openssl, mtls_crt, "startdate")
    assert dt.datetime.fromisoformat(info["not_after"]) == _openssl_date(openssl, mtls_crt, "enddate")
    assert info["days_left"] == 365  # valid 365 days from a moment ago: whole days, rounded up
    assert info["key"] == "RSA 2048"
    assert info["self_signed"] is True
    assert info["warnings"] == []
    assert info["chain"] == []


def test_cert_show_text_lists_identity_fingerprints_and_usage(openssl: str, mtls_crt: Path) -> None:
    result = cli("cert", "show", mtls_crt)
    assert result.exit_code == 0, result.stderr
    lines = {
        line.split("  ", 1)[0]: line.split("  ", 1)[1].strip()
        for line in result.stdout.splitlines()
        if "  " in line
    }
    assert lines["Subject"] == SUBJECT_RFC4514
    assert lines["Issuer"] == f"{SUBJECT_RFC4514}  (self-signed)"
    assert lines["SHA-256 fingerprint"] == _openssl_fingerprint(openssl, mtls_crt, "sha256").lower()
    assert lines["SHA-1 thumbprint"] == _openssl_fingerprint(openssl, mtls_crt, "sha1")
    assert lines["Key"] == "RSA 2048"
    assert lines["Signature"] == "sha256WithRSAEncryption"
    assert lines["Extended key usage"] == "clientAuth"
    assert "days left" in lines["Valid"]
    assert "warning" not in result.stdout


def test_cert_show_reads_der_from_stdin(openssl: str, mtls_crt: Path) -> None:
    der = run_tool(openssl, "x509", "-in", mtls_crt, "-outform", "DER").stdout
    result = cli("cert", "show", "--json", "-", input=der)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["sha256_fingerprint"] == hashlib.sha256(der).hexdigest()


def test_cert_show_warns_about_an_expired_certificate(tmp_path: Path) -> None:
    key = keys.generate_private_key("ec")
    ten_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    old = certs.issue_certificate(
        subject="/O=Acme/CN=acme-old",
        public_key=key.public_key(),
        issuer_key=key,
        not_before=ten_days_ago,
        days=1,
    )
    path = tmp_path / "old.crt"
    path.write_bytes(certs.certificate_pem(old))
    expiry = (ten_days_ago + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    text = cli("cert", "show", path)
    assert text.exit_code == 0, text.stderr
    assert f"warning: expired on {expiry}" in text.stdout
    info = json.loads(cli("cert", "show", "--json", path).stdout)
    assert info["warnings"] == [f"expired on {expiry}"]
    assert info["expired"] is True
    assert info["days_left"] < -8


def test_cert_show_warns_about_a_sha1_signed_certificate(openssl: str, tmp_path: Path, rsa_key: Path) -> None:
    path = tmp_path / "sha1.crt"
    run_tool(
        openssl, "req", "-x509", "-sha1", "-key", rsa_key, "-subj", "/CN=legacy", "-days", "365", "-out", path
    )
    assert "sha1WithRSAEncryption" in openssl_text(openssl, "x509", "-in", path, "-noout", "-text")
    info = json.loads(cli("cert", "show", "--json", path).stdout)
    assert info["warnings"] == ["signed with SHA1, which banks refuse; reissue with SHA-256"]
    assert info["signature_algorithm"] == "sha1WithRSAEncryption"
    text = cli("cert", "show", path).stdout
    assert "warning: signed with SHA1, which banks refuse; reissue with SHA-256" in text


def test_cert_show_says_whether_a_sha1_certificate_is_self_signed(
    openssl: str, tmp_path: Path, rsa_key: Path
) -> None:
    """SHA-1 signatures are checked too: the same name as issuer and subject is not enough."""
    own = tmp_path / "own.crt"
    run_tool(
        openssl, "req", "-x509", "-sha1", "-key", rsa_key, "-subj", "/CN=legacy", "-days", "30", "-out", own
    )
    other_key = tmp_path / "other.key"
    run_tool(openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", other_key)
    request = tmp_path / "other.csr"
    run_tool(openssl, "req", "-new", "-key", other_key, "-subj", "/CN=legacy", "-out", request)
    lookalike = tmp_path / "lookalike.crt"
    run_tool(
        openssl, "x509", "-req", "-sha1", "-in", request, "-CA", own, "-CAkey", rsa_key, "-set_serial", "2",
        "-days", "30", "-out", lookalike,
    )  # fmt: skip
    own_info = json.loads(cli("cert", "show", "--json", own).stdout)
    lookalike_info = json.loads(cli("cert", "show", "--json", lookalike).stdout)
    assert own_info["issuer"] == own_info["subject"] == lookalike_info["issuer"] == lookalike_info["subject"]
    assert own_info["self_signed"] is True
    assert lookalike_info["self_signed"] is False
    assert "(self-signed)" in cli("cert", "show", own).stdout
    assert "(self-signed)" not in cli("cert", "show", lookalike).stdout


def test_cert_show_of_a_bundle_shows_each_certificate(openssl: str, tmp_path: Path, mtls_crt: Path) -> None:
    other = tmp_path / "sign.crt"
    key = tmp_path / "sign.key"
    run_tool(openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key)
    run_tool(
        openssl, "req", "-x509", "-key", key, "-subj", "/O=Acme/CN=acme-cat-sign", "-days", "5", "-out", other
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(mtls_crt.read_bytes() + other.read_bytes())
    text = cli("cert", "show", bundle)
    assert text.exit_code == 0, text.stderr
    assert "— certificate 2 of 2 —" in text.stdout
    assert f"Subject               {SUBJECT_RFC4514}" in text.stdout
    assert "Subject               CN=acme-cat-sign,O=Acme" in text.stdout
    assert "warning: expires in 5 days" in text.stdout
    info = json.loads(cli("cert", "show", "--json", bundle).stdout)
    assert info["subject"] == SUBJECT_RFC4514
    assert [c["subject"] for c in info["chain"]] == ["CN=acme-cat-sign,O=Acme"]
    assert info["chain"][0]["sha256_fingerprint"] == _openssl_fingerprint(openssl, other, "sha256").lower()
    assert info["chain"][0]["key"] == "EC P-256"


def test_cert_show_of_a_private_key_says_what_it_is(rsa_key: Path) -> None:
    result = cli("cert", "show", rsa_key)
    assert result.exit_code == 1
    lines = result.error_lines()
    assert len(lines) == 1
    assert f"{rsa_key} is a private key (PKCS#8), but a certificate was expected" in lines[0]


# --- twofold init ------------------------------------------------------------------------


def _public_key_pem(openssl: str, path: Path) -> str:
    if path.suffix == ".key":
        return openssl_pubkey_of_key(openssl, path)
    if path.suffix == ".csr":
        return openssl_text(openssl, "req", "-in", path, "-noout", "-pubkey")
    return openssl_text(openssl, "x509", "-in", path, "-noout", "-pubkey")


def test_init_writes_key_csr_and_certificate_for_mtls_and_for_signing(openssl: str, tmp_path: Path) -> None:
    out = tmp_path / "creds"
    result = cli(
        "init", "--cn", "acme-cat", "--subject", "/C=US/ST=NY/L=New York/O=Acme/OU=Treasury", "--out", out
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "mtls.crt", "mtls.csr", "mtls.key", "sign.crt", "sign.csr", "sign.key",
    ]  # fmt: skip
    for name in ("mtls.key", "sign.key"):
        assert mode(out / name) == 0o600, name
    for name in ("mtls.csr", "mtls.crt", "sign.csr", "sign.crt"):
        assert mode(out / name) == 0o644, name
    publics = {}
    for use in ("mtls", "sign"):
        run_tool(openssl, "pkey", "-in", out / f"{use}.key", "-check", "-noout")
        run_tool(openssl, "req", "-in", out / f"{use}.csr", "-verify", "-noout")
        found = {_public_key_pem(openssl, out / f"{use}.{ext}") for ext in ("key", "csr", "crt")}
        assert len(found) == 1, f"{use}: key, CSR and certificate carry different public keys"
        publics[use] = found.pop()
    assert publics["mtls"] != publics["sign"]
    names = {
        use: openssl_text(
            openssl, "x509", "-in", out / f"{use}.crt", "-noout", "-subject", "-nameopt", "compat"
        )
        for use in ("mtls", "sign")
    }
    assert names["mtls"].strip() == "subject=/C=US/ST=NY/L=New York/O=Acme/OU=Treasury/CN=acme-cat"
    assert names["sign"].strip() == "subject=/C=US/ST=NY/L=New York/O=Acme/OU=Treasury/CN=acme-cat-sign"
    mtls_text = openssl_text(openssl, "x509", "-in", out / "mtls.crt", "-noout", "-text")
    sign_text = openssl_text(openssl, "x509", "-in", out / "sign.crt", "-noout", "-text")
    assert "TLS Web Client Authentication" in mtls_text
    assert "TLS Web Client Authentication" not in sign_text
    assert f"twofold call https://localhost:8443/accessapi/balance --cert {out / 'mtls.crt'}" in result.stdout


def test_init_json_lists_files_and_fingerprints(openssl: str, tmp_path: Path) -> None:
    out = tmp_path / "j"
    result = cli("init", "--cn", "acme-cat", "--type", "ec", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    made = json.loads(result.stdout)
    assert set(made) == {"mtls", "signature"}
    assert made["mtls"]["common_name"] == "acme-cat"
    assert made["signature"]["common_name"] == "acme-cat-sign"
    for use, stem in (("mtls", "mtls"), ("signature", "sign")):
        entry = made[use]
        assert entry["key"] == str(out / f"{stem}.key")
        assert entry["csr"] == str(out / f"{stem}.csr")
        assert entry["certificate"] == str(out / f"{stem}.crt")
        crt = Path(entry["certificate"])
        assert entry["sha256_fingerprint"] == _openssl_fingerprint(openssl, crt, "sha256").lower()
        assert entry["sha1_thumbprint"] == _openssl_fingerprint(openssl, crt, "sha1")
        assert "NIST CURVE: P-256" in openssl_text(openssl, "pkey", "-in", entry["key"], "-noout", "-text")


def test_init_defaults_to_a_directory_named_after_the_cn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("init", "--cn", "acme-cat", "--type", "ec")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "acme-cat" / "mtls.crt").is_file()
    assert (tmp_path / "acme-cat" / "sign.key").is_file()


def test_init_refuses_to_overwrite_existing_credentials(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    assert cli("init", "--cn", "acme-cat", "--type", "ec", "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = cli("init", "--cn", "acme-cat", "--type", "ec", "--out", out)
    assert again.exit_code == 2
    assert "already exists; pass --force" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    forced = cli("init", "--cn", "acme-cat", "--type", "ec", "--out", out, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert (out / "mtls.key").read_bytes() != before["mtls.key"]


def test_init_with_a_passphrase_encrypts_both_keys(openssl: str, tmp_path: Path, pass_file: Path) -> None:
    out = tmp_path / "enc"
    result = cli("init", "--cn", "acme-cat", "--type", "ec", "--out", out, "--passphrase-file", pass_file)
    assert result.exit_code == 0, result.stderr
    for name in ("mtls.key", "sign.key"):
        assert (out / name).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        run_tool(openssl, "pkey", "-in", out / name, "-noout", "-passin", f"file:{pass_file}")


# --- as a user types it -------------------------------------------------------------------


def test_story_init_then_show_then_csr_as_separate_processes(openssl: str, tmp_path: Path) -> None:
    out = tmp_path / "acme-cat"
    made = twofold_subprocess(
        "init", "--cn", "acme-cat", "--subject", "/O=Acme/OU=Treasury", "--out", out, "--json"
    )
    assert made.returncode == 0, made.stderr.decode()
    fingerprint = json.loads(made.stdout)["mtls"]["sha256_fingerprint"]
    shown = twofold_subprocess("cert", "show", "--json", out / "mtls.crt")
    assert shown.returncode == 0, shown.stderr.decode()
    info = json.loads(shown.stdout)
    assert info["sha256_fingerprint"] == fingerprint
    assert info["subject"] == "CN=acme-cat,OU=Treasury,O=Acme"
    csr = twofold_subprocess("csr", "new", "--key", out / "mtls.key", "--subject", SUBJECT)
    assert csr.returncode == 0, csr.stderr.decode()
    run_tool(openssl, "req", "-verify", "-noout", input=csr.stdout)
    refused = twofold_subprocess("key", "new", "--out", out / "mtls.key")
    assert refused.returncode == 2
    assert b"Traceback" not in refused.stderr
    assert refused.stderr.decode().count("\n") == 1
