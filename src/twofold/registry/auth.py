"""Who is acting: passwords (argon2), personal API tokens, sessions, roles."""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

API_SECURITY = "api_security"
DEVELOPER = "developer"
OPERATOR = "operator"
ROLES = (API_SECURITY, DEVELOPER, OPERATOR)
ROLE_LABELS = {API_SECURITY: "API Security", DEVELOPER: "Developer", OPERATOR: "Operator"}
MFA_ROLES = frozenset({API_SECURITY, OPERATOR})  # a second factor is required for these
TOKEN_PREFIX = "tf_"

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the email is unknown, so that timing does not reveal accounts.
    Made on first use, not at import: an argon2 hash costs ~0.1-0.8 s of CPU, which every
    `twofold` command (even `--version`) paid before it did anything."""
    return _hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True)
class Principal:
    """An authenticated actor. ``name`` is what the audit log records."""

    name: str
    user_id: int | None = None
    org_id: int | None = None
    org_slug: str | None = None
    roles: frozenset[str] = frozenset()
    must_change_password: bool = False  # signed in with a one-time password
    mfa_enrolled: bool = False  # has a confirmed TOTP second factor
    # Passed the second factor in this session. API tokens and the operator's CLI count as
    # passed: a token is made only by a session that passed it (or by an operator).
    mfa_passed: bool = False

    @property
    def is_operator(self) -> bool:
        return OPERATOR in self.roles

    @property
    def mfa_required(self) -> bool:
        """API Security users and operators must use a second factor."""
        return bool(self.roles & MFA_ROLES)

    @property
    def needs_second_factor(self) -> bool:
        """Signed in with the password only, but the account asks for more."""
        return (self.mfa_required or self.mfa_enrolled) and not self.mfa_passed

    @property
    def manages_certificates(self) -> bool:
        return API_SECURITY in self.roles and self.org_id is not None

    @property
    def manages_projects(self) -> bool:
        return DEVELOPER in self.roles and self.org_id is not None


SYSTEM = Principal("system", roles=frozenset({OPERATOR}), mfa_passed=True)


def parse_roles(value: str | list[str] | tuple[str, ...]) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    roles = set()
    aliases = {
        "api-security": API_SECURITY,
        "apisecurity": API_SECURITY,
        "security": API_SECURITY,
        "api security": API_SECURITY,
        "dev": DEVELOPER,
    }
    for item in items:
        name = item.strip().lower().replace("_", " ").strip()
        name = aliases.get(name, name.replace(" ", "_"))
        if not name:
            continue
        if name not in ROLES:
            from twofold.registry.rules import RegistryError

            raise RegistryError(f"unknown role {item!r}: use {', '.join(ROLES)}", code="role_invalid")
        roles.add(name)
    return frozenset(roles)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(value: str) -> str:
    """Tokens and session ids are stored as SHA-256: a leaked table grants nothing."""
    return hashlib.sha256(value.encode()).hexdigest()


def new_password() -> str:
    return secrets.token_urlsafe(15)
