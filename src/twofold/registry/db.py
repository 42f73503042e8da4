"""Engines, migrations and transactions that survive concurrent writers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event, inspect
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from twofold.errors import TwofoldError

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")
log = logging.getLogger("twofold.registry")
MIGRATIONS = Path(__file__).with_name("migrations")


def normalise_url(url: str) -> str:
    """Accept what people type: a file path, ``sqlite:///x.db``, ``postgresql://…``."""
    if "://" not in url:
        return f"sqlite+aiosqlite:///{Path(url).resolve()}"
    scheme, rest = url.split("://", 1)
    if scheme in ("sqlite", "sqlite+pysqlite"):
        return f"sqlite+aiosqlite://{rest}"
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg"):
        return f"postgresql+asyncpg://{rest}"
    if scheme in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        return url
    raise TwofoldError(
        f"twofold keeps its registry in SQLite (a file path, or sqlite:///path) or PostgreSQL "
        f"(postgresql://…), not {scheme}://",
        code="database_url_invalid",
    )


def check_sqlite_location(url: str) -> None:
    """A SQLite registry file must be a file (or not exist yet: `twofold serve` creates it)."""
    path = _sqlite_path(url) if is_sqlite(url) else None
    if path is not None and path.exists() and not path.is_file():
        raise TwofoldError(
            f"the registry database {path} is a directory, not a file", code="database_url_invalid"
        )


def is_sqlite(url: str) -> bool:
    return normalise_url(url).startswith("sqlite")


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def create_engine(url: str, *, readonly: bool = False, **kwargs: Any) -> AsyncEngine:
    """An engine for ``url``. On SQLite, writers start with BEGIN IMMEDIATE; a ``readonly``
    engine (the gateway's) uses deferred transactions and never waits for writers (WAL)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets gateway processes read while the portal writes; foreign keys are off
            # by default in SQLite. Transactions start with BEGIN IMMEDIATE (see below).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Take the write lock at the start: read-then-write transactions cannot then
            # deadlock on lock upgrade (SQLITE_BUSY without waiting).
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    # A database that does not answer is refused after 5 s (asyncpg waits 60 by default).
    connect_args = {"timeout": 5, **kwargs.pop("connect_args", {})}
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_pre_ping=True, connect_args=connect_args, **kwargs
    )


class RegistryUnavailable(TwofoldError):
    """The database cannot be reached (down, restarting, unreachable, out of connections)."""

    code = "registry_unavailable"
    status = 503
    retry_after = 5


# SQLSTATE classes that mean "the database is not there for us right now": connection
# exception, insufficient resources (too many connections), operator intervention (shutdown,
# terminated backend, starting up), invalid authorization (credentials changed under us).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "28")


def is_unavailable(exc: BaseException) -> bool:
    """True for errors that say the database cannot be reached, as opposed to a bug or a
    refused statement: those stay errors (and are logged as such)."""
    if isinstance(exc, (OSError, PoolTimeout, InterfaceError, OperationalError)):
        return True  # OSError: refused, reset, timed out; OperationalError: SQLite cannot open/read
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig or exc
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
        return True
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError))


def _unavailable(exc: BaseException) -> RegistryUnavailable:
    log.warning("the registry database cannot be reached (%s)", type(exc).__name__)
    return RegistryUnavailable(
        f"the registry database cannot be reached at the moment; nothing was changed — try again "
        f"in {RegistryUnavailable.retry_after} seconds",
    )


class Sessions:
    """``async_sessionmaker`` whose sessions turn "the database cannot be reached" — wherever it
    shows: connecting, a statement, commit — into :class:`RegistryUnavailable` (a 503 with
    ``Retry-After`` for every caller), instead of a driver error that reads as a bug."""

    def __init__(self, maker: async_sessionmaker[AsyncSession]) -> None:
        self.maker = maker

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self.maker() as session:
                yield session
        except TwofoldError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise


def sessionmaker(engine: AsyncEngine) -> Sessions:
    return Sessions(async_sessionmaker(engine, expire_on_commit=False))


def alembic_config(url: str) -> Config:
    # Alembic is imported only where migrations run: every command imports this module.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the database schema up to date (idempotent). Runs Alembic in this thread."""
    database = None
    if is_sqlite(url):
        path = normalise_url(url).split(":///", 1)[1]
        if path and path != ":memory:":
            database = Path(path)
            database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            database.touch(mode=0o600)  # before SQLite creates it world-readable (its -wal/-shm follow)
    from alembic import command

    command.upgrade(alembic_config(url), "head")
    if database is not None:
        database.chmod(0o600)  # password hashes, sessions, payment data


async def migrate_async(url: str) -> None:
    await asyncio.to_thread(migrate, url)


class Retry(Exception):
    """Raised inside a transaction to run it again (a unique-constraint race was lost)."""


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (IntegrityError, Retry)):
        return True
    if isinstance(exc, OperationalError) and "locked" in str(exc).lower():
        return True
    if isinstance(exc, DBAPIError):
        code = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
            getattr(exc, "orig", None), "pgcode", None
        )
        return code in ("40001", "40P01", "23505")
    return False


async def in_transaction(
    maker: Sessions,
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = 8,
) -> T:
    """Run ``work`` in a transaction; on a lost race (unique violation, serialisation
    failure, SQLite lock) roll back and run it again, so that its checks see the winner's
    row and refuse cleanly instead of surfacing a database error."""
    last: BaseException | None = None
    for attempt in range(attempts):
        async with maker() as session:
            try:
                async with session.begin():
                    return await work(session)
            except TwofoldError:
                raise
            except Exception as exc:
                if not _is_retryable(exc):
                    raise
                last = exc
                log.debug("transaction retry %d after %s", attempt + 1, type(exc).__name__)
        await asyncio.sleep(0.005 * (attempt + 1))
    busy = TwofoldError(
        "the registry is busy with concurrent changes; try again", code="registry_busy", status=503
    )
    busy.retry_after = 1
    raise busy from last


def database_failure(url: str, exc: BaseException, doing: str, *, code: str) -> TwofoldError:
    """A database error said in one line: what failed, with which database (no password)."""
    cause = getattr(exc, "orig", None) or exc
    first = str(cause).splitlines()[0] if str(cause) else "no answer"
    return TwofoldError(
        f"{doing} the registry database {redact(url)}: {type(cause).__name__}: {first}", code=code
    )


class RegistryMissing(TwofoldError):
    """The database a command was pointed at is not a registry `twofold serve` made."""

    code = "registry_not_found"


def _sqlite_path(url: str) -> Path | None:
    path = normalise_url(url).split(":///", 1)[1] if is_sqlite(url) else None
    return Path(path) if path and path != ":memory:" else None


async def check_registry(url: str) -> None:
    """Raise RegistryMissing unless ``url`` holds a registry (its migration table): commands
    other than `twofold serve` must never create one by opening a path that is wrong."""
    if is_sqlite(url):
        path = _sqlite_path(url)
        if path is None:
            return
        if not path.is_file():
            raise RegistryMissing(f"{path} does not exist")
        await asyncio.to_thread(_check_sqlite, path)
        return
    engine = create_async_engine(normalise_url(url), pool_pre_ping=False)
    try:
        async with engine.connect() as conn:
            has_table = await conn.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))
    except (TimeoutError, OSError, DBAPIError) as exc:
        raise database_failure(url, exc, "cannot connect to", code="database_unreachable") from None
    finally:
        await engine.dispose()
    if not has_table:
        raise RegistryMissing(f"the database {redact(url)} has no twofold tables")


def _check_sqlite(path: Path) -> None:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)  # read-only: never creates
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        raise RegistryMissing(f"{path} is not an SQLite database") from None
    if not found:
        raise RegistryMissing(
            f"{path} is an empty database (an older twofold admin command may have left it: delete it)"
        )
