"""Expiry notices and the expiry metric, run by `twofold serve` beside (not inside) the
gateway's request path.

At 30, 15, 7 and 1 days before an active certificate expires, its organisation's API Security
users get a mail (through the portal's mailer: SMTP, or the outbox), and — when an operator
gave the organisation a webhook — a signed notice is POSTed to it: a compact JWS (RS256)
signed by the portal's notice key, whose JWKS the portal serves at ``/.well-known/jwks.json``.
The registry decides who sends each notice (:mod:`twofold.registry.notices`), so several
processes or nodes send it once. ``twofold_certificate_expiry_seconds{environment,org,use}``
is the time left until the soonest expiry, for Prometheus. Time comes from a clock the
notifier is given, so that tests move it instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twofold import __version__
from twofold.mail import Mailer
from twofold.provider_keys import JWKS_PATH as JWKS_PATH
from twofold.provider_keys import ProviderKey
from twofold.registry.notices import THRESHOLDS, DueNotice, ExpiryFact
from twofold.registry.service import Registry

log = logging.getLogger("twofold.lifecycle")
Clock = Callable[[], dt.datetime]
NOTICE_TYPE = "certificate.expiring"


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- the portal's notice key --------------------------------------------------------------------


class NoticeSigner(ProviderKey):
    """The portal's key for signed notices (RS256), one of the provider keys the portal's
    JWKS lists (:mod:`twofold.provider_keys`)."""

    purpose = "notices"

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        super().__init__(key, alg="RS256", name="the notice signing key")

    @classmethod
    def load_or_create(cls, path: Path, *, alg: str | None = None) -> NoticeSigner:
        """The key in ``path`` (0600), made on first use."""
        key = ProviderKey.load_or_create(path, alg="RS256").key
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} is not an RSA key")
        return cls(key)

    def sign(self, claims: dict[str, Any]) -> str:
        payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
        return self.sign_bytes(payload, typ="JWT")


# --- what a notice says -------------------------------------------------------------------------


def notice_subject(notice: DueNotice, now: dt.datetime) -> str:
    days = notice.days_left(now)
    return (
        f"Certificate {notice.common_name} ({notice.use_label}, {notice.environment_name}) expires in "
        f"{days} day{'s' if days != 1 else ''}"
    )


def notice_text(notice: DueNotice, now: dt.datetime, portal_url: str) -> str:
    days = notice.days_left(now)
    later = [t for t in THRESHOLDS if t < notice.threshold_days]
    rotate_use = "mtls" if notice.use == "mtls" else "signature"
    return "\n".join(
        [
            f"The {notice.use_label} certificate {notice.common_name} of {notice.org_name} in "
            f"{notice.environment_name} ({notice.environment}) expires on {notice.not_after:%Y-%m-%d %H:%M} UTC"
            f" — in {days} day{'s' if days != 1 else ''}.",
            "",
            f"  Common Name   {notice.common_name}",
            f"  Use           {notice.use_label}",
            f"  Environment   {notice.environment_name} ({notice.environment})",
            f"  SHA-256       {notice.fingerprint}",
            f"  Serial        {notice.serial}",
            f"  Expires       {notice.not_after:%Y-%m-%d %H:%M} UTC",
            "",
            "Calls made with it are refused once it has expired. Replace it before then, without downtime:",
            "",
            f"  twofold rotate --env {notice.environment} --use {rotate_use} --dir <your credentials directory>",
            "",
            "or add its successor on the Security page and remove this certificate once your clients use the",
            f"new one: {portal_url}/security?env={notice.environment}",
            "",
            f"You receive this as an API Security user of {notice.org_name}."
            + (f" Further notices: {', '.join(map(str, later))} day(s) before expiry." if later else ""),
        ]
    )


def notice_claims(notice: DueNotice, now: dt.datetime, portal_url: str) -> dict[str, Any]:
    return {
        "iss": portal_url,
        "iat": int(now.timestamp()),
        "jti": f"{notice.fingerprint}:{notice.threshold_days}",
        "type": NOTICE_TYPE,
        "organisation": notice.org,
        "environment": notice.environment,
        "use": notice.use,
        "common_name": notice.common_name,
        "fingerprint": notice.fingerprint,
        "serial": notice.serial,
        "not_after": notice.not_after.isoformat(),
        "days_left": notice.days_left(now),
        "threshold_days": notice.threshold_days,
    }


# --- the notifier -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    notice: DueNotice
    detail: str  # where it went


class ExpiryNotifier:
    """Sends due notices (``run_once``) and keeps the facts behind the expiry metric."""

    def __init__(
        self,
        registry: Registry,
        *,
        mailer: Mailer | None,
        signer: NoticeSigner | None,
        portal_url: str,
        clock: Clock = system_clock,
        thresholds: tuple[int, ...] = THRESHOLDS,
        webhook_timeout: float = 10.0,
    ) -> None:
        self.registry = registry
        self.mailer = mailer
        self.signer = signer
        self.portal_url = portal_url.rstrip("/")
        self.clock = clock
        self.thresholds = thresholds
        self.webhook_timeout = webhook_timeout
        self.facts: list[ExpiryFact] = []

    async def run_once(self) -> list[Sent]:
        """Claim and send every notice due now; returns those this process sent."""
        now = self.clock()
        sent: list[Sent] = []
        for notice in await self.registry.due_notices(now, self.thresholds):
            if notice.channel == "mail" and self.mailer is None:
                continue
            if notice.channel == "webhook" and self.signer is None:
                continue
            if not await self.registry.claim_notice(notice, now):
                continue  # another process has it, or it is sent
            try:
                detail = await self._deliver(notice, now)
            except Exception as exc:  # recorded, and retried after the lease
                reason = _reason(exc)
                log.warning(
                    "expiry notice (%d days, %s) for %s of %s not sent: %s",
                    notice.threshold_days,
                    notice.channel,
                    notice.common_name,
                    notice.org,
                    reason,
                )
                await self.registry.finish_notice(notice, now, sent=False, detail=reason)
                continue
            await self.registry.finish_notice(notice, now, sent=True, detail=detail)
            log.info(
                "expiry notice (%d days, %s) for %s of %s sent to %s",
                notice.threshold_days,
                notice.channel,
                notice.common_name,
                notice.org,
                detail,
            )
            sent.append(Sent(notice, detail))
        await self.refresh()
        return sent

    async def _deliver(self, notice: DueNotice, now: dt.datetime) -> str:
        if notice.channel == "mail":
            assert self.mailer is not None
            if not notice.recipients:
                return "nobody (the organisation has no active API Security user)"
            await self.mailer.send(
                list(notice.recipients),
                notice_subject(notice, now),
                notice_text(notice, now, self.portal_url),
            )
            return ", ".join(notice.recipients)
        assert self.signer is not None
        assert notice.webhook is not None
        token = self.signer.sign(notice_claims(notice, now, self.portal_url))
        async with httpx.AsyncClient(timeout=self.webhook_timeout, follow_redirects=False) as client:
            response = await client.post(
                notice.webhook,
                content=token,
                headers={"Content-Type": "application/jose", "User-Agent": f"twofold/{__version__}"},
            )
        host = urlsplit(notice.webhook).hostname or "?"  # the URL itself may carry a secret
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"the webhook at {host} answered HTTP {response.status_code}")
        return f"webhook {host} (HTTP {response.status_code})"

    async def refresh(self) -> None:
        self.facts = await self.registry.expiry_facts()

    async def run(self, stop: asyncio.Event, *, interval: float = 300.0, tick: float = 2.0) -> None:
        """Until ``stop``: notices every ``interval`` seconds; the metric's facts whenever the
        registry changes (polled every ``tick`` seconds)."""
        loop = asyncio.get_running_loop()
        seen: int | None = None
        next_notices = loop.time()
        while not stop.is_set():
            try:
                version = await self.registry.version()
                if version != seen:
                    await self.refresh()
                    seen = version
                if loop.time() >= next_notices:
                    await self.run_once()
                    next_notices = loop.time() + interval
            except Exception as exc:  # the loop outlives a database hiccup
                log.warning("expiry notices: %s; trying again", _reason(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)

    def collector(self) -> ExpiryCollector:
        return ExpiryCollector(lambda: self.facts, self.clock)


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}"[:300]


class ExpiryCollector(Collector):
    """``twofold_certificate_expiry_seconds{environment,org,use}``: seconds until the soonest
    expiry of an active certificate (negative once expired), computed at scrape time."""

    def __init__(self, facts: Callable[[], Iterable[ExpiryFact]], clock: Clock) -> None:
        self.facts = facts
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        return iter(())  # not known until scraped; nothing to check for duplicates

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "twofold_certificate_expiry_seconds",
            "Seconds until the soonest expiry of an active certificate, per environment, organisation and use",
            labels=["environment", "org", "use"],
        )
        now = self.clock()
        for fact in self.facts():
            family.add_metric([fact.environment, fact.org, fact.use], (fact.not_after - now).total_seconds())
        yield family
