"""The append-only, hash-chained audit log.

Each entry's hash covers its content and the previous entry's hash; ``prev_hash`` is
unique, so concurrent writers cannot fork the chain (the loser retries). Verification
walks the chain: an altered entry breaks its own hash, a removed one breaks the link.
Removing entries at the very end is only detectable against a recorded head hash, which
``twofold admin audit verify`` prints (and checks with ``--expect-head``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry.models import AuditEntry

GENESIS = "0" * 64
# PostgreSQL advisory lock key ("twof" + "audi") that queues writers of the chain.
AUDIT_LOCK = 0x74776F66_61756469


def entry_hash(
    prev_hash: str,
    at: dt.datetime,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    org_id: int | None,
    details: dict[str, Any],
) -> str:
    body = json.dumps(
        {
            "at": at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "object_type": object_type,
            "object_id": object_id,
            "org_id": org_id,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


async def append(
    session: AsyncSession,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    org_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    if session.get_bind().dialect.name == "postgresql":
        # Writers queue here until the previous one commits, then read its entry as the head;
        # without it, concurrent writers all pick the same head and all but one fail on the
        # unique prev_hash and retry, which under a burst exhausts the retries (a 503).
        await session.execute(select(func.pg_advisory_xact_lock(AUDIT_LOCK)))
    last = (await session.execute(select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1))).scalar()
    prev = last or GENESIS
    # Stored with microsecond precision on every backend, so hash what will be read back.
    at = dt.datetime.now(dt.UTC)
    details = details or {}
    entry = AuditEntry(
        at=at,
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=object_id,
        org_id=org_id,
        details=details,
        prev_hash=prev,
        hash=entry_hash(prev, at, actor, action, object_type, object_id, org_id, details),
    )
    session.add(entry)
    await session.flush()
    return entry


@dataclass
class AuditReport:
    ok: bool
    entries: int
    head: str
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head": self.head, "problems": self.problems}


async def verify_chain(session: AsyncSession, expect_head: str | None = None) -> AuditReport:
    prev = GENESIS
    count = 0
    problems: list[str] = []
    rows = await session.stream_scalars(select(AuditEntry).order_by(AuditEntry.id))
    async for entry in rows:
        count += 1
        if entry.prev_hash != prev:
            problems.append(
                f"entry {entry.id} ({entry.action} by {entry.actor}) does not follow the previous entry: "
                "an entry before it was removed or reordered"
            )
        expected = entry_hash(
            entry.prev_hash,
            entry.at,
            entry.actor,
            entry.action,
            entry.object_type,
            entry.object_id,
            entry.org_id,
            entry.details,
        )
        if expected != entry.hash:
            problems.append(
                f"entry {entry.id} ({entry.action} by {entry.actor}) was altered: its hash does "
                "not match its content"
            )
        prev = entry.hash
    if expect_head is not None and expect_head != prev:
        problems.append(
            f"the chain ends at {prev[:16]}…, not at the expected head {expect_head[:16]}…: "
            "entries were removed from the end, or the log was replaced"
        )
    return AuditReport(not problems, count, prev, problems)
