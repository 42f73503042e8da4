"""The registry's foundation: the engine, transactions, the change counter that gateways
watch, and the helpers shared by the aggregates (organisations, users, certificates …)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

from sqlalchemy import event, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from twofold.registry import audit
from twofold.registry.auth import (
    Principal,
)
from twofold.registry.db import Sessions, create_engine, in_transaction, is_sqlite, sessionmaker
from twofold.registry.models import (
    Certificate,
    Organisation,
    RegistryVersion,
    User,
    utcnow,
)
from twofold.registry.rules import (
    Forbidden,
    NotFound,
    RegistryError,
)

T = TypeVar("T")
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NOTIFY_CHANNEL = "twofold_registry"


_CHANGED = "twofold_changed_certificates"


@event.listens_for(Session, "before_flush")
def _track_certificates(session: Session, _context: object, _instances: object) -> None:
    """Remember the certificates a transaction adds or changes, for its version bump."""
    changed = [obj for obj in (*session.new, *session.dirty) if isinstance(obj, Certificate)]
    if changed:
        session.info.setdefault(_CHANGED, set()).update(changed)


def _slug(value: str, what: str) -> str:
    value = value.strip().lower()
    if not SLUG.match(value):
        raise RegistryError(
            f"{what} {value!r} must be lower-case letters, digits and dashes (max 63)", code="slug_invalid"
        )
    return value


class RegistryBase:
    """Connection, transactions and the helpers every aggregate uses."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.sessions: Sessions = sessionmaker(engine)
        # What time it is for links, second-factor codes and the dashboard: tests move it.
        self.clock: Callable[[], dt.datetime] = utcnow

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, readonly: bool = False) -> Self:
        if migrate:
            from twofold.registry.db import migrate_async

            await migrate_async(url)
        return cls(create_engine(url, readonly=readonly), url)

    async def close(self) -> None:
        await self.engine.dispose()

    async def _tx(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await in_transaction(self.sessions, work)

    async def _bump(self, session: AsyncSession) -> None:
        """Tell gateways something they care about changed; the certificates this transaction
        added or changed carry the new version (the row lock on the version orders the bumps
        as their transactions commit, so a gateway holding version V needs exactly the rows
        changed after V)."""
        now = utcnow()
        result = await session.execute(
            update(RegistryVersion)
            .where(RegistryVersion.id == 1)
            .values(version=RegistryVersion.version + 1, changed_at=now)
            .returning(RegistryVersion.version)
        )
        version = result.scalar()
        if version is None:
            version = 1
            session.add(RegistryVersion(id=1, version=1, changed_at=now))
            await session.flush()
        changed = session.info.pop(_CHANGED, set())
        changed.update(obj for obj in (*session.new, *session.dirty) if isinstance(obj, Certificate))
        for certificate in changed:
            certificate.changed_version = version
        if changed:
            await session.flush()
            session.info.pop(_CHANGED, None)
        if not is_sqlite(self.url):
            await session.execute(select(func.pg_notify(NOTIFY_CHANNEL, "changed")))

    async def version(self) -> int:
        async with self.sessions() as session:
            value = (
                await session.execute(select(RegistryVersion.version).where(RegistryVersion.id == 1))
            ).scalar()
            return int(value or 0)

    @staticmethod
    def _need_operator(actor: Principal) -> None:
        if not actor.is_operator:
            raise Forbidden("only platform operators may do this", code="operator_only")

    @staticmethod
    def _need_second_factor(actor: Principal) -> None:
        """Credential changes need a session that passed the second factor (where the
        account has or needs one)."""
        if actor.needs_second_factor:
            raise Forbidden(
                "confirm this session with your authenticator code first (sign out and in again)",
                code="second_factor_required",
            )

    @staticmethod
    async def _user_by_email(session: AsyncSession, email: str) -> User:
        user = (await session.execute(select(User).where(User.email == email.strip().lower()))).scalar()
        if user is None:
            raise NotFound(f"no user {email}", code="user_not_found")
        return user

    async def _org_by_slug(self, session: AsyncSession, slug: str) -> Organisation:
        org = (
            await session.execute(select(Organisation).where(Organisation.slug == slug.strip().lower()))
        ).scalar()
        if org is None:
            raise NotFound(f"no organisation {slug!r}", code="org_not_found")
        return org

    # --- audit ----------------------------------------------------------------------------

    async def audit_entries(
        self, actor: Principal, *, limit: int = 200, org: str | None = None
    ) -> list[dict[str, Any]]:
        from twofold.registry.models import AuditEntry

        async with self.sessions() as session:
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, 1000)))
            if actor.is_operator:
                if org:
                    query = query.where(AuditEntry.org_id == (await self._org_by_slug(session, org)).id)
            else:
                query = query.where(AuditEntry.org_id == actor.org_id)
            entries = list((await session.execute(query)).scalars())
            labels = await self._audit_labels(session, entries)
            return [
                {
                    "id": e.id,
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "action": e.action,
                    "object_type": e.object_type,
                    "object_id": e.object_id,
                    "object_label": labels.get((e.object_type, e.object_id), e.object_id),
                    "details": e.details,
                    "hash": e.hash,
                }
                for e in entries
            ]

    @staticmethod
    async def _audit_labels(session: AsyncSession, entries: list[Any]) -> dict[tuple[str, str], str]:
        """What a person calls an entry's object: a project's name (its id means nothing to
        them; a deleted project keeps the name its entries recorded), a certificate's CN."""
        from twofold.registry.models import Project

        labels: dict[tuple[str, str], str] = {}
        for e in entries:
            name = (e.details or {}).get("name" if e.object_type == "project" else "common_name")
            if e.object_type in ("project", "certificate") and isinstance(name, str):
                labels.setdefault((e.object_type, e.object_id), name)
        ids = {int(e.object_id) for e in entries if e.object_type == "project" and e.object_id.isdigit()}
        if ids:
            for project_id, name in await session.execute(
                select(Project.id, Project.name).where(Project.id.in_(ids))
            ):
                labels[("project", str(project_id))] = name
        return labels

    async def verify_audit(self, expect_head: str | None = None) -> audit.AuditReport:
        async with self.sessions() as session:
            return await audit.verify_chain(session, expect_head)
