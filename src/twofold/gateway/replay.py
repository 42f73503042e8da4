"""Replay protection for the API products that ask for it (``replay_window``).

A signed request to such a product must carry its signing time (``iat``, or the field the
product names: a payload field, or a JWS header parameter such as
``http://openbanking.org.uk/iat``) within ± the window of the gateway's clock, and an id
(``jti``, or the product's id field — a payment's instruction id, say) that the
organisation has not used before. Both are read from what the signature covers.

* The verify step (:func:`claim`) checks the time and reads the id: no I/O, a refusal
  costs nothing.
* The forward step (:class:`ReplayGuard`) records the id in the registry database before
  anything is forwarded. The database decides — a primary key on (organisation, SHA-256 of
  the id) — so every worker and node sees every id: of two gateways given the same signed
  request at the same moment, one forwards it and the other answers 409. The database
  unreachable fails closed (503).

What is kept off the request's critical path: ids of concurrent requests are recorded in
one statement per event-loop turn (one round trip for however many are waiting, with the
database driver on a connection of its own: :mod:`twofold.gateway.replay_store`), ids this
process has recorded are refused from memory without a round trip, and expired ids are
deleted by a background sweep. An id is kept until its request's time has left the window
(plus :data:`CLOCK_SLACK` for clocks that disagree between nodes); after that the window
alone refuses the request, so the same id may be used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from twofold.crypto import jws
from twofold.errors import TwofoldError
from twofold.gateway.replay_store import open_store
from twofold.registry.catalogue import HEADER_FIELD, field_ref
from twofold.registry.service import Registry

log = logging.getLogger("twofold.gateway")

CLOCK_SLACK = 60  # seconds an id outlives its window: node clocks may disagree this much
SWEEP_INTERVAL = 60.0
BATCH_ROWS = 500  # ids per INSERT (three bind parameters each)
REMEMBERED = 65536  # ids this process recorded, refused again without a round trip


class ReplayError(TwofoldError):
    code = "replay_detected"


@dataclass(frozen=True, slots=True)
class ReplayPolicy:
    """A product's replay settings, parsed once per snapshot."""

    window: int
    iat_name: str  # as configured, for messages
    iat_in_header: bool
    iat_path: tuple[str, ...]
    id_name: str
    id_in_header: bool
    id_path: tuple[str, ...]

    @classmethod
    def of(cls, window: int | None, iat: str, id_field: str) -> ReplayPolicy | None:
        if not window:
            return None
        iat_in_header, iat_path = field_ref(iat, "the replay time field")
        id_in_header, id_path = field_ref(id_field, "the replay id field")
        return cls(window, iat, iat_in_header, iat_path, id_field, id_in_header, id_path)


class Claim(NamedTuple):
    """An id to record before the request is forwarded."""

    org_id: int
    org: str
    digest: bytes  # SHA-256 of the id
    expires_at: int  # seconds since the epoch
    id_name: str


# --- the verify step: time and id, from what the signature covers -------------------------------


def _where(in_header: bool, name: str) -> str:
    return (
        f"in the JWS header as {name[len(HEADER_FIELD) :]!r}"
        if in_header
        else f"in the signed payload as {name!r}"
    )


def _name(in_header: bool, name: str) -> str:
    return repr(name[len(HEADER_FIELD) :] if in_header else name)


def _lookup(source: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(source, dict):
            return None
        source = source.get(name)
    return source


def claim(policy: ReplayPolicy, token: bytes, payload: bytes, org_id: int, org: str, now: float) -> Claim:
    """The id to record for a verified request (``token`` is the JWS as received, ``payload``
    what it signs), or a refusal when its time is missing or outside the window, or it has no id."""
    header = None
    if policy.iat_in_header or policy.id_in_header:
        header = jws.parse_header(token.strip().split(b".", 1)[0].decode("ascii"))
    body = json.loads(payload) if not (policy.iat_in_header and policy.id_in_header) else None
    iat = _lookup(header if policy.iat_in_header else body, policy.iat_path)
    if isinstance(iat, bool) or not isinstance(iat, (int, float)) or not math.isfinite(iat):
        raise ReplayError(
            f"this API refuses replayed requests: put the signing time {_where(policy.iat_in_header, policy.iat_name)}"
            f", in seconds since 1970 (now {int(now)})",
            code="replay_iat_missing",
            status=400,
        )
    if abs(now - iat) > policy.window:
        raise ReplayError(
            f"the request's {_name(policy.iat_in_header, policy.iat_name)} says it was signed at {int(iat)}, "
            f"{abs(int(now - iat))} s "
            f"{'before' if iat < now else 'after'} the gateway's clock ({int(now)}); it is accepted within "
            f"{policy.window} s: sign each request just before sending it, with a correct clock",
            code="replay_iat_outside_window",
            status=400,
        )
    value = _lookup(header if policy.id_in_header else body, policy.id_path)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise ReplayError(
            f"this API refuses replayed requests: give each request a unique id (1 to 1000 characters) "
            f"{_where(policy.id_in_header, policy.id_name)}",
            code="replay_id_missing",
            status=400,
        )
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return Claim(org_id, org, digest, int(iat) + policy.window + CLOCK_SLACK + 1, policy.id_name)


def replayed(claim: Claim) -> ReplayError:
    return ReplayError(
        f"this signed request was received before: organisation {claim.org} already used its "
        f"{claim.id_name} — sign each request with a new {claim.id_name}; nothing was forwarded",
        code="replay_detected",
        status=409,
    )


# --- the forward step: the database decides ------------------------------------------------------


class ReplayGuard:
    """Records ids in the registry database; see the module's description."""

    def __init__(
        self, registry: Registry, *, durable: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.store = open_store(registry.url, durable=durable)
        self._pending: dict[tuple[int, bytes], tuple[int, list[asyncio.Future[bool]]]] = {}
        self._flushing = False
        self._remembered: dict[tuple[int, bytes], int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0  # statements sent (for tests and benchmarks)

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.store.close()

    async def admit(self, claim: Claim) -> None:
        """Returns once the id is recorded as this request's; raises a 409 when it was
        recorded before (here or on any node), a 503 when the database cannot be reached."""
        key = (claim.org_id, claim.digest)
        if self._remembered.get(key, 0) > self.clock():
            raise replayed(claim)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = (claim.expires_at, [future])
        else:
            entry[1].append(future)  # the same id twice in one batch: the second is a replay
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.get_running_loop().create_task(self._flush())  # kept: not collected
        if not await future:
            raise replayed(claim)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    fresh = await self._record(batch)
                except Exception as exc:
                    for _expires, futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for key, (expires, futures) in batch.items():
                    won = key in fresh
                    if won:
                        self._remember(key, expires)
                    for index, future in enumerate(futures):
                        if not future.done():
                            future.set_result(won and index == 0)
        finally:
            self._flushing = False

    async def _record(
        self, batch: dict[tuple[int, bytes], tuple[int, list[asyncio.Future[bool]]]]
    ) -> set[tuple[int, bytes]]:
        """One statement for the batch: a new id is inserted, an expired one taken over; the
        keys it wrote (the others were recorded before and are still valid)."""
        self.round_trips += 1
        rows = [(org_id, digest, expires) for (org_id, digest), (expires, _f) in batch.items()]
        return await self.store.record(rows, int(self.clock()))

    def _remember(self, key: tuple[int, bytes], expires: int) -> None:
        remembered = self._remembered
        remembered[key] = expires
        if len(remembered) > REMEMBERED:
            now = self.clock()
            for old in [k for k, e in remembered.items() if e <= now] or list(remembered)[: REMEMBERED // 4]:
                del remembered[old]

    async def sweep_once(self) -> int:
        """Delete the ids whose window has passed; returns how many."""
        now = int(self.clock())
        deleted = await self.store.sweep(now)
        for key in [k for k, e in self._remembered.items() if e <= now]:
            del self._remembered[key]
        return deleted

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL * random.uniform(0.75, 1.25))  # nodes spread out
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be away: the next sweep catches up
                log.warning("expired replay ids not deleted (%s); trying again later", type(exc).__name__)
