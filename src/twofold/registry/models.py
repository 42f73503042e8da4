"""Tables of the registry. Rules that must hold under concurrent writers are constraints
here, not only checks in code:

* at most two active mTLS certificates per (environment, Common Name): a partial unique
  index on (environment, CN, slot) with slot ∈ {1, 2};
* at most two active Digital Signature certificates per (organisation, environment): the
  same trick on (organisation, environment, slot);
* a CN belongs to one organisation per environment: ``cn_owners`` keyed by (environment, CN);
* a fingerprint, and a public key, are registered once among active certificates;
* the audit log is a hash chain whose links are unique, so two writers cannot fork it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the registry")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


ACTIVE = text("status = 'active'")


class Organisation(Base):
    __tablename__ = "organisations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Where expiry notices are POSTed as a signed JWS (set by operators), besides the mail.
    notice_webhook: Mapped[str | None] = mapped_column(String(500), nullable=True)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organisations.id"), nullable=True, index=True)
    # comma-separated subset of: api_security, developer, operator
    roles: Mapped[str] = mapped_column(String(100))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A generated (one-time) password: the portal asks for a new one at first sign-in.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Invited, the activation link not used yet: no password, cannot sign in.
    pending_activation: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # TOTP second factor (RFC 6238): the base32 secret, set while enrolling and kept once
    # confirmed (totp_enabled_at); the time step of the last accepted code (no replays).
    totp_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)
    totp_enabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    totp_last_counter: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))  # shown in lists, not secret
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the token
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Session(Base):
    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie value
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    mfa_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)  # passed the 2nd factor


class RecoveryCode(Base):
    """Single-use codes that stand in for the authenticator (stored as SHA-256)."""

    __tablename__ = "recovery_codes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    __table_args__ = (UniqueConstraint("user_id", "code_hash"),)


class AccountLink(Base):
    """A single-use, expiring link sent by mail: activation of an invited user, or a
    password reset. Only the SHA-256 of the link's secret is stored."""

    __tablename__ = "account_links"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))  # activate | reset
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    __table_args__ = (CheckConstraint("purpose IN ('activate', 'reset')", name="ck_link_purpose"),)


class GatewayCall(Base):
    """One gateway request of an identified organisation, as its users see it on the
    dashboard (the newest 100 per organisation and environment are kept). No bodies, no
    header values, no JWS: the refusal message is the gateway's own text."""

    __tablename__ = "gateway_calls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))
    environment_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    product: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(300))
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    __table_args__ = (Index("ix_gateway_calls_org_env", "org_id", "environment_id", "id"),)


class GatewayRefusals(Base):
    """Refused gateway requests counted per minute, environment and outcome code (whether
    or not the caller was identified): the operators' overview of the last hour."""

    __tablename__ = "gateway_refusals"
    environment_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    minute: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    outcome: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class GatewayFirstSuccess(Base):
    """When an organisation's first successful call went through in an environment (the
    onboarding checklist's last item; kept when the call itself has left the recent list)."""

    __tablename__ = "gateway_first_success"
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), primary_key=True)
    environment_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Environment(Base):
    __tablename__ = "environments"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "cat", "prod"
    name: Mapped[str] = mapped_column(String(100))
    allow_self_signed: Mapped[bool] = mapped_column(Boolean, default=False)
    ca_pem: Mapped[str | None] = mapped_column(Text, nullable=True)  # CAs that may issue certificates
    gateway_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    # The CA whose key lets the portal issue certificates from CSRs (its key never is here).
    issuing_ca_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The longest validity the portal issues for (the bank's rules: two years at most).
    max_validity_days: Mapped[int] = mapped_column(Integer, default=730, server_default=text("730"))


class ApiProduct(Base):
    __tablename__ = "api_products"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "payments"
    name: Mapped[str] = mapped_column(String(200))
    path_prefix: Mapped[str] = mapped_column(String(200), unique=True)
    upstream: Mapped[str] = mapped_column(String(500))  # URL, or "sandbox:<name>"
    signature: Mapped[str] = mapped_column(String(16))  # required | optional | none
    content_types: Mapped[list[str]] = mapped_column(JSON)
    algorithms: Mapped[list[str]] = mapped_column(JSON)
    # Replay protection (None: off): the signing time within ± this many seconds and each
    # request id once per organisation. Where they are: a payload field ("iat", "a.b") or a
    # JWS header parameter ("header:http://openbanking.org.uk/iat").
    replay_window: Mapped[int | None] = mapped_column(Integer, nullable=True)
    replay_iat: Mapped[str] = mapped_column(String(200), default="iat", server_default="iat")
    replay_id: Mapped[str] = mapped_column(String(200), default="jti", server_default="jti")
    # The gateway signs the upstream's JSON answers (compact JWS, its key in the portal's JWKS).
    sign_responses: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    __table_args__ = (CheckConstraint("signature IN ('required', 'optional', 'none')", name="ck_signature"),)


class ReplayId(Base):
    """A request id a gateway accepted, per organisation, until the request's replay window
    has passed (``expires_at``: seconds since the epoch). The primary key decides: of two
    gateways given the same signed request, the one whose insert lands forwards it."""

    __tablename__ = "replay_ids"
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True)
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)  # SHA-256 of the id
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)


class SigningKey(Base):
    """A public key the provider signs with (expiry notices, gateway responses), listed in the
    portal's JWKS: each process publishes its key here before it signs anything with it.
    Private keys are never here."""

    __tablename__ = "signing_keys"
    kid: Mapped[str] = mapped_column(String(100), primary_key=True)  # RFC 7638 thumbprint
    purpose: Mapped[str] = mapped_column(String(16))  # notices | responses
    jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    published_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    __table_args__ = (CheckConstraint("purpose IN ('notices', 'responses')", name="ck_signing_key_purpose"),)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    __table_args__ = (UniqueConstraint("org_id", "name"),)


class ProjectProduct(Base):
    __tablename__ = "project_products"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("api_products.id"), primary_key=True)
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"), primary_key=True)


class Certificate(Base):
    __tablename__ = "certificates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), index=True)
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"))
    use: Mapped[str] = mapped_column(String(16))  # mtls | signature
    slot: Mapped[int] = mapped_column(Integer)
    der: Mapped[bytes] = mapped_column(LargeBinary)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)  # SHA-256 of the DER, hex
    spki_sha256: Mapped[str] = mapped_column(String(64))  # SHA-256 of the public key
    x5t_s256: Mapped[str] = mapped_column(String(64))
    sha1_thumbprint: Mapped[str] = mapped_column(String(40))
    subject: Mapped[str] = mapped_column(String(1000))
    common_name: Mapped[str] = mapped_column(String(200))
    cn_key: Mapped[str] = mapped_column(String(200))  # the CN, case-folded: what the rules compare
    issuer: Mapped[str] = mapped_column(String(1000))
    serial: Mapped[str] = mapped_column(String(100))
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    key_type: Mapped[str] = mapped_column(String(16))
    key_size: Mapped[int] = mapped_column(Integer)
    self_signed: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16), default="active")
    added_by: Mapped[str] = mapped_column(String(320))
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    removed_by: Mapped[str | None] = mapped_column(String(320), nullable=True)
    removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The registry version of this row's last change (set by the change's own version bump):
    # gateways reload only the certificates changed since the version they hold.
    changed_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0", index=True)
    __table_args__ = (
        CheckConstraint("use IN ('mtls', 'signature')", name="ck_use"),
        CheckConstraint("slot IN (1, 2)", name="ck_slot"),
        CheckConstraint("status IN ('active', 'removed')", name="ck_status"),
        Index(
            "uq_active_fingerprint", "fingerprint", unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
        ),
        Index(
            "uq_active_public_key", "spki_sha256", unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
        ),
        Index(
            "uq_mtls_cn_slot",
            "environment_id",
            "cn_key",
            "slot",
            unique=True,
            sqlite_where=text("status = 'active' AND use = 'mtls'"),
            postgresql_where=text("status = 'active' AND use = 'mtls'"),
        ),
        Index(
            "uq_signature_slot",
            "org_id",
            "environment_id",
            "slot",
            unique=True,
            sqlite_where=text("status = 'active' AND use = 'signature'"),
            postgresql_where=text("status = 'active' AND use = 'signature'"),
        ),
        Index("ix_certificates_env_status", "environment_id", "status"),
    )


class CnOwner(Base):
    """Which organisation a Common Name belongs to in an environment (while it has certs)."""

    __tablename__ = "cn_owners"
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"), primary_key=True)
    cn_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"))


class ExpiryNotice(Base):
    """One expiry notice (a threshold of a certificate, on one channel): the row is the claim.

    Whoever inserts it (or takes over a claim whose lease ran out) sends the notice; the
    unique key is what makes a notice go out once, whatever the number of processes."""

    __tablename__ = "expiry_notices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id"), index=True)
    threshold_days: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(16))  # mail | webhook
    status: Mapped[str] = mapped_column(String(16))  # claimed | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    claimed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    detail: Mapped[str | None] = mapped_column(String(300), nullable=True)  # where it went, or why not
    __table_args__ = (
        UniqueConstraint("certificate_id", "threshold_days", "channel", name="uq_expiry_notice"),
        CheckConstraint("channel IN ('mail', 'webhook')", name="ck_notice_channel"),
        CheckConstraint("status IN ('claimed', 'sent', 'failed')", name="ck_notice_status"),
    )


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(200))
    org_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class RegistryVersion(Base):
    """One row, bumped by every change the gateway cares about; gateways poll it."""

    __tablename__ = "registry_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class SandboxPayment(Base):
    __tablename__ = "sandbox_payments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organisations.id"), index=True)
    environment_id: Mapped[str] = mapped_column(String(32))
    end_to_end_id: Mapped[str] = mapped_column(String(100))
    firm_root_id: Mapped[str] = mapped_column(String(36), unique=True)
    status: Mapped[str] = mapped_column(String(32))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    __table_args__ = (UniqueConstraint("org_id", "environment_id", "end_to_end_id"),)
