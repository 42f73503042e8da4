"""Shared fixtures. Suites that need an outside part (PostgreSQL, nginx, Chromium, openssl,
curl) ask for it through `require(...)`: missing parts fail the run in CI (TWOFOLD_CI=1)
and are listed loudly as NOT RUN at the end of a local run — never passed silently."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from twofold.registry.service import Registry

T = TypeVar("T")

IN_CI = os.environ.get("TWOFOLD_CI") == "1"
_NOT_RUN: dict[str, set[str]] = {}
VECTORS = Path(__file__).parent / "vectors"


def require(part: str, available: bool, nodeid: str = "") -> None:
    """Skip (locally) or fail (CI) when an outside part is missing."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{part} is required in CI but is not available", pytrace=False)
    _NOT_RUN.setdefault(part, set()).add(nodeid)
    pytest.skip(f"NOT RUN: {part} is not available on this machine")


def require_binary(name: str, request: pytest.FixtureRequest | None = None) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    require(name, path is not None, request.node.nodeid if request else "")
    assert path is not None
    return path


@pytest.fixture
def openssl(request: pytest.FixtureRequest) -> str:
    return require_binary("openssl", request)


@pytest.fixture
def curl(request: pytest.FixtureRequest) -> str:
    return require_binary("curl", request)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    parts = sorted(
        {str(r.longrepr[2]).split("NOT RUN: ", 1)[1] for r in skipped if "NOT RUN:" in str(r.longrepr)}
    )
    if parts:
        terminalreporter.section("SUITES NOT RUN", sep="!", red=True, bold=True)
        for line in parts:
            terminalreporter.line(f"NOT RUN: {line}", red=True, bold=True)
        terminalreporter.line("These suites always run in CI (TWOFOLD_CI=1), where a missing part fails.")


# --- registry suites: every test on SQLite and on PostgreSQL --------------------------------

POSTGRES_PART = "PostgreSQL on 127.0.0.1:5432"
POSTGRES_HOST = os.environ.get("TWOFOLD_TEST_PGHOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("TWOFOLD_TEST_PGPORT", "5432"))


def _in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a loop of its own, in another thread, so that it
    cannot disturb the event loop pytest-asyncio gives the test."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


async def _postgres_admin(sql: str, database: str = "postgres") -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", database=database, timeout=5
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def own_postgres_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database of the caller's own, dropped afterwards (connections and
    all); NOT RUN locally / a failure in CI when PostgreSQL cannot be reached."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        _in_thread(lambda: _postgres_admin(f'CREATE DATABASE "{name}"'))
        reachable = True
    except Exception:
        reachable = False
    require(POSTGRES_PART, reachable)
    try:
        yield name
    finally:
        _in_thread(lambda: _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str | None]:
    """A database of this test session's own (each xdist worker is a session), created with
    a random name and dropped at the end; None when PostgreSQL cannot be reached."""
    name = f"twofold_test_{secrets.token_hex(6)}"
    try:
        _in_thread(lambda: _postgres_admin(f'CREATE DATABASE "{name}"'))
    except Exception:
        yield None
        return
    try:
        yield name
    finally:
        _in_thread(lambda: _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty registry database (no tables yet): a new SQLite file, or the
    session's PostgreSQL database with its `public` schema dropped and created again."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    database = request.getfixturevalue("postgres_database")
    require(POSTGRES_PART, database is not None, request.node.nodeid)
    _in_thread(lambda: _postgres_admin("DROP SCHEMA public CASCADE; CREATE SCHEMA public", database))
    return f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"


@pytest.fixture(scope="session")
def sqlite_registry_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite registry database migrated once per session: copying it is much cheaper than
    running every migration again for each test."""
    from twofold.registry.db import migrate

    path = tmp_path_factory.mktemp("registry-template") / "registry.db"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # Alembic runs its own loop
        pool.submit(migrate, f"sqlite:///{path}").result()
    return path


@pytest.fixture(scope="session")
def postgres_schema_sql() -> str:
    """The migrations' own SQL for PostgreSQL (Alembic's offline mode), made once: running it
    in one round trip is much cheaper than running Alembic for each test."""
    from alembic import command

    from twofold.registry.db import alembic_config

    config = alembic_config("postgresql://offline/schema")
    config.output_buffer = io.StringIO()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(command.upgrade, config, "head", sql=True).result()
    return config.output_buffer.getvalue()


@pytest.fixture
async def registry(registry_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    """`Registry.open` (which migrates) on a fresh schema, with the default environments.
    The fresh schema comes from the migrations, made cheaply: on SQLite a copy of a database
    migrated once this session, on PostgreSQL the migrations' SQL run in the empty schema;
    `Registry.open` then finds it current."""
    from twofold.registry.service import Registry

    if registry_url.startswith("sqlite:///"):
        template = request.getfixturevalue("sqlite_registry_template")
        shutil.copyfile(template, registry_url[len("sqlite:///") :])
    else:
        schema_sql = request.getfixturevalue("postgres_schema_sql")
        database = registry_url.rsplit("/", 1)[1]
        _in_thread(lambda: _postgres_admin(schema_sql, database))
    reg = await Registry.open(registry_url)
    try:
        await reg.ensure_defaults()
        yield reg
    finally:
        await reg.close()
