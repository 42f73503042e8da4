"""Recent gateway calls and the dashboards built on the registry.

The gateway hands over calls in batches (:mod:`twofold.gateway.calls` records them off the
request path); here they are stored — the newest :data:`KEEP` per organisation and
environment — with refusals counted per minute and outcome code for the operators, and the
first successful call of each organisation per environment kept for the onboarding
checklist. Each organisation sees only its own calls.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry.auth import Principal
from twofold.registry.base import RegistryBase
from twofold.registry.models import (
    ApiProduct,
    Certificate,
    Environment,
    GatewayCall,
    GatewayFirstSuccess,
    GatewayRefusals,
    Organisation,
    Project,
    ProjectProduct,
    User,
)
from twofold.registry.rules import NotFound, RegistryError

KEEP = 100  # calls kept per organisation and environment
EXPIRY_WARNING = dt.timedelta(days=30)
REFUSALS_KEPT = dt.timedelta(hours=2)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One gateway request, as the dashboard shows it (no bodies, no header values)."""

    at: dt.datetime
    environment: str
    org_id: int | None  # None: the caller was not identified (only counted, if refused)
    product: str | None
    method: str
    path: str
    status: int
    outcome: str
    message: str | None = None


def _minute(at: dt.datetime) -> dt.datetime:
    return at.replace(second=0, microsecond=0)


@dataclass
class CallBatch:
    """What one write stores: the calls to list (at most :data:`KEEP` per organisation and
    environment — older ones would be pruned at once anyway), refusals counted per
    (environment, minute, outcome) and the first successful call per (organisation,
    environment). Collapsing a batch first keeps the cost per write bounded whatever the
    request rate."""

    calls: list[CallRecord] = field(default_factory=list)
    refusals: Counter[tuple[str, dt.datetime, str]] = field(default_factory=Counter)
    first_ok: dict[tuple[int, str], dt.datetime] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Sequence[CallRecord]) -> CallBatch:
        batch = cls()
        kept: Counter[tuple[int, str]] = Counter()
        for c in reversed(records):  # newest first
            if c.status >= 400:
                batch.refusals[(c.environment, _minute(c.at), c.outcome)] += 1
            elif c.org_id is not None:
                batch.first_ok[(c.org_id, c.environment)] = c.at  # ends with the oldest
            if c.org_id is not None and kept[(c.org_id, c.environment)] < KEEP:
                kept[(c.org_id, c.environment)] += 1
                batch.calls.append(c)
        batch.calls.reverse()
        return batch

    def __len__(self) -> int:
        """Calls listed plus refusals counted (a listed refusal is in both)."""
        return len(self.calls) + sum(self.refusals.values())


def call_view(row: GatewayCall) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": row.at.isoformat(timespec="seconds"),
        "environment": row.environment_id,
        "product": row.product,
        "method": row.method,
        "path": row.path,
        "status": row.status,
        "outcome": row.outcome,
        "message": row.message,
    }


class CallsMixin(RegistryBase):
    """Recording gateway calls; the organisation's dashboard and the operators' overview."""

    async def record_calls(self, calls: Sequence[CallRecord] | CallBatch) -> None:
        """Store a batch of calls in one transaction (called by the gateway's recorder)."""
        batch = calls if isinstance(calls, CallBatch) else CallBatch.of(calls)
        if not (batch.calls or batch.refusals or batch.first_ok):
            return

        async def work(session: AsyncSession) -> None:
            identified = batch.calls
            if identified:
                await session.execute(
                    insert(GatewayCall),
                    [
                        {
                            "org_id": c.org_id,
                            "environment_id": c.environment[:32],
                            "at": c.at,
                            "product": c.product,
                            "method": c.method[:16],
                            "path": c.path[:300],
                            "status": c.status,
                            "outcome": c.outcome[:64],
                            "message": c.message[:500] if c.message else None,
                        }
                        for c in identified
                    ],
                )
            await self._count_refusals(session, batch.refusals)
            await self._first_successes(session, batch.first_ok)
            for org_id, env in {(c.org_id, c.environment[:32]) for c in identified}:
                cutoff = (
                    await session.execute(
                        select(GatewayCall.id)
                        .where(GatewayCall.org_id == org_id, GatewayCall.environment_id == env)
                        .order_by(GatewayCall.id.desc())
                        .offset(KEEP - 1)
                        .limit(1)
                    )
                ).scalar()
                if cutoff is not None:
                    await session.execute(
                        delete(GatewayCall).where(
                            GatewayCall.org_id == org_id,
                            GatewayCall.environment_id == env,
                            GatewayCall.id < cutoff,
                        )
                    )

        await self._tx(work)

    @staticmethod
    async def _count_refusals(session: AsyncSession, refusals: Counter[tuple[str, dt.datetime, str]]) -> None:
        counts: Counter[tuple[str, dt.datetime, str]] = Counter()
        for (env, minute, outcome), count in refusals.items():
            counts[(env[:32], minute, outcome[:64])] += count
        for (env, minute, outcome), count in counts.items():
            updated = await session.execute(
                update(GatewayRefusals)
                .where(
                    GatewayRefusals.environment_id == env,
                    GatewayRefusals.minute == minute,
                    GatewayRefusals.outcome == outcome,
                )
                .values(count=GatewayRefusals.count + count)
            )
            if updated.rowcount == 0:  # type: ignore[attr-defined]
                # Another gateway process may insert the same row first: the unique key makes
                # this transaction retry, and the retry finds the row to add to.
                session.add(GatewayRefusals(environment_id=env, minute=minute, outcome=outcome, count=count))
        if counts:
            oldest = min(minute for _env, minute, _outcome in counts) - REFUSALS_KEPT
            await session.execute(delete(GatewayRefusals).where(GatewayRefusals.minute < oldest))
        await session.flush()

    @staticmethod
    async def _first_successes(session: AsyncSession, firsts: dict[tuple[int, str], dt.datetime]) -> None:
        for (org_id, long_env), at in firsts.items():
            env = long_env[:32]
            if await session.get(GatewayFirstSuccess, (org_id, env)) is None:
                session.add(GatewayFirstSuccess(org_id=org_id, environment_id=env, at=at))
        await session.flush()

    async def _viewed_org(self, session: AsyncSession, actor: Principal, org: str | None) -> int:
        if actor.is_operator and org:
            return (await self._org_by_slug(session, org)).id
        if actor.org_id is None:
            raise RegistryError("say which organisation: ?org=…", code="org_required")
        return actor.org_id

    async def recent_calls(
        self, actor: Principal, env_id: str, *, org: str | None = None, limit: int = KEEP
    ) -> list[dict[str, Any]]:
        """The organisation's newest calls in an environment (operators: ?org=)."""
        async with self.sessions() as session:
            org_id = await self._viewed_org(session, actor, org)
            rows = (
                await session.execute(
                    select(GatewayCall)
                    .where(GatewayCall.org_id == org_id, GatewayCall.environment_id == env_id)
                    .order_by(GatewayCall.id.desc())
                    .limit(max(1, min(limit, KEEP)))
                )
            ).scalars()
            return [call_view(r) for r in rows]

    async def dashboard(self, actor: Principal, env_id: str, *, org: str | None = None) -> dict[str, Any]:
        """The onboarding checklist, expiring certificates and recent calls of one
        organisation in one environment."""
        async with self.sessions() as session:
            env = await session.get(Environment, env_id)
            if env is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
            org_id = await self._viewed_org(session, actor, org)
            products = (
                await session.execute(
                    select(ApiProduct.id, ApiProduct.signature)
                    .join(ProjectProduct, ProjectProduct.product_id == ApiProduct.id)
                    .join(Project, Project.id == ProjectProduct.project_id)
                    .where(Project.org_id == org_id, ProjectProduct.environment_id == env_id)
                    .distinct()
                )
            ).all()
            certificates = list(
                (
                    await session.execute(
                        select(Certificate)
                        .where(
                            Certificate.org_id == org_id,
                            Certificate.environment_id == env_id,
                            Certificate.status == "active",
                        )
                        .order_by(Certificate.not_after)
                    )
                ).scalars()
            )
            first = await session.get(GatewayFirstSuccess, (org_id, env_id))
        now = self.clock()
        uses = {c.use for c in certificates}
        signing = sorted(p for p, policy in products if policy == "required")
        checklist = [
            {
                "item": "project",
                "label": "A project with API products",
                "done": bool(products),
                "detail": ", ".join(sorted(p for p, _ in products)) or None,
                "link": "/projects",
            },
            {
                "item": "mtls",
                "label": "An mTLS certificate",
                "done": "mtls" in uses,
                "detail": None,
                "link": f"/security?env={env_id}",
            },
            {
                "item": "signature",
                "label": "A Digital Signature certificate",
                # Needed where a product of the organisation's projects requires signed bodies
                # (and, before any project, most likely: the payments product does).
                "done": "signature" in uses or (bool(products) and not signing),
                "detail": (
                    f"needed for {', '.join(signing)}"
                    if signing
                    else ("not needed by your products" if products else None)
                ),
                "link": f"/security?env={env_id}",
            },
            {
                "item": "call",
                "label": "A successful call through the gateway",
                "done": first is not None,
                "detail": f"first on {first.at:%Y-%m-%d %H:%M} UTC" if first else None,
                "link": "#calls",
            },
        ]
        return {
            "environment": env_id,
            "checklist": checklist,
            "complete": all(i["done"] for i in checklist),
            "expiring": [
                {
                    "common_name": c.common_name,
                    "use": c.use,
                    "fingerprint": c.fingerprint,
                    "not_after": c.not_after.isoformat(timespec="seconds"),
                    "days_left": max(0, (c.not_after - now).days),
                }
                for c in certificates
                if c.not_after - now < EXPIRY_WARNING
            ],
            "calls": await self.recent_calls(actor, env_id, org=org),
        }

    async def overview(self, actor: Principal) -> dict[str, Any]:
        """Operators: organisations, users, certificates per environment, and the calls
        refused in the last hour by outcome code."""
        self._need_operator(actor)
        now = self.clock()
        async with self.sessions() as session:
            orgs = (await session.execute(select(func.count()).select_from(Organisation))).scalar()
            users = (await session.execute(select(User.active, User.pending_activation))).all()
            certificates = (
                await session.execute(
                    select(
                        Certificate.environment_id,
                        Certificate.use,
                        func.count(),
                        func.sum(case((Certificate.not_after < now + EXPIRY_WARNING, 1), else_=0)),
                    )
                    .where(Certificate.status == "active")
                    .group_by(Certificate.environment_id, Certificate.use)
                )
            ).all()
            refused = (
                await session.execute(
                    select(
                        GatewayRefusals.environment_id,
                        GatewayRefusals.outcome,
                        func.sum(GatewayRefusals.count),
                    )
                    .where(GatewayRefusals.minute >= _minute(now - dt.timedelta(hours=1)))
                    .group_by(GatewayRefusals.environment_id, GatewayRefusals.outcome)
                )
            ).all()
            envs = [
                e for (e,) in (await session.execute(select(Environment.id).order_by(Environment.position)))
            ]
        per_env: dict[str, dict[str, int]] = {e: {"mtls": 0, "signature": 0, "expiring": 0} for e in envs}
        for env, use, count, expiring in certificates:
            row = per_env.setdefault(env, {"mtls": 0, "signature": 0, "expiring": 0})
            row[use] = int(count)
            row["expiring"] += int(expiring or 0)
        return {
            "organisations": int(orgs or 0),
            "users": {
                "active": sum(1 for active, pending in users if active and not pending),
                "invited": sum(1 for active, pending in users if active and pending),
                "deactivated": sum(1 for active, _pending in users if not active),
            },
            "certificates": [{"environment": env, **counts} for env, counts in per_env.items()],
            "refused_last_hour": sorted(
                (
                    {"environment": env, "outcome": outcome, "count": int(count)}
                    for env, outcome, count in refused
                ),
                key=lambda r: (-int(r["count"]), str(r["environment"]), str(r["outcome"])),
            ),
        }
