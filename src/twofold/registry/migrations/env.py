"""Alembic environment: runs migrations on the async engine of the configured URL."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from twofold.registry.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        # SQLite's DDL is transactional, though Alembic assumes otherwise: with it, every
        # migration of one upgrade runs in one transaction under the write lock taken at BEGIN
        # IMMEDIATE, so a second process cannot read a half-upgraded version and run a step twice.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# PostgreSQL advisory lock key ("twof" + "migr") held while migrating.
MIGRATION_LOCK = 0x74776F66_6D696772


async def _run_async() -> None:
    """Several processes may open a new registry at once (`twofold serve` on many nodes): the
    first migrates, the others wait for it and then find the schema current."""
    url = config.get_main_option("sqlalchemy.url") or ""
    sqlite = url.startswith("sqlite")
    engine = create_async_engine(url, poolclass=NullPool, connect_args={"timeout": 60} if sqlite else {})
    if sqlite:

        @event.listens_for(engine.sync_engine, "connect")
        def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _write_lock_first(conn: Connection) -> None:
            # Take the write lock before reading alembic_version, as the registry's writers do.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    async with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            await connection.commit()  # the session-level lock stays until the connection closes
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
