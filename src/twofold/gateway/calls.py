"""Recording the gateway's calls for the dashboards, off the request path.

The hook (:meth:`CallRecorder.record`) costs one flat tuple and one append to a deque per
request: no I/O, no formatting, no locks, nothing the garbage collector keeps tracking. A background task takes what has queued every ``interval``
seconds, collapses it — the newest 100 calls per organisation and environment (the dashboard
shows no more; older ones would be pruned at once), refusals as counts per minute and outcome,
first successes not stored yet — and writes that in one transaction through
:meth:`~twofold.registry.service.Registry.record_calls`, so the cost of a write is bounded
whatever the request rate, and the dashboard survives a restart. When the registry is
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
from collections.abc import Awaitable, Callable
from typing import Protocol

from twofold.registry.calls import KEEP, CallBatch, CallRecord

log = logging.getLogger("twofold.gateway.calls")


class Outcome(Protocol):
    """What the gateway knows about a request once it has answered."""

    org_id: int | None
    product: str | None
    code: str
    message: str | None


Writer = Callable[[CallBatch], Awaitable[None]]


class CallRecorder:
    def __init__(self, write: Writer, *, capacity: int = 50_000, interval: float = 1.0) -> None:
        self._write = write
        # Flat tuples of strings and numbers: the garbage collector stops tracking them, so a
        # second's worth of queued calls does not make its collections slower.
        self._queue: deque[tuple[float, str, int | None, str | None, str, str | None, str, str, int]] = (
            deque()
        )
        self.capacity = capacity
        self.interval = interval
        self.dropped = 0
        self.written = 0
        self._failed: CallBatch | None = None  # a batch the registry did not take yet
        self._marked: set[tuple[int, str]] = set()  # first successes already stored
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def record(self, env: str, outcome: Outcome, method: str, path: str, status: int) -> None:
        """The per-request hook: queue the call."""
        self._queue.append(
            (
                time.time(),
                env,
                outcome.org_id,
                outcome.product,
                outcome.code,
                outcome.message,
                method,
                path,
                status,
            )
        )

    def pending(self) -> int:
        return len(self._queue) + (len(self._failed) if self._failed else 0)

    def _take(self) -> CallBatch:
        """Everything queued, collapsed: the newest KEEP calls per organisation and
        environment as records, refusals as counts, first successes not stored yet."""
        queue = self._queue
        excess = len(queue) - self.capacity
        if excess > 0:  # the registry has been away for a while: keep the newest
            for _ in range(excess):
                queue.popleft()
            self.dropped += excess
            log.warning("dropped %d gateway call records (the registry is not taking them)", excess)
        items = [queue.popleft() for _ in range(len(queue))]
        batch = CallBatch()
        kept: dict[tuple[int, str], int] = {}
        chosen = []
        for item in reversed(items):  # newest first
            at, env, org_id, _product, code, _message, _method, _path, status = item
            if status >= 400:
                batch.refusals[(env, _minute(at), code)] += 1
            elif org_id is not None and (org_id, env) not in self._marked:
                batch.first_ok[(org_id, env)] = _utc(at)  # ends with the oldest
            if org_id is not None:
                count = kept.get((org_id, env), 0)
                if count < KEEP:
                    kept[(org_id, env)] = count + 1
                    chosen.append(item)
        for at, env, org_id, product, code, message, method, path, status in reversed(chosen):
            batch.calls.append(
                CallRecord(
                    at=_utc(at),
                    environment=env,
                    org_id=org_id,
                    product=product,
                    method=method,
                    path=path,
                    status=status,
                    outcome=code,
                    message=message if status >= 400 else None,
                )
            )
        return batch

    async def flush(self) -> int:
        """Write what is queued (after a batch that failed before); returns how many calls
        were written (listed or counted)."""
        total = 0
        for _ in range(2):
            batch = self._failed or self._take()
            self._failed = None
            if not (batch.calls or batch.refusals or batch.first_ok):
                break
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                self._failed = batch
                raise
            except Exception as exc:
                self._failed = batch
                log.warning(
                    "could not store %d gateway calls (%s); will retry", len(batch), type(exc).__name__
                )
                break
            self._marked.update(batch.first_ok)
            total += len(batch)
        self.written += total
        return total

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


def _minute(at: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(at - at % 60, dt.UTC)


def _utc(at: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(at, dt.UTC)
