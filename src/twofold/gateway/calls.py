"""Recording the gateway's calls for the dashboards, off the request path.

The hook (:meth:`CallRecorder.record`) costs one tuple and one append to a bounded deque per
request: no I/O, no formatting, no locks. A background task takes what has queued every
``interval`` seconds and writes it in one transaction through
:meth:`~twofold.registry.service.Registry.record_calls` (which keeps the newest 100 calls per
organisation and environment, so the dashboard survives a restart). When the registry is
unreachable the batch is kept and tried again; when more than ``capacity`` calls are waiting
the oldest are dropped (and counted), so a database outage cannot grow memory.

What is recorded: time, environment, the organisation (when the client certificate identified
one), product, method, path, status, outcome code and the gateway's own refusal message —
never bodies, header values or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from twofold.registry.calls import CallRecord

log = logging.getLogger("twofold.gateway.calls")


class Outcome(Protocol):
    """What the gateway knows about a request once it has answered."""

    org_id: int | None
    product: str | None
    code: str
    message: str | None


Writer = Callable[[Sequence[CallRecord]], Awaitable[None]]


class CallRecorder:
    def __init__(self, write: Writer, *, capacity: int = 20_000, interval: float = 1.0, batch: int = 2_000):
        self._write = write
        self._queue: deque[tuple[float, str, Any, str, str, int]] = deque()
        self.capacity = capacity
        self.interval = interval
        self.batch = batch
        self.dropped = 0
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def record(self, env: str, outcome: Outcome, method: str, path: str, status: int) -> None:
        """The per-request hook: queue the call (the outcome object is read later)."""
        self._queue.append((time.time(), env, outcome, method, path, status))

    def pending(self) -> int:
        return len(self._queue)

    def _take(self) -> list[CallRecord]:
        queue = self._queue
        excess = len(queue) - self.capacity
        if excess > 0:  # the registry has been away for a while: keep the newest
            for _ in range(excess):
                queue.popleft()
            self.dropped += excess
            log.warning("dropped %d gateway call records (the registry is not taking them)", excess)
        records = []
        for _ in range(min(len(queue), self.batch)):
            at, env, outcome, method, path, status = queue.popleft()
            records.append(
                CallRecord(
                    at=dt.datetime.fromtimestamp(at, dt.UTC),
                    environment=env,
                    org_id=outcome.org_id,
                    product=outcome.product,
                    method=method,
                    path=path,
                    status=status,
                    outcome=outcome.code,
                    message=outcome.message if status >= 400 else None,
                )
            )
        return records

    async def flush(self) -> int:
        """Write everything queued so far; returns how many calls were written."""
        total = 0
        while self._queue:
            records = self._take()
            try:
                await self._write(records)
            except asyncio.CancelledError:
                self._put_back(records)
                raise
            except Exception as exc:
                self._put_back(records)
                log.warning(
                    "could not store %d gateway calls (%s); will retry", len(records), type(exc).__name__
                )
                break
            total += len(records)
        self.written += total
        return total

    def _put_back(self, records: list[CallRecord]) -> None:
        for record in reversed(records):
            outcome = _Stored(record.org_id, record.product, record.outcome, record.message)
            self._queue.appendleft(
                (
                    record.at.timestamp(),
                    record.environment,
                    outcome,
                    record.method,
                    record.path,
                    record.status,
                )
            )

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        """Stop the background task and write what is still queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 10)


class _Stored:
    """An outcome taken back into the queue after a failed write."""

    __slots__ = ("code", "message", "org_id", "product")

    def __init__(self, org_id: int | None, product: str | None, code: str, message: str | None) -> None:
        self.org_id, self.product, self.code, self.message = org_id, product, code, message
