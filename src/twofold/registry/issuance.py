"""Issuance from a CSR by an environment's issuing CA: the policy, and registration of the
issued certificate under the same counting rules as an upload.

The policy, decided here and never by the CSR: the CSR's signature must verify (proof of
possession of the key); the key is RSA of 2048 bits or more, or EC P-256/P-384; the subject
keeps only C, ST, L, O, OU and CN, and the CN must not be in use by another organisation
(in any environment: the CA vouches for the name); validity is at most the environment's
maximum (and never beyond the CA's own); key usage and extended key usage are those of
the certificate use (MTLS: digitalSignature + clientAuth; Digital Signature:
digitalSignature + nonRepudiation) — no extension of the CSR is copied.

The CA's private key is not in the registry: the caller hands over an issuer
(:class:`twofold.crypto.ca.LocalCA`) that the portal loaded from its data directory.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.crypto import _pem, certs
from twofold.crypto.ca import LocalCA, csr_public_key
from twofold.errors import TwofoldError
from twofold.registry.auth import Principal
from twofold.registry.catalogue import environment_cas
from twofold.registry.certificates import CertificatesMixin
from twofold.registry.models import Certificate, CnOwner, Environment, utcnow
from twofold.registry.rules import (
    MAX_COMMON_NAME,
    MAX_NAME,
    MAX_UPLOAD,
    USES,
    Conflict,
    Forbidden,
    NotFound,
    RegistryError,
    cn_key,
    inspect_upload,
)

# What a CSR's subject may carry into an issued certificate, in this order of significance.
SUBJECT_ATTRIBUTES = (
    NameOID.COUNTRY_NAME,
    NameOID.STATE_OR_PROVINCE_NAME,
    NameOID.LOCALITY_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.COMMON_NAME,
)
ISSUABLE_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
MAX_RSA_BITS = 8192


@dataclass(frozen=True)
class CSRFacts:
    csr: x509.CertificateSigningRequest
    subject: x509.Name  # what the issued certificate will name
    common_name: str
    cn_key: str
    key: str  # "RSA 2048", "EC P-256"


def inspect_csr(data: bytes) -> CSRFacts:
    """Accept a CSR (PEM or DER) for issuance, or raise a RegistryError saying what to do."""
    if not data.strip():
        raise RegistryError("the file is empty; choose the CSR file (.csr or .pem)", code="empty_file")
    if _pem.looks_like_private_key(data):
        raise RegistryError(
            "this file contains a PRIVATE KEY. Nothing was stored. Never upload private keys: treat "
            "this key as exposed — generate a new key pair and CSR, and upload only the CSR (the file "
            "starting with -----BEGIN CERTIFICATE REQUEST-----)",
            code="private_key_uploaded",
        )
    if len(data) > MAX_UPLOAD:
        raise RegistryError(
            f"the file is {len(data):,} bytes; a CSR is a few KB — choose the CSR file",
            code="file_too_large",
            status=413,
        )
    try:
        csr = certs.load_csr(data, name="the file")
    except TwofoldError as error:
        raise RegistryError(
            error.message + "; make one with `twofold csr new` or `openssl req -new`", code="not_a_csr"
        ) from None
    try:
        public = csr_public_key(csr)
    except TwofoldError as error:
        raise RegistryError(error.message, code=error.code) from None
    if isinstance(public, rsa.RSAPublicKey):
        if not 2048 <= public.key_size <= MAX_RSA_BITS:
            raise RegistryError(
                f"the CSR has an RSA key of {public.key_size} bits; use 2048 to {MAX_RSA_BITS} bits",
                code="key_too_small" if public.key_size < 2048 else "key_unsupported",
            )
        key = f"RSA {public.key_size}"
    elif isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in ISSUABLE_CURVES:
        key = f"EC {ISSUABLE_CURVES[public.curve.name]}"
    else:
        raise RegistryError(
            "the CSR's key type is not issued for; use RSA (2048 bits or more) or EC P-256/P-384",
            code="key_unsupported",
        )
    try:
        digest = csr.signature_hash_algorithm
    except Exception:
        digest = None
    if digest is None or digest.name.upper() in ("SHA1", "MD5"):
        raise RegistryError(
            "the CSR is signed with a weak or unknown hash; make it again with SHA-256 (openssl req -sha256)",
            code="weak_signature",
        )
    kept = [a for oid in SUBJECT_ATTRIBUTES for a in csr.subject.get_attributes_for_oid(oid)]
    common_name = certs.common_name(csr.subject)
    if not common_name or not common_name.strip():
        raise RegistryError(
            "the CSR has no Common Name (CN) in its subject; make it with -subj '/O=…/CN=name'",
            code="no_common_name",
        )
    if len(common_name.strip()) > MAX_COMMON_NAME:
        raise RegistryError(
            f"the CSR's Common Name is {len(common_name.strip())} characters long; X.509 allows at most "
            f"{MAX_COMMON_NAME}",
            code="common_name_too_long",
        )
    subject = x509.Name(kept)
    if len(subject.rfc4514_string()) > MAX_NAME:
        raise RegistryError(
            f"the CSR's subject is longer than {MAX_NAME:,} characters; shorten it", code="name_too_long"
        )
    return CSRFacts(csr, subject, common_name.strip(), cn_key(common_name), key)


def validity_days(env: Environment, requested: int | None, ca: x509.Certificate, now: dt.datetime) -> int:
    """The validity to issue for: what was asked (default: the environment's maximum), never
    beyond the maximum nor past the CA's own expiry."""
    maximum = env.max_validity_days
    if requested is not None and not 1 <= requested <= maximum:
        raise RegistryError(
            f"{env.name} issues certificates for at most {maximum} days; ask for {maximum} or fewer",
            code="validity_too_long" if requested > maximum else "validity_invalid",
        )
    days = requested or maximum
    ca_left = (ca.not_valid_after_utc - now) // dt.timedelta(days=1)
    if days > ca_left:
        if requested is not None or ca_left < 1:
            raise RegistryError(
                f"the issuing CA of {env.name} expires on {ca.not_valid_after_utc:%Y-%m-%d}, in {ca_left} "
                "days: ask for fewer days, or ask the platform operator to renew the CA",
                code="validity_beyond_ca",
            )
        days = ca_left
    return days


class IssuanceMixin(CertificatesMixin):
    """Certificates issued from CSRs by an environment's issuing CA."""

    async def issue_certificate(
        self,
        actor: Principal,
        env_id: str,
        use: str,
        csr_data: bytes,
        *,
        issuer: LocalCA | None,
        days: int | None = None,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Issue a certificate from a CSR and register it; returns the certificate's view plus
        ``certificate_pem`` and ``chain_pem`` (the issuing CA). Refusals issue nothing."""
        if not actor.manages_certificates:
            raise Forbidden(
                "only users with the API Security role may request certificates", code="api_security_only"
            )
        if use not in USES:
            raise RegistryError(f"certificate use must be one of {', '.join(USES)}", code="use_invalid")
        async with self.sessions() as session:
            env = await session.get(Environment, env_id)
            if env is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
        if not env.issuing_ca_pem:
            raise RegistryError(
                f"{env.name} ({env.id}) does not issue certificates; send the CSR to the certificate "
                "authority it trusts and upload the certificate that comes back",
                code="environment_not_issuing",
                status=409,
            )
        if issuer is None or certs.certificate_pem(issuer.certificate).decode() != env.issuing_ca_pem:
            raise RegistryError(
                f"this portal does not hold the key of {env.name}'s issuing CA; ask the platform operator "
                f"to install it (twofold admin env set {env.id} --issuing-ca-key … --issuing-ca-cert …)",
                code="issuer_unavailable",
                status=503,
            )
        request = inspect_csr(csr_data)
        now = now or utcnow()
        issued_days = validity_days(env, days, issuer.certificate, now)
        await self._check_cn_available(actor, request)
        certificate = issuer.sign_csr(
            request.csr,
            subject=request.subject,
            usage="client" if use == "mtls" else "signature",
            days=issued_days,
            now=now,
        )
        pem = certs.certificate_pem(certificate)
        facts = inspect_upload(
            pem,
            use=use,
            allow_self_signed=env.allow_self_signed,
            trusted_cas=environment_cas(env),
            environment_name=f"{env.name} ({env.id})",
            now=now,
        )

        async def work(session: AsyncSession) -> dict[str, Any]:
            return await self._register(
                session,
                actor,
                env,
                use,
                facts,
                "certificate.issue",
                serial=facts.serial,
                issuer=facts.issuer,
                days=issued_days,
            )

        view = await self._tx(work)
        return {
            **view,
            "certificate_pem": pem.decode(),
            "chain_pem": env.issuing_ca_pem,
        }

    async def _check_cn_available(self, actor: Principal, request: CSRFacts) -> None:
        """The CA vouches for the name: one that another organisation uses anywhere is refused."""
        async with self.sessions() as session:
            owners = set(
                (
                    await session.execute(select(CnOwner.org_id).where(CnOwner.cn_key == request.cn_key))
                ).scalars()
            )
            owners |= set(
                (
                    await session.execute(
                        select(Certificate.org_id).where(
                            Certificate.status == "active", Certificate.cn_key == request.cn_key
                        )
                    )
                ).scalars()
            )
            if owners - {actor.org_id}:  # which one is not said: organisations do not see each other
                raise Conflict(
                    f"the Common Name {request.common_name!r} belongs to another organisation; request a "
                    "certificate for a Common Name of your own",
                    code="cn_taken",
                )

    async def certificate_pem(self, actor: Principal, fingerprint: str) -> dict[str, str]:
        """A registered certificate of the caller's organisation as PEM, and its chain when the
        environment's issuing CA issued it (for download)."""
        fingerprint = fingerprint.strip().lower().replace(":", "")
        async with self.sessions() as session:
            query = (
                select(Certificate, Environment)
                .join(Environment, Environment.id == Certificate.environment_id)
                .where(Certificate.fingerprint == fingerprint)
                .order_by(Certificate.id.desc())
            )
            if not actor.is_operator:
                query = query.where(Certificate.org_id == actor.org_id)
            found = (await session.execute(query)).first()
        if found is None:
            raise NotFound(f"no certificate {fingerprint[:16]}…", code="certificate_not_found")
        row, env = found
        certificate = x509.load_der_x509_certificate(row.der)
        chain = ""
        if env.issuing_ca_pem:
            ca = certs.load_certificate(env.issuing_ca_pem.encode())
            if certificate.issuer == ca.subject:
                chain = env.issuing_ca_pem
        return {
            "common_name": row.common_name,
            "certificate_pem": certs.certificate_pem(certificate).decode(),
            "chain_pem": chain,
        }
