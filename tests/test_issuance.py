"""Issuance from a CSR by an environment's issuing CA (the registry's policy, on SQLite and
PostgreSQL), and interop of what it issues with `openssl req` CSRs and `openssl verify`."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry_helpers import Org, make_cert, make_org
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA, check_issuing_ca
from twofold.errors import CertificateError
from twofold.registry.auth import SYSTEM
from twofold.registry.rules import Conflict, Forbidden, RegistryError
from twofold.registry.service import Registry

ISSUER = LocalCA("twofold test Production issuing CA")
ISSUER_PEM = certs.certificate_pem(ISSUER.certificate).decode()


def csr_for(
    cn: str, key: keys.PrivateKey | None = None, *, extensions: bool = False, subject: str | None = None
) -> bytes:
    key = key or keys.generate_private_key("ec")
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        certs.parse_subject(subject or f"/C=US/O=Acme/OU=Treasury/CN={cn}/emailAddress=ops@acme.example")
    )
    if extensions:  # what a CSR may ask for and must never get
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]),
            critical=False,
        )
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("bank.example")]), critical=False
        )
    return certs.csr_pem(builder.sign(key, hashes.SHA256()))


@pytest.fixture
async def prod(registry: Registry) -> Registry:
    await registry.save_environment(SYSTEM, "prod", issuing_ca_pem=ISSUER_PEM)
    return registry


@pytest.fixture
async def acme(prod: Registry) -> Org:
    return await make_org(prod, "acme")


async def test_an_issued_certificate_has_the_policy_s_extensions_not_the_csr_s(
    prod: Registry, acme: Org
) -> None:
    row = await prod.issue_certificate(
        acme.security, "prod", "mtls", csr_for("acme-prod", extensions=True), issuer=ISSUER
    )
    cert = certs.load_certificate(row["certificate_pem"].encode())
    assert row["chain_pem"] == ISSUER_PEM
    assert cert.issuer == ISSUER.certificate.subject
    cert.verify_directly_issued_by(ISSUER.certificate)
    # The subject keeps C, O, OU, CN; the e-mail attribute is dropped.
    assert cert.subject.rfc4514_string() == "CN=acme-prod,OU=Treasury,O=Acme,C=US"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not usage.key_encipherment
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # The environment's maximum (Production: 730 days) when no validity is asked for.
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (730, 731)
    # Registered at once, and audited with its serial.
    listed = await prod.list_certificates(acme.security, "prod")
    assert [r["fingerprint"] for r in listed] == [row["fingerprint"]]
    entry = (await prod.audit_entries(SYSTEM, limit=1))[0]
    assert entry["action"] == "certificate.issue"
    assert entry["details"]["serial"] == format(cert.serial_number, "X")
    assert entry["details"]["issuer"] == ISSUER.certificate.subject.rfc4514_string()


async def test_signature_certificates_get_non_repudiation_and_no_eku(prod: Registry, acme: Org) -> None:
    key = keys.generate_private_key("rsa", bits=2048)
    row = await prod.issue_certificate(
        acme.security, "prod", "signature", csr_for("acme-prod-sign", key), issuer=ISSUER, days=30
    )
    cert = certs.load_certificate(row["certificate_pem"].encode())
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.content_commitment
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert row["days_left"] == 30
    assert row["key"] == "RSA 2048"


async def test_a_csr_whose_signature_does_not_verify_is_refused(prod: Registry, acme: Org) -> None:
    """Proof of possession: the CSR's signature, made with the key it carries, must verify."""
    csr = certs.load_csr(csr_for("acme-prod"))
    der = bytearray(csr.public_bytes(certs.serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", bytes(der), issuer=ISSUER)
    assert refused.value.code == "csr_signature_invalid"
    assert await prod.list_certificates(acme.security, "prod") == []


@pytest.mark.parametrize(
    ("make_key", "code"),
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), "key_too_small", id="rsa-1024"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP521R1()), "key_unsupported", id="ec-p521"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), "key_unsupported", id="ec-secp256k1"),
    ],
)
async def test_keys_outside_the_policy_are_refused(
    prod: Registry, acme: Org, make_key: object, code: str
) -> None:
    key = make_key()  # type: ignore[operator]
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-prod", key), issuer=ISSUER)
    assert refused.value.code == code


async def test_ec_p384_is_issued(prod: Registry, acme: Org) -> None:
    key = keys.generate_private_key("ec", curve="P-384")
    row = await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-384", key), issuer=ISSUER)
    assert row["key"] == "EC 384"


async def test_a_common_name_of_another_organisation_is_refused_in_any_environment(
    prod: Registry, acme: Org
) -> None:
    globex = await make_org(prod, "globex")
    await prod.add_certificate(globex.security, "cat", "mtls", make_cert("globex-client").pem)
    for env_cn in ("globex-client", "GLOBEX-CLIENT"):
        with pytest.raises(Conflict) as refused:
            await prod.issue_certificate(acme.security, "prod", "mtls", csr_for(env_cn), issuer=ISSUER)
        assert refused.value.code == "cn_taken"
        assert "globex" not in refused.value.message.replace("GLOBEX-CLIENT", "").replace("globex-client", "")
    # ...and the organisation that uses it gets it.
    row = await prod.issue_certificate(
        globex.security, "prod", "mtls", csr_for("globex-client"), issuer=ISSUER
    )
    assert row["organisation"] == "globex"


async def test_validity_is_at_most_the_environment_s_maximum(prod: Registry, acme: Org) -> None:
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("a1"), issuer=ISSUER, days=731)
    assert refused.value.code == "validity_too_long"
    await prod.save_environment(SYSTEM, "prod", max_validity_days=90)
    assert (await prod.environment("prod"))["max_validity_days"] == 90
    row = await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("a2"), issuer=ISSUER)
    assert row["days_left"] == 90
    short = LocalCA(
        "short-lived CA",
        key=ISSUER.key,
        certificate=certs.self_signed_certificate(ISSUER.key, "/CN=short-lived CA", days=10, usage="ca"),
    )
    await prod.save_environment(
        SYSTEM, "prod", issuing_ca_pem=certs.certificate_pem(short.certificate).decode()
    )
    row = await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("a3"), issuer=short)
    assert row["days_left"] <= 10  # never past the CA's own expiry
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("a4"), issuer=short, days=30)
    assert refused.value.code == "validity_beyond_ca"


async def test_who_may_request_and_where(prod: Registry, acme: Org) -> None:
    with pytest.raises(Forbidden):
        await prod.issue_certificate(acme.developer, "prod", "mtls", csr_for("acme-x"), issuer=ISSUER)
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "cat", "mtls", csr_for("acme-x"), issuer=ISSUER)
    assert refused.value.code == "environment_not_issuing"
    other = LocalCA("not the registry's CA")
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-x"), issuer=other)
    assert (refused.value.code, refused.value.status) == ("issuer_unavailable", 503)
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-x"), issuer=None)
    assert refused.value.code == "issuer_unavailable"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(
            keys.private_key_bytes(keys.generate_private_key("ec")), "private_key_uploaded", id="key"
        ),
        pytest.param(make_cert("x").pem, "not_a_csr", id="certificate"),
        pytest.param(b"   \n", "empty_file", id="empty"),
        pytest.param(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not_a_csr",
            id="damaged",
        ),
        pytest.param(csr_for("", subject="/O=Acme"), "no_common_name", id="no-cn"),
    ],
)
async def test_what_is_not_a_usable_csr_is_refused(prod: Registry, acme: Org, data: bytes, code: str) -> None:
    with pytest.raises(RegistryError) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", data, issuer=ISSUER)
    assert refused.value.code == code
    assert await prod.list_certificates(acme.security, "prod") == []


async def test_the_counting_rules_hold_for_issued_certificates(prod: Registry, acme: Org) -> None:
    for _ in range(2):
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-prod"), issuer=ISSUER)
    with pytest.raises(Conflict) as refused:
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-prod"), issuer=ISSUER)
    assert refused.value.code == "mtls_cn_limit"
    key = keys.generate_private_key("ec")
    await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-other", key), issuer=ISSUER)
    with pytest.raises(Conflict) as refused:  # one key, one certificate
        await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-third", key), issuer=ISSUER)
    assert refused.value.code == "public_key_reused"


async def test_the_registry_names_the_issuing_ca_and_trusts_it(prod: Registry, acme: Org) -> None:
    env = await prod.environment("prod")
    assert env["issues_certificates"] is True
    assert env["issuing_ca"] == ISSUER.certificate.subject.rfc4514_string()
    # A certificate the issuing CA issued elsewhere (e.g. by the CLI) uploads like any CA-issued one.
    uploaded = await prod.add_certificate(
        acme.security, "prod", "mtls", make_cert("acme-upload", ca=ISSUER).pem
    )
    assert uploaded["self_signed"] is False
    with pytest.raises(RegistryError) as refused:
        await prod.add_certificate(acme.security, "prod", "mtls", make_cert("acme-self").pem)
    assert refused.value.code == "self_signed_not_allowed"
    await prod.save_environment(SYSTEM, "prod", issuing_ca_pem="")
    assert (await prod.environment("prod"))["issues_certificates"] is False


async def test_downloads_give_the_certificate_and_its_chain(prod: Registry, acme: Org) -> None:
    row = await prod.issue_certificate(acme.security, "prod", "mtls", csr_for("acme-dl"), issuer=ISSUER)
    got = await prod.certificate_pem(acme.developer, row["fingerprint"])
    assert got == {
        "common_name": "acme-dl",
        "certificate_pem": row["certificate_pem"],
        "chain_pem": ISSUER_PEM,
    }
    globex = await make_org(prod, "globex")
    with pytest.raises(RegistryError) as refused:
        await prod.certificate_pem(globex.security, row["fingerprint"])
    assert refused.value.code == "certificate_not_found"


# --- the crypto layer, and interop with openssl ------------------------------------------------------


def test_an_issuing_ca_must_be_a_ca_whose_key_matches() -> None:
    check_issuing_ca(ISSUER.key, ISSUER.certificate)
    with pytest.raises(CertificateError) as refused:
        check_issuing_ca(keys.generate_private_key("ec"), ISSUER.certificate)
    assert refused.value.code == "key_cert_mismatch"
    leaf = ISSUER.issue("not-a-ca")
    with pytest.raises(CertificateError) as refused:
        check_issuing_ca(leaf.key, leaf.certificate)
    assert refused.value.code == "ca_invalid"


async def test_an_openssl_csr_is_issued_and_openssl_verifies_the_result(
    prod: Registry, acme: Org, openssl: str, tmp_path: Path
) -> None:
    key_path, csr_path = tmp_path / "mtls.key", tmp_path / "mtls.csr"
    subprocess.run(
        [openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_path),
         "-subj", "/C=US/O=Acme/CN=acme-openssl", "-out", str(csr_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    row = await prod.issue_certificate(acme.security, "prod", "mtls", csr_path.read_bytes(), issuer=ISSUER)
    (tmp_path / "cert.pem").write_text(row["certificate_pem"])
    (tmp_path / "ca.pem").write_text(row["chain_pem"])
    verified = subprocess.run(
        [openssl, "verify", "-CAfile", str(tmp_path / "ca.pem"), "-purpose", "sslclient", str(tmp_path / "cert.pem")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip().endswith(": OK")
    # The issued certificate belongs to the key openssl made.
    issued = certs.load_certificate(row["certificate_pem"].encode())
    key = keys.load_private_key(key_path.read_bytes())
    assert keys.public_key_bytes(key) == keys.public_key_bytes(issued.public_key())  # type: ignore[arg-type]
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "acme-openssl"


def test_sign_csr_takes_the_clock_it_is_given() -> None:
    now = dt.datetime(2031, 5, 1, tzinfo=dt.UTC)
    csr = certs.load_csr(csr_for("acme-clock"))
    cert = ISSUER.sign_csr(csr, subject=csr.subject, usage="client", days=10, now=now)
    assert cert.not_valid_after_utc == now + dt.timedelta(days=10)


async def test_migration_0004_upgrades_an_existing_registry(registry_url: str) -> None:
    """A registry at 0002 with its environments gets issuing CAs off and the bank's maximum
    validity: a year where self-signed certificates are taken, two years elsewhere."""
    import asyncio

    from alembic import command
    from sqlalchemy import text

    from twofold.registry.db import alembic_config, create_engine, migrate_async

    await asyncio.to_thread(command.upgrade, alembic_config(registry_url), "0002")
    engine = create_engine(registry_url)
    try:
        async with engine.begin() as conn:
            for env_id, self_signed in (("cat", True), ("prod", False), ("uat", True)):
                await conn.execute(
                    text(
                        "INSERT INTO environments (id, name, allow_self_signed, position) "
                        "VALUES (:id, :id, :self_signed, 1)"
                    ),
                    {"id": env_id, "self_signed": self_signed},
                )
        await migrate_async(registry_url)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT id, max_validity_days, issuing_ca_pem FROM environments ORDER BY id")
                )
            ).all()
    finally:
        await engine.dispose()
    assert [tuple(r) for r in rows] == [("cat", 365, None), ("prod", 730, None), ("uat", 365, None)]


async def test_a_der_csr_is_issued_like_a_pem_one(prod: Registry, acme: Org) -> None:
    der = certs.load_csr(csr_for("acme-der")).public_bytes(certs.serialization.Encoding.DER)
    row = await prod.issue_certificate(acme.security, "prod", "mtls", der, issuer=ISSUER)
    assert row["common_name"] == "acme-der"
