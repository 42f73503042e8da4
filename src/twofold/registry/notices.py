"""Expiry notices: which are due, who claims each, what the portal shows and the metrics say.

A notice is (certificate, threshold, channel). It is due when an active certificate is within
the threshold of its expiry and it is the most urgent threshold reached (a certificate added
9 days before expiry gets the 15-day notice, not the 30-day one too, then the 7- and 1-day ones). The database decides
who sends it: the row in ``expiry_notices`` is the claim, unique per notice, so with several
processes or nodes exactly one claims it; a claim that was not completed within the lease
(the process died, the SMTP server was down) may be claimed again, a few times at most.
Time is a parameter everywhere, so that tests move it instead of sleeping.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.crypto import certs as _certs
from twofold.registry import audit
from twofold.registry.auth import API_SECURITY, Principal
from twofold.registry.base import RegistryBase
from twofold.registry.models import Certificate, Environment, ExpiryNotice, Organisation, User
from twofold.registry.rules import USE_LABELS, RegistryError

THRESHOLDS = (30, 15, 7, 1)
CHANNELS = ("mail", "webhook")
LEASE = dt.timedelta(minutes=10)
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class DueNotice:
    certificate_id: int
    threshold_days: int
    channel: str
    org: str
    org_name: str
    environment: str
    environment_name: str
    use: str
    common_name: str
    fingerprint: str
    serial: str
    not_after: dt.datetime
    recipients: tuple[str, ...]  # the organisation's active API Security users (mail)
    webhook: str | None

    @property
    def use_label(self) -> str:
        return USE_LABELS[self.use]

    def days_left(self, now: dt.datetime) -> int:
        return _certs.days_left(self.not_after, now)


@dataclass(frozen=True)
class ExpiryFact:
    """The soonest expiry among the active certificates of (environment, organisation, use)."""

    environment: str
    org: str
    use: str
    not_after: dt.datetime


def threshold_for(
    not_after: dt.datetime, now: dt.datetime, thresholds: tuple[int, ...] = THRESHOLDS
) -> int | None:
    """The most urgent threshold reached, or None (not yet within any, or already expired)."""
    left = not_after - now
    if left <= dt.timedelta(0):
        return None
    reached = [t for t in thresholds if left <= dt.timedelta(days=t)]
    return min(reached) if reached else None


def check_webhook(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise RegistryError(
            "the webhook must be an http(s):// URL without credentials in it, e.g. "
            "https://ops.acme.example/twofold/notices",
            code="webhook_invalid",
        )
    if len(url) > 500:
        raise RegistryError("the webhook URL is longer than 500 characters", code="webhook_invalid")
    return url.strip()


class NoticesMixin(RegistryBase):
    """Due notices and their claims, the expiry facts behind the metric and the banner."""

    async def due_notices(
        self, now: dt.datetime, thresholds: tuple[int, ...] = THRESHOLDS
    ) -> list[DueNotice]:
        """Notices due at ``now`` that are not sent yet (claiming them is another step)."""
        horizon = now + dt.timedelta(days=max(thresholds))
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(Certificate, Organisation, Environment.name)
                    .join(Organisation, Organisation.id == Certificate.org_id)
                    .join(Environment, Environment.id == Certificate.environment_id)
                    .where(
                        Certificate.status == "active",
                        Certificate.not_after > now,
                        Certificate.not_after <= horizon,
                    )
                    .order_by(Certificate.not_after, Certificate.id)
                )
            ).all()
            if not rows:
                return []
            sent = {
                (n.certificate_id, n.threshold_days, n.channel)
                for n in (
                    await session.execute(
                        select(ExpiryNotice).where(
                            ExpiryNotice.certificate_id.in_([c.id for c, _o, _e in rows]),
                            ExpiryNotice.status == "sent",
                        )
                    )
                ).scalars()
            }
            recipients = await self._api_security_emails(session, {o.id for _c, o, _e in rows})
        due = []
        for cert, org, env_name in rows:
            threshold = threshold_for(cert.not_after, now, thresholds)
            if threshold is None:
                continue
            for channel in CHANNELS:
                if channel == "webhook" and not org.notice_webhook:
                    continue
                if (cert.id, threshold, channel) in sent:
                    continue
                due.append(
                    DueNotice(
                        cert.id,
                        threshold,
                        channel,
                        org.slug,
                        org.name,
                        cert.environment_id,
                        env_name,
                        cert.use,
                        cert.common_name,
                        cert.fingerprint,
                        cert.serial,
                        cert.not_after,
                        tuple(recipients.get(org.id, ())),
                        org.notice_webhook,
                    )
                )
        return due

    @staticmethod
    async def _api_security_emails(session: AsyncSession, org_ids: set[int]) -> dict[int, list[str]]:
        users = (
            await session.execute(
                select(User.org_id, User.email, User.roles)
                .where(User.org_id.in_(org_ids), User.active.is_(True))
                .order_by(User.email)
            )
        ).all()
        found: dict[int, list[str]] = {}
        for org_id, email, roles in users:
            if org_id is not None and API_SECURITY in roles.split(","):
                found.setdefault(org_id, []).append(email)
        return found

    async def claim_notice(
        self,
        notice: DueNotice,
        now: dt.datetime,
        *,
        lease: dt.timedelta = LEASE,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> bool:
        """True for exactly one caller per notice, whatever the number of processes: that one
        sends it. A claim not completed within ``lease`` may be taken over."""
        key = (
            ExpiryNotice.certificate_id == notice.certificate_id,
            ExpiryNotice.threshold_days == notice.threshold_days,
            ExpiryNotice.channel == notice.channel,
        )

        async def work(session: AsyncSession) -> bool:
            row = (await session.execute(select(ExpiryNotice).where(*key).with_for_update())).scalar()
            if row is None:
                # Two processes inserting at once: one wins, the other's flush fails on the unique
                # key, its transaction is run again and then finds the winner's row.
                session.add(
                    ExpiryNotice(
                        certificate_id=notice.certificate_id,
                        threshold_days=notice.threshold_days,
                        channel=notice.channel,
                        status="claimed",
                        attempts=1,
                        claimed_at=now,
                    )
                )
                await session.flush()
                return True
            if row.status == "sent" or row.claimed_at > now - lease or row.attempts >= max_attempts:
                return False
            row.status, row.claimed_at, row.attempts = "claimed", now, row.attempts + 1
            await session.flush()
            return True

        return await self._tx(work)

    async def finish_notice(self, notice: DueNotice, now: dt.datetime, *, sent: bool, detail: str) -> None:
        """Record how a claimed notice went: sent (never again), or failed (retried after the lease)."""

        async def work(session: AsyncSession) -> None:
            row = (
                await session.execute(
                    select(ExpiryNotice).where(
                        ExpiryNotice.certificate_id == notice.certificate_id,
                        ExpiryNotice.threshold_days == notice.threshold_days,
                        ExpiryNotice.channel == notice.channel,
                    )
                )
            ).scalar_one()
            row.status = "sent" if sent else "failed"
            row.sent_at = now if sent else None
            row.detail = detail[:300]
            if sent:
                await audit.append(
                    session,
                    actor="system",
                    action="certificate.expiry_notice",
                    object_type="certificate",
                    object_id=notice.fingerprint,
                    org_id=(
                        await session.execute(select(Organisation.id).where(Organisation.slug == notice.org))
                    ).scalar(),
                    details={
                        "environment": notice.environment,
                        "threshold_days": notice.threshold_days,
                        "channel": notice.channel,
                        "to": detail[:200],
                    },
                )

        await self._tx(work)

    async def notices_of(self, fingerprint: str) -> list[dict[str, Any]]:
        """The notice rows of a certificate (operators' view, and the tests')."""
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(ExpiryNotice)
                    .join(Certificate, Certificate.id == ExpiryNotice.certificate_id)
                    .where(Certificate.fingerprint == fingerprint)
                    .order_by(ExpiryNotice.threshold_days.desc(), ExpiryNotice.channel)
                )
            ).scalars()
            return [
                {
                    "threshold_days": n.threshold_days,
                    "channel": n.channel,
                    "status": n.status,
                    "attempts": n.attempts,
                    "sent_at": n.sent_at.isoformat() if n.sent_at else None,
                    "detail": n.detail,
                }
                for n in rows
            ]

    async def expiry_facts(self) -> list[ExpiryFact]:
        """Per (environment, organisation, use): the soonest expiry of an active certificate."""
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(
                        Certificate.environment_id, Organisation.slug, Certificate.use, Certificate.not_after
                    )
                    .join(Organisation, Organisation.id == Certificate.org_id)
                    .where(Certificate.status == "active")
                )
            ).all()
        soonest: dict[tuple[str, str, str], dt.datetime] = {}
        for env_id, org, use, not_after in rows:
            key = (env_id, org, use)
            if key not in soonest or not_after < soonest[key]:
                soonest[key] = not_after
        return [ExpiryFact(e, o, u, t) for (e, o, u), t in sorted(soonest.items())]

    async def expiring_certificates(
        self, actor: Principal, now: dt.datetime, within_days: int = max(THRESHOLDS)
    ) -> list[dict[str, Any]]:
        """The caller's organisation's active certificates that expire within ``within_days``
        (or have expired without being removed), soonest first: what the portal's banner shows."""
        if actor.org_id is None:
            return []
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(Certificate, Environment.name)
                    .join(Environment, Environment.id == Certificate.environment_id)
                    .where(
                        Certificate.org_id == actor.org_id,
                        Certificate.status == "active",
                        Certificate.not_after <= now + dt.timedelta(days=within_days),
                    )
                    .order_by(Certificate.not_after, Certificate.id)
                )
            ).all()
        return [
            {
                "common_name": c.common_name,
                "use_label": USE_LABELS[c.use],
                "environment": c.environment_id,
                "environment_name": env_name,
                "fingerprint": c.fingerprint,
                "not_after": c.not_after.isoformat(),
                "days_left": _certs.days_left(c.not_after, now),
                "expired": c.not_after <= now,
            }
            for c, env_name in rows
        ]

    async def set_notice_webhook(self, actor: Principal, org: str, url: str | None) -> dict[str, Any]:
        """Where an organisation's expiry notices are POSTed (operators only; None: nowhere)."""
        self._need_operator(actor)
        checked = check_webhook(url) if url else None

        async def work(session: AsyncSession) -> dict[str, Any]:
            row = await self._org_by_slug(session, org)
            row.notice_webhook = checked
            await audit.append(
                session,
                actor=actor.name,
                action="organisation.notice_webhook",
                object_type="organisation",
                object_id=row.slug,
                org_id=row.id,
                details={"webhook_host": urlsplit(checked).hostname if checked else None},
            )
            return {"organisation": row.slug, "notice_webhook": checked}

        return await self._tx(work)
