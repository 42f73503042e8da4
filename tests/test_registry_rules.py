"""The certificate rules, as an organisation's API Security user meets them on the Security
page — on SQLite and on PostgreSQL (the `registry` fixture runs each test on both).

Every refusal must carry its stable code and a message a developer can act on, and must
leave the registry exactly as it was: same certificates, same audit log, same version.
"""

from __future__ import annotations

import logging
import os
import subprocess
import traceback
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from registry_helpers import (
    Cert,
    active_certs,
    cn_attr,
    cn_owner,
    database_dump,
    ec_key,
    expired_cert,
    make_cert,
    make_org,
    not_yet_valid_cert,
    openssl_cert,
    pem_chain,
    private_key_uploads,
    refused,
    rsa_cert,
    secret_needles,
    snapshot,
)
from twofold.crypto import certs
from twofold.crypto.ca import LocalCA
from twofold.registry.auth import SYSTEM
from twofold.registry.models import Certificate
from twofold.registry.rules import MAX_UPLOAD
from twofold.registry.service import Registry

pytestmark = pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")


async def mtls_count(reg: Registry, cn: str, env: str = "cat") -> int:
    return len(
        await active_certs(
            reg,
            Certificate.use == "mtls",
            Certificate.environment_id == env,
            Certificate.cn_key == cn.casefold(),
        )
    )


# --- two mTLS certificates per Common Name --------------------------------------------------


async def test_a_third_mtls_certificate_with_the_same_cn_is_refused_and_two_stay(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    first = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    second = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    assert (first["common_name"], second["common_name"]) == ("acme-client", "acme-client")
    assert first["fingerprint"] != second["fingerprint"]

    error = await refused(
        registry, registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    )
    assert error.code == "mtls_cn_limit"
    assert error.status == 409
    assert "at most two mTLS certificates" in error.message
    assert "acme-client" in error.message
    assert await mtls_count(registry, "acme-client") == 2
    listed = await registry.list_certificates(acme.security, "cat")
    assert sorted(c["fingerprint"] for c in listed) == sorted([first["fingerprint"], second["fingerprint"]])


async def test_common_names_are_compared_without_regard_to_case(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("Acme-Client").pem)
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    error = await refused(
        registry, registry.add_certificate(acme.security, "cat", "mtls", make_cert("ACME-CLIENT").pem)
    )
    assert error.code == "mtls_cn_limit"
    names = sorted(c["common_name"] for c in await registry.list_certificates(acme.security, "cat"))
    assert names == ["Acme-Client", "acme-client"]  # shown as issued, compared case-folded


async def test_a_cn_belongs_to_one_organisation_per_environment(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    await registry.save_environment(SYSTEM, "uat", name="User Acceptance", allow_self_signed=True)
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("shared-name").pem)

    error = await refused(
        registry, registry.add_certificate(globex.security, "cat", "mtls", make_cert("Shared-Name").pem)
    )
    assert error.code == "cn_taken"
    assert "belongs to another organisation" in error.message
    assert "acme" not in error.message.lower()  # the owner is not disclosed to another organisation

    # Another environment is independent: globex may use the name there, and then acme may not.
    await registry.add_certificate(globex.security, "uat", "mtls", make_cert("shared-name").pem)
    error = await refused(
        registry, registry.add_certificate(acme.security, "uat", "mtls", make_cert("shared-name").pem)
    )
    assert error.code == "cn_taken"
    assert await cn_owner(registry, "cat", "shared-name") == acme.id
    assert await cn_owner(registry, "uat", "shared-name") == globex.id


async def test_after_removing_one_of_two_a_new_certificate_can_be_added(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    first = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("rotate-me").pem)
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("rotate-me").pem)
    assert (
        await refused(
            registry, registry.add_certificate(acme.security, "cat", "mtls", make_cert("rotate-me").pem)
        )
    ).code == "mtls_cn_limit"

    removed = await registry.remove_certificate(acme.security, "cat", first["fingerprint"])
    assert removed["status"] == "removed"
    assert removed["removed_by"] == acme.security.name
    third = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("rotate-me").pem)
    assert await mtls_count(registry, "rotate-me") == 2
    assert third["fingerprint"] in {
        c["fingerprint"] for c in await registry.list_certificates(acme.security, "cat")
    }
    history = await registry.list_certificates(acme.security, "cat", include_removed=True)
    assert [c["status"] for c in history].count("removed") == 1


async def test_a_cn_freed_by_removing_all_its_certificates_can_be_claimed_by_another_org(
    registry: Registry,
) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    only = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("moving-name").pem)
    await registry.remove_certificate(acme.security, "cat", only["fingerprint"])
    assert await cn_owner(registry, "cat", "moving-name") is None
    await registry.add_certificate(globex.security, "cat", "mtls", make_cert("moving-name").pem)
    assert await cn_owner(registry, "cat", "moving-name") == globex.id


# --- two Digital Signature certificates per organisation and environment ---------------------


async def test_a_third_signature_certificate_of_an_org_is_refused_but_another_org_has_its_own_two(
    registry: Registry,
) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    for cn in ("acme-sign-1", "acme-sign-2"):
        await registry.add_certificate(
            acme.security, "cat", "signature", make_cert(cn, usage="signature").pem
        )
    error = await refused(
        registry,
        registry.add_certificate(
            acme.security, "cat", "signature", make_cert("acme-sign-3", usage="signature").pem
        ),
    )
    assert error.code == "signature_limit"
    assert "at most two Digital Signature certificates" in error.message

    for cn in ("globex-sign-1", "globex-sign-2"):
        await registry.add_certificate(
            globex.security, "cat", "signature", make_cert(cn, usage="signature").pem
        )
    sig = Certificate.use == "signature"
    assert len(await active_certs(registry, sig, Certificate.org_id == acme.id)) == 2
    assert len(await active_certs(registry, sig, Certificate.org_id == globex.id)) == 2


async def test_the_signature_limit_counts_per_environment_and_not_mtls(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    await registry.save_environment(SYSTEM, "uat", name="User Acceptance", allow_self_signed=True)
    for env in ("cat", "uat"):
        for i in (1, 2):
            await registry.add_certificate(
                acme.security, env, "signature", make_cert(f"sign-{env}-{i}", usage="signature").pem
            )
    # mTLS certificates have their own rule; two signature certificates do not block them.
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    assert len(await active_certs(registry, Certificate.org_id == acme.id)) == 5


# --- a certificate and a key pair are registered once -----------------------------------------


async def test_the_same_certificate_twice_is_refused(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    cert = make_cert("acme-client")
    await registry.add_certificate(acme.security, "cat", "mtls", cert.pem)
    for data, use in ((cert.pem, "mtls"), (cert.der, "mtls"), (cert.pem, "signature")):
        error = await refused(registry, registry.add_certificate(acme.security, "cat", use, data))
        assert error.code == "certificate_duplicate"


async def test_the_same_public_key_in_a_new_certificate_is_refused(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    key = ec_key()
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client", key=key).pem)
    renewed = make_cert("acme-client-2", key=key)
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", renewed.pem))
    assert error.code == "public_key_reused"
    assert "own key pair" in error.message
    # Not as another use, not by another organisation either.
    error = await refused(
        registry,
        registry.add_certificate(
            globex.security, "cat", "signature", make_cert("globex-sign", key=key, usage="signature").pem
        ),
    )
    assert error.code == "public_key_reused"


# --- what the file itself must be --------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "use", "code", "says"),
    [
        pytest.param(lambda: expired_cert("old"), "mtls", "certificate_expired", "expired", id="expired"),
        pytest.param(
            lambda: not_yet_valid_cert("future"),
            "mtls",
            "certificate_not_yet_valid",
            "not valid before",
            id="not-yet-valid",
        ),
        pytest.param(lambda: rsa_cert("small", 1024), "mtls", "key_too_small", "1024 bits", id="rsa-1024"),
        pytest.param(
            lambda: make_cert("server-only", usage="server"),
            "mtls",
            "eku_missing_client_auth",
            "clientAuth",
            id="eku-server-only",
        ),
    ],
)
async def test_unacceptable_certificates_are_refused_with_a_clear_reason(
    registry: Registry, build: object, use: str, code: str, says: str
) -> None:
    acme = await make_org(registry, "acme")
    cert = build()  # type: ignore[operator]
    error = await refused(registry, registry.add_certificate(acme.security, "cat", use, cert.pem))
    assert (error.code, error.status) == (code, 400)
    assert says in error.message


async def test_rsa_2048_is_accepted(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    added = await registry.add_certificate(acme.security, "cat", "mtls", rsa_cert("rsa-client", 2048).pem)
    assert added["key"] == "RSA 2048"


async def test_a_server_only_certificate_is_refused_for_mtls_but_accepted_for_signatures(
    registry: Registry,
) -> None:
    acme = await make_org(registry, "acme")
    cert = make_cert("server-eku", usage="server")
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", cert.pem))
    assert error.code == "eku_missing_client_auth"
    added = await registry.add_certificate(acme.security, "cat", "signature", cert.pem)
    assert added["use"] == "signature"
    assert added["fingerprint"] == cert.fingerprint


@pytest.mark.parametrize(("digest", "key"), [("sha1", "ec"), ("md5", "rsa")])
async def test_certificates_signed_with_sha1_or_md5_are_refused(
    registry: Registry, openssl: str, tmp_path: Path, digest: str, key: str
) -> None:
    acme = await make_org(registry, "acme")
    pem = openssl_cert(openssl, tmp_path, f"weak-{digest}", digest=digest, key=key)
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", pem))
    assert error.code == "weak_signature"
    assert digest.upper() in error.message
    assert "SHA-256" in error.message


async def test_an_openssl_made_sha256_certificate_is_accepted(
    registry: Registry, openssl: str, tmp_path: Path
) -> None:
    """The control for the SHA-1 case: the same openssl command with -sha256 passes."""
    acme = await make_org(registry, "acme")
    pem = openssl_cert(openssl, tmp_path, "openssl-made", digest="sha256")
    assert (await registry.add_certificate(acme.security, "cat", "mtls", pem))[
        "common_name"
    ] == "openssl-made"


# --- production: CA-issued only ------------------------------------------------------------------


async def test_production_refuses_self_signed_certificates(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    error = await refused(
        registry, registry.add_certificate(acme.security, "prod", "mtls", make_cert("acme-prod").pem)
    )
    assert error.code == "self_signed_not_allowed"
    assert "Production" in error.message
    assert "certificate authority" in error.message


async def test_production_accepts_its_ca_and_refuses_others(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    bank_ca, other_ca = LocalCA("Bank Issuing CA"), LocalCA("Someone Else CA")

    # No CA configured yet: nothing CA-issued can be trusted either.
    error = await refused(
        registry,
        registry.add_certificate(acme.security, "prod", "mtls", make_cert("acme-prod", ca=bank_ca).pem),
    )
    assert error.code == "untrusted_issuer"

    await registry.save_environment(
        SYSTEM, "prod", ca_pem=certs.certificate_pem(bank_ca.certificate).decode()
    )
    added = await registry.add_certificate(
        acme.security, "prod", "mtls", make_cert("acme-prod", ca=bank_ca).pem
    )
    assert added["self_signed"] is False
    assert "Bank Issuing CA" in added["issuer"]
    added = await registry.add_certificate(
        acme.security, "prod", "signature", make_cert("acme-prod-sign", ca=bank_ca, usage="signature").pem
    )
    assert added["use"] == "signature"

    error = await refused(
        registry,
        registry.add_certificate(acme.security, "prod", "mtls", make_cert("acme-prod-2", ca=other_ca).pem),
    )
    assert error.code == "untrusted_issuer"
    assert "Someone Else CA" in error.message

    # A certificate naming the bank's CA as issuer but signed by another key is not the bank's.
    impostor = LocalCA("Bank Issuing CA")
    error = await refused(
        registry,
        registry.add_certificate(acme.security, "prod", "mtls", make_cert("acme-prod-3", ca=impostor).pem),
    )
    assert error.code == "untrusted_issuer"
    error = await refused(
        registry, registry.add_certificate(acme.security, "prod", "mtls", make_cert("acme-prod-4").pem)
    )
    assert error.code == "self_signed_not_allowed"


# --- what the registry cannot store is refused the same way on every backend --------------------


def _name(*attributes: x509.NameAttribute) -> x509.Name:
    return x509.Name(list(attributes))


@pytest.mark.filterwarnings("ignore:Attribute's length must be")
async def test_overlong_names_are_refused_cleanly_on_every_backend(registry: Registry) -> None:
    """PostgreSQL enforces column sizes, SQLite does not: without a check in the rules a long
    but well-formed subject was accepted on one backend and a raw database error on the other."""
    acme = await make_org(registry, "acme")
    units = [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"unit {i:02} " + "x" * 50) for i in range(20)
    ]
    long_subject = make_cert_named(_name(*units, cn_attr("long-subject")))
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", long_subject))
    assert error.code == "name_too_long"
    assert "subject" in error.message

    long_cn = make_cert_named(_name(x509.NameAttribute(NameOID.COMMON_NAME, "c" * 65, _validate=False)))
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", long_cn))
    assert error.code == "common_name_too_long"
    assert "65 characters" in error.message

    ca_key = ec_key()
    long_ca = LocalCA(
        key=ca_key,
        certificate=certs.self_signed_certificate(ca_key, _name(*units, cn_attr("CA")), usage="ca"),
    )
    error = await refused(
        registry, registry.add_certificate(acme.security, "cat", "mtls", make_cert("x", ca=long_ca).pem)
    )
    assert error.code == "name_too_long"
    assert "issuer" in error.message

    longest = "n" * 64
    added = await registry.add_certificate(acme.security, "cat", "mtls", make_cert(longest).pem)
    assert added["common_name"] == longest


async def test_an_overlong_serial_number_is_refused_cleanly(
    registry: Registry, openssl: str, tmp_path: Path
) -> None:
    acme = await make_org(registry, "acme")
    key, out = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", out, "-subj", "/CN=long-serial", "-days", "30",
         "-set_serial", "0x" + "7f" * 60],
        check=True, capture_output=True,
    )  # fmt: skip
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", out.read_bytes()))
    assert error.code == "serial_too_long"
    assert "60 bytes" in error.message


# --- files that are not one certificate ---------------------------------------------------------


async def test_an_empty_file_is_refused(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    for data in (b"", b"\n  \r\n"):
        error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", data))
        assert error.code == "empty_file"


async def test_ten_megabytes_of_random_bytes_are_refused_as_too_large(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    error = await refused(
        registry, registry.add_certificate(acme.security, "cat", "mtls", os.urandom(10 * 1024 * 1024))
    )
    assert (error.code, error.status) == ("file_too_large", 413)
    assert "10,485,760 bytes" in error.message
    just_over = make_cert("big").pem + b"\n" * MAX_UPLOAD
    assert (
        await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", just_over))
    ).code == "file_too_large"


async def test_a_chain_of_several_certificates_is_refused(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    ca = LocalCA("Chain CA")
    leaf = make_cert("acme-leaf", ca=ca)
    for bundle, n in (
        (pem_chain(leaf, ca.certificate), 2),
        (pem_chain(leaf, ca.certificate, make_cert("x")), 3),
    ):
        error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", bundle))
        assert error.code == "certificate_chain"
        assert f"holds {n} certificates" in error.message
        assert "leaf" in error.message


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"this is not a certificate\n", id="text"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            id="bad-pem",
        ),
        pytest.param(bytes(range(256)) * 4, id="binary"),
    ],
)
async def test_garbage_is_refused_as_not_a_certificate(registry: Registry, data: bytes) -> None:
    acme = await make_org(registry, "acme")
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", data))
    assert error.code == "not_a_certificate"
    assert "certificate" in error.message


async def test_a_certificate_signing_request_is_refused_as_not_a_certificate(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    csr = certs.csr_pem(certs.build_csr(ec_key(), "/CN=acme-client"))
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", csr))
    assert error.code == "not_a_certificate"
    assert "signing request" in error.message


async def test_a_der_certificate_is_accepted(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    cert = make_cert("der-client")
    added = await registry.add_certificate(acme.security, "cat", "mtls", cert.der)
    assert added["fingerprint"] == cert.fingerprint


# --- private keys: refused, the user warned, nothing of the key kept -------------------------------


@pytest.mark.parametrize(
    "form",
    [
        "pem-pkcs8",
        "der-pkcs8",
        "pem-pkcs8-encrypted",
        "der-pkcs8-encrypted",
        "pem-traditional",
        "pem-openssh",
        "pem-certificate-then-key",
        "pkcs12-encrypted",
        "pkcs12-unencrypted",
    ],
)
async def test_a_private_key_is_refused_and_nothing_of_it_is_stored_or_logged(
    registry: Registry, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    acme = await make_org(registry, "acme")
    cert = make_cert("acme-client")
    upload = private_key_uploads(cert)[form]
    needles = secret_needles(cert.key, upload)
    assert await _contains_any(registry, needles) == [], "the test's needles are not specific"

    caplog.set_level(logging.DEBUG)
    for use in ("mtls", "signature"):
        error = await refused(registry, registry.add_certificate(acme.security, "cat", use, upload))
        assert error.code == "private_key_uploaded"
        assert "PRIVATE KEY" in error.message
        assert "treat this key as exposed" in error.message
        assert "Nothing was stored" in error.message
        # What a portal would show or log, traceback included.
        shown = f"{error!r} {error.to_dict()} {''.join(traceback.format_exception(error))}".encode()
        assert not [n for n in needles if n in shown]

    assert await _contains_any(registry, needles) == []
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records).encode()
    assert not [n for n in needles if n in logged]


async def test_a_pkcs12_bundle_made_by_openssl_is_refused_as_a_private_key(
    registry: Registry, openssl: str, tmp_path: Path
) -> None:
    acme = await make_org(registry, "acme")
    cert = make_cert("acme-client")
    (tmp_path / "c.pem").write_bytes(cert.pem)
    (tmp_path / "k.pem").write_bytes(private_key_uploads(cert)["pem-pkcs8"])
    subprocess.run(
        [openssl, "pkcs12", "-export", "-in", tmp_path / "c.pem", "-inkey", tmp_path / "k.pem",
         "-out", tmp_path / "client.p12", "-passout", "pass:secret"],
        check=True, capture_output=True,
    )  # fmt: skip
    upload = (tmp_path / "client.p12").read_bytes()
    error = await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", upload))
    assert error.code == "private_key_uploaded"
    assert "treat this key as exposed" in error.message
    assert await _contains_any(registry, secret_needles(cert.key, upload)) == []


async def _contains_any(registry: Registry, needles: list[bytes]) -> list[bytes]:
    dump = await database_dump(registry)
    assert len(dump) > 1000  # the dump really holds the database
    return [n for n in needles if n in dump]


async def test_the_private_key_check_looks_at_the_database_it_claims_to(registry: Registry) -> None:
    """The control for the test above: a certificate that *is* stored is found by the same search."""
    acme = await make_org(registry, "acme")
    cert = make_cert("acme-client")
    await registry.add_certificate(acme.security, "cat", "mtls", cert.pem)
    found = await _contains_any(registry, [cert.der[-32:], cert.fingerprint.encode()])
    assert len(found) == 2


async def test_a_refusal_leaves_no_row_even_after_accepted_uploads(registry: Registry) -> None:
    """Refusals in the middle of a session of uploads change nothing; accepted ones each add
    exactly one certificate and one audit entry."""
    acme = await make_org(registry, "acme")
    before = await snapshot(registry)
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("a").pem)
    await refused(registry, registry.add_certificate(acme.security, "cat", "mtls", expired_cert("b").pem))
    await registry.add_certificate(acme.security, "cat", "signature", make_cert("c", usage="signature").pem)
    after = await snapshot(registry)
    assert after.certificates == before.certificates + 2
    assert after.audit == before.audit + 2
    assert after.version == before.version + 2


async def test_an_unknown_use_or_environment_is_refused(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    pem = make_cert("acme-client").pem
    assert (
        await refused(registry, registry.add_certificate(acme.security, "cat", "tls", pem))
    ).code == "use_invalid"
    assert (
        await refused(registry, registry.add_certificate(acme.security, "nope", "mtls", pem))
    ).code == "environment_not_found"


def make_cert_named(name: x509.Name) -> bytes:
    key = ec_key()
    return certs.certificate_pem(
        certs.issue_certificate(subject=name, public_key=key.public_key(), issuer_key=key)
    )


def test_cert_helper_sanity() -> None:
    """The builders make what their names say (so the refusals above are for the right reason)."""
    c: Cert = make_cert("x", usage="server")
    assert not certs.allows_client_auth(c.certificate)
    assert certs.allows_client_auth(make_cert("x", usage="signature").certificate)
    assert expired_cert("x").certificate.not_valid_after_utc < make_cert("x").certificate.not_valid_before_utc
    assert certs.is_self_signed(make_cert("x").certificate)
    assert not certs.is_self_signed(make_cert("x", ca=LocalCA()).certificate)
