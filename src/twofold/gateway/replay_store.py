"""Where replay ids are recorded: the registry database's ``replay_ids`` table, written with
the database driver itself on a connection of its own — one statement (one round trip) per
batch of ids, instead of a session's checkout, ping, BEGIN, INSERT and COMMIT.

* PostgreSQL: asyncpg, one prepared ``INSERT … SELECT unnest(…) ON CONFLICT … RETURNING``
  whatever the batch size; a statement outside a transaction block is its own transaction.
* SQLite: the standard library's sqlite3 in a thread of its own (a write may wait for another
  process's lock), WAL, one ``INSERT … VALUES … ON CONFLICT … RETURNING``.

``durable=False`` (serve's ``replay_durable = false``) commits these inserts without waiting
for the disk: PostgreSQL's ``synchronous_commit = off`` for this connection, SQLite's
``synchronous = NORMAL``. Every other gateway and node sees an id as soon as its insert
returns either way (visibility does not wait for the flush), and a crash of the gateway loses
nothing; only a crash of the database server (or of the machine) may forget the ids recorded
in its last fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from twofold.registry.db import RegistryUnavailable, is_sqlite, is_unavailable, normalise_url

log = logging.getLogger("twofold.gateway")
Key = tuple[int, bytes]
Row = tuple[int, bytes, int]  # organisation, SHA-256 of the id, expiry (seconds since 1970)
SQLITE_BATCH = 500  # rows per statement (three parameters each)

_PG_RECORD = """
INSERT INTO replay_ids (org_id, digest, expires_at)
SELECT * FROM unnest($1::integer[], $2::bytea[], $3::bigint[])
ON CONFLICT (org_id, digest) DO UPDATE SET expires_at = EXCLUDED.expires_at
WHERE replay_ids.expires_at <= $4
RETURNING org_id, digest
"""
_SQLITE_RECORD = """
INSERT INTO replay_ids (org_id, digest, expires_at) VALUES {values}
ON CONFLICT (org_id, digest) DO UPDATE SET expires_at = excluded.expires_at
WHERE replay_ids.expires_at <= ?
RETURNING org_id, digest
"""
_SWEEP = "DELETE FROM replay_ids WHERE expires_at <= {}"


def unavailable(exc: BaseException) -> RegistryUnavailable:
    log.warning(
        "replay ids cannot be recorded: the registry database cannot be reached (%s)", type(exc).__name__
    )
    return RegistryUnavailable(
        "the gateway cannot record this request's id in its registry database at the moment, so it "
        f"cannot tell a replay from a new request; nothing was forwarded — try again in {RegistryUnavailable.retry_after} s"
    )


class ReplayStore(Protocol):
    async def record(self, rows: list[Row], now: int) -> set[Key]:
        """Insert new ids (and take over expired ones); the keys this call wrote."""

    async def sweep(self, now: int) -> int:
        """Delete expired ids; how many."""

    async def close(self) -> None: ...


def open_store(url: str, *, durable: bool = True) -> ReplayStore:
    return SqliteStore(url, durable=durable) if is_sqlite(url) else PostgresStore(url, durable=durable)


class PostgresStore:
    def __init__(self, url: str, *, durable: bool) -> None:
        self.dsn = normalise_url(url).replace("postgresql+asyncpg://", "postgresql://", 1)
        self.durable = durable
        self._conn: Any = None

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            import asyncpg

            settings = {"application_name": "twofold-gateway-replay"}
            if not self.durable:
                settings["synchronous_commit"] = "off"
            self._conn = await asyncpg.connect(self.dsn, timeout=5, server_settings=settings)
        return self._conn

    async def _run(self, query: str, *args: Any) -> list[Any]:
        try:
            conn = await self._connection()
            return list(await conn.fetch(query, *args, timeout=10))
        except Exception as exc:
            if isinstance(exc, TimeoutError) or is_unavailable(exc):
                await self._drop()
                raise unavailable(exc) from exc
            raise

    async def record(self, rows: list[Row], now: int) -> set[Key]:
        orgs, digests, expiries = zip(*rows, strict=True)
        found = await self._run(_PG_RECORD, list(orgs), list(digests), list(expiries), now)
        return {(int(r["org_id"]), bytes(r["digest"])) for r in found}

    async def sweep(self, now: int) -> int:
        conn = await self._connection()
        status = await conn.execute(_SWEEP.format("$1"), now, timeout=30)
        return int(status.rsplit(" ", 1)[-1])

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)


class SqliteStore:
    def __init__(self, url: str, *, durable: bool) -> None:
        self.path = normalise_url(url).split(":///", 1)[1]
        self.durable = durable
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="twofold-replay")
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            self._conn = conn
        return self._conn

    def _record(self, rows: list[Row], now: int) -> set[Key]:
        conn = self._connection()
        fresh: set[Key] = set()
        for start in range(0, len(rows), SQLITE_BATCH):
            chunk = rows[start : start + SQLITE_BATCH]
            query = _SQLITE_RECORD.format(values=", ".join(["(?, ?, ?)"] * len(chunk)))
            params = [value for row in chunk for value in row]
            for org_id, digest in conn.execute(query, (*params, now)).fetchall():
                fresh.add((int(org_id), bytes(digest)))
        return fresh

    def _sweep(self, now: int) -> int:
        return self._connection().execute(_SWEEP.format("?"), (now,)).rowcount

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked for longer than the timeout, I/O, gone
            self._executor.submit(self._reset)
            raise unavailable(exc) from exc

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    async def record(self, rows: list[Row], now: int) -> set[Key]:
        result: set[Key] = await self._call(self._record, rows, now)
        return result

    async def sweep(self, now: int) -> int:
        return int(await self._call(self._sweep, now))

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._reset)
        self._executor.shutdown(wait=False)
