"""Finding the registry a command works on: `twofold serve` creates it; every other command
only opens one that exists, and says where it looked and how to point it elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from sqlalchemy.exc import DBAPIError

from twofold.errors import TwofoldError, UsageError
from twofold.registry.db import RegistryMissing, check_registry, database_failure, redact
from twofold.registry.service import Registry
from twofold.running import RunningServe, running_serves

T = TypeVar("T")
DEFAULT_DATA = "data"
HOW_TO_POINT = (
    "point to the serve's registry with --data DIR (or TWOFOLD_DATA=DIR), its data directory, "
    "or --db URL (or TWOFOLD_DB)"
)


def db_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--db",
        envvar="TWOFOLD_DB",
        help="Registry database URL instead of the SQLite file in --data (postgresql://… works "
        "the same). Env: TWOFOLD_DB.",
    )(fn)
    return click.option(
        "--data",
        envvar="TWOFOLD_DATA",
        help=f"Data directory of the `twofold serve` whose registry to use (default ./{DEFAULT_DATA}). "
        "Env: TWOFOLD_DATA.",
    )(fn)


def _source(name: str) -> str:
    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    if source is ParameterSource.ENVIRONMENT:
        return "from TWOFOLD_" + name.upper()
    if source is ParameterSource.COMMANDLINE:
        return f"given with --{name}"
    return f"the default, ./{DEFAULT_DATA}" if name == "data" else "the default"


def describe_serves(serves: list[RunningServe]) -> str:
    if not serves:
        return ""
    places = ", ".join(str(s.data) for s in serves[:3])
    if len(serves) == 1:
        return f" A twofold serve is running with its data in {places}: pass --data {places}."
    return f" twofold serves are running with their data in {places}: pass the --data of one."


def registry_url(data: str | None, db: str | None) -> str:
    return db or str(Path(data or DEFAULT_DATA) / "twofold.db")


async def open_existing(data: str | None, db: str | None, *, migrate: bool = True) -> Registry:
    """Open the registry of a serve, refusing (never creating) one that is not there."""
    url = registry_url(data, db)
    try:
        await check_registry(url)
    except RegistryMissing as missing:
        raise _not_found(missing, data, db) from None
    try:
        return await Registry.open(url, migrate=migrate)
    except (DBAPIError, OSError) as exc:
        raise _database_error(url, exc) from None


def _not_found(missing: RegistryMissing, data: str | None, db: str | None) -> UsageError:
    where = (
        f"at --db {redact(db)} ({_source('db')})"
        if db
        else f"in the data directory {Path(data or DEFAULT_DATA).resolve()} ({_source('data')})"
    )
    return UsageError(
        f"no twofold registry {where}: {missing.message}. Only `twofold serve` creates a registry; "
        f"{HOW_TO_POINT}.{describe_serves(running_serves())}",
        code="registry_not_found",
    )


def _database_error(url: str, exc: BaseException) -> TwofoldError:
    return database_failure(url, exc, "the command failed on", code="database_error")


def with_registry(data: str | None, db: str | None, work: Callable[[Registry], Awaitable[T]]) -> T:
    async def main() -> T:
        registry = await open_existing(data, db)
        try:
            return await work(registry)
        except DBAPIError as exc:
            raise _database_error(registry.url, exc) from None
        finally:
            await registry.close()

    return asyncio.run(main())
