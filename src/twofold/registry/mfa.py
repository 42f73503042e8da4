"""The second factor: TOTP (RFC 6238, 30-second steps, six digits, SHA-1 as every
authenticator app implements it) and ten single-use recovery codes.

* A code is accepted for the current time step and one step either side (clock drift), and
  only for a step later than the last one accepted: a replayed code is refused within its
  window (one atomic UPDATE, so two concurrent uses of a code cannot both pass).
* Recovery codes are stored as SHA-256 (they are random, 50 bits each) and marked used in
  one atomic UPDATE: each works once.
* Required for API Security users and operators (:data:`~twofold.registry.auth.MFA_ROLES`),
  voluntary for developers. An operator resets a lost factor (audited); the user enrols again
  at the next sign-in.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from typing import Any

import pyotp
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry import audit
from twofold.registry.accounts import AccountsMixin
from twofold.registry.auth import Principal, secret_hash
from twofold.registry.models import RecoveryCode, Session, User, utcnow
from twofold.registry.rules import Conflict, Forbidden, RegistryError, Unauthorized

RECOVERY_CODES = 10
ISSUER = "twofold"
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i


def totp_step(secret: str, code: str, now: dt.datetime, *, drift: int = 1) -> int | None:
    """The time step ``code`` is valid for (now ± ``drift`` steps), or None."""
    totp = pyotp.TOTP(secret)
    current = totp.timecode(now)
    for step in sorted(range(current - drift, current + drift + 1), key=lambda s: abs(s - current)):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def _new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(10))
    return f"{raw[:5]}-{raw[5:]}"


def _normalise(code: str) -> str:
    return "".join(c for c in code.lower() if c.isalnum())


def _is_totp(code: str) -> bool:
    return len(code) == 6 and code.isdigit()


class MfaMixin(AccountsMixin):
    """Enrolment, verification and the operator's reset of the second factor."""

    async def _session_user(self, session: AsyncSession, cookie: str) -> tuple[Session, User]:
        row = (await session.execute(select(Session).where(Session.id_hash == secret_hash(cookie)))).scalar()
        user = await session.get(User, row.user_id) if row is not None else None
        if row is None or user is None or not user.active or row.expires_at < utcnow():
            raise Unauthorized("your session has ended; sign in again", code="session_expired")
        return row, user

    async def mfa_begin(self, actor: Principal) -> dict[str, str]:
        """Start enrolment: a new secret (the same one while it is not confirmed yet)."""
        if actor.user_id is None:
            raise Forbidden("this account cannot enrol a second factor")
        if actor.mfa_enrolled:
            raise Conflict(
                "a second factor is already set up; an operator can reset it if the device is lost",
                code="mfa_enrolled",
            )

        async def work(session: AsyncSession) -> str:
            user = await session.get(User, actor.user_id)
            assert user is not None
            if user.totp_secret and user.totp_enabled_at is None:
                return user.totp_secret  # the page was opened again: the same QR code
            user.totp_secret = pyotp.random_base32()
            user.totp_last_counter = None
            return user.totp_secret

        secret = await self._tx(work)
        uri = pyotp.TOTP(secret).provisioning_uri(name=actor.name, issuer_name=ISSUER)
        return {"secret": secret, "uri": uri}

    async def mfa_confirm(self, actor: Principal, code: str, *, cookie: str | None = None) -> list[str]:
        """Confirm enrolment with a code from the app; returns the ten recovery codes (shown
        once). The current session (``cookie``) counts as having passed the second factor."""
        code = _normalise(code)
        codes = [_new_recovery_code() for _ in range(RECOVERY_CODES)]

        async def work(session: AsyncSession) -> None:
            user = await session.get(User, actor.user_id)
            if user is None or user.totp_enabled_at is not None or not user.totp_secret:
                raise RegistryError("start the set-up again: open the page anew", code="mfa_not_started")
            step = totp_step(user.totp_secret, code, self.clock()) if _is_totp(code) else None
            if step is None:
                raise Unauthorized(
                    "that code does not match; check the device's clock and type the current code",
                    code="mfa_failed",
                )
            user.totp_enabled_at = self.clock()
            user.totp_last_counter = step
            await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
            session.add_all(
                RecoveryCode(user_id=user.id, code_hash=secret_hash(_normalise(c))) for c in codes
            )
            if cookie is not None:
                await session.execute(
                    update(Session).where(Session.id_hash == secret_hash(cookie)).values(mfa_at=self.clock())
                )
            await audit.append(
                session,
                actor=actor.name,
                action="user.mfa_enrol",
                object_type="user",
                object_id=actor.name,
                org_id=user.org_id,
                details={"method": "totp", "recovery_codes": RECOVERY_CODES},
            )

        await self._tx(work)
        return codes

    async def mfa_verify(self, cookie: str, code: str) -> dict[str, Any]:
        """Pass the second factor for a signed-in session: a TOTP code (not replayed) or an
        unused recovery code. Returns how it passed and the recovery codes left."""
        code = _normalise(code)

        async def work(session: AsyncSession) -> dict[str, Any]:
            row, user = await self._session_user(session, cookie)
            if user.totp_enabled_at is None or not user.totp_secret:
                raise RegistryError("no second factor is set up for this account", code="mfa_not_enrolled")
            method = await self._accept_code(session, user, code)
            if method is None:
                raise Unauthorized(
                    "that code is wrong or was already used; type the current code from your "
                    "authenticator app, or an unused recovery code",
                    code="mfa_failed",
                )
            row.mfa_at = self.clock()
            left = await self._recovery_codes_left(session, user.id)
            await audit.append(
                session,
                actor=user.email,
                action="session.mfa",
                object_type="user",
                object_id=user.email,
                org_id=user.org_id,
                details={"method": method, "recovery_codes_left": left},
            )
            return {"method": method, "recovery_codes_left": left}

        return await self._tx(work)

    async def _accept_code(self, session: AsyncSession, user: User, code: str) -> str | None:
        if _is_totp(code):
            assert user.totp_secret is not None
            step = totp_step(user.totp_secret, code, self.clock())
            if step is None:
                return None
            accepted = await session.execute(
                update(User)
                .where(
                    User.id == user.id,
                    (User.totp_last_counter.is_(None)) | (User.totp_last_counter < step),
                )
                .values(totp_last_counter=step)
            )
            return "totp" if accepted.rowcount == 1 else None  # type: ignore[attr-defined]
        used = await session.execute(
            update(RecoveryCode)
            .where(
                RecoveryCode.user_id == user.id,
                RecoveryCode.code_hash == secret_hash(code),
                RecoveryCode.used_at.is_(None),
            )
            .values(used_at=self.clock())
        )
        return "recovery_code" if used.rowcount == 1 else None  # type: ignore[attr-defined]

    @staticmethod
    async def _recovery_codes_left(session: AsyncSession, user_id: int) -> int:
        count = await session.execute(
            select(func.count())
            .select_from(RecoveryCode)
            .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
        )
        return int(count.scalar() or 0)

    async def mfa_reset(self, actor: Principal, email: str) -> dict[str, Any]:
        """An operator removes a user's lost second factor: the recovery codes go too and the
        user is signed out everywhere; they enrol again at their next sign-in."""
        self._need_operator(actor)
        self._need_second_factor(actor)

        async def work(session: AsyncSession) -> dict[str, Any]:
            user = await self._user_by_email(session, email)
            had = user.totp_enabled_at is not None
            user.totp_secret = None
            user.totp_enabled_at = None
            user.totp_last_counter = None
            await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
            await session.execute(delete(Session).where(Session.user_id == user.id))
            await audit.append(
                session,
                actor=actor.name,
                action="user.mfa_reset",
                object_type="user",
                object_id=user.email,
                org_id=user.org_id,
                details={"had_second_factor": had},
            )
            return {"email": user.email, "had_second_factor": had}

        return await self._tx(work)
