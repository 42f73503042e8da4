"""One node's gateway processes seen as one: the main process's admin listener answers for the
extra workers of `serve --workers N` too.

Each extra worker serves its own health and metrics on a private unix socket
(``<data>/run/gateway-<index>.sock``, 0600); the main process fetches them when scraped and
merges them with its own, so that one ``/metrics`` covers the node — the same
equivalent of prometheus_client's multiprocess mode that works for the hot path's counts,
which are plain numbers turned into metric families when scraped (the multiprocess mode only
knows the library's own counters). Merging: counters, histograms and the connection gauges
are summed over processes; ``twofold_registry_version`` is the lowest (the node is as current
as its slowest process), the other gauges the highest; ``*_created`` the earliest.
``twofold_gateway_processes{state}`` says how many processes answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("twofold.gateway")

FETCH_TIMEOUT = 2.0
LOWEST = frozenset({"twofold_registry_version"})
SUMMED_GAUGES = frozenset({"twofold_gateway_connections"})


def worker_socket(run_dir: Path, index: int) -> Path:
    return run_dir / f"gateway-{index}.sock"


@dataclass(frozen=True)
class Answer:
    index: int
    status: int | None  # None: the worker did not answer
    body: bytes


class Workers:
    """The extra gateway processes of this node, by their admin sockets."""

    def __init__(self, sockets: dict[int, Path]) -> None:
        self.sockets = sockets
        self._silent: set[int] = set()  # warned about, until it answers again

    async def fetch(self, path: str) -> list[Answer]:
        return list(await asyncio.gather(*(self._get(i, s, path) for i, s in sorted(self.sockets.items()))))

    async def _get(self, index: int, socket: Path, path: str) -> Answer:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(socket)), timeout=timeout
                ) as session,
                session.get(f"http://worker{path}") as response,
            ):
                answer = Answer(index, response.status, await response.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if index not in self._silent:  # starting, stopped or stuck: said once, not per scrape
                self._silent.add(index)
                log.warning(
                    "gateway process %d does not answer on %s (%s)", index, socket, type(exc).__name__
                )
            return Answer(index, None, b"")
        self._silent.discard(index)
        return answer

    async def readiness(self) -> list[dict[str, Any]]:
        """Each worker's /readyz: its index, whether it is ready, the registry version it serves."""
        states = []
        for answer in await self.fetch("/readyz"):
            state: dict[str, Any] = {"index": answer.index, "ready": False, "registry_version": None}
            if answer.status is not None:
                with contextlib.suppress(ValueError):
                    body = json.loads(answer.body)
                    state["ready"] = answer.status == 200 and bool(body.get("ready"))
                    state["registry_version"] = body.get("registry_version")
            states.append(state)
        return states

    async def metrics(self, own: bytes) -> bytes:
        """The node's metrics: this process's (``own``, exposition text) and every worker's, merged."""
        texts = [own.decode()]
        silent = 0
        for answer in await self.fetch("/metrics"):
            if answer.status == 200:
                texts.append(answer.body.decode())
            else:
                silent += 1
        return merge(texts, answering=len(texts), silent=silent)


def _combine(name: str, kind: str, sample: str, values: list[float]) -> float:
    if sample.endswith("_created"):
        return min(values)
    if kind in ("counter", "histogram", "summary", "untyped", "unknown"):
        return sum(values)
    if name in LOWEST:
        return min(values)
    if name in SUMMED_GAUGES:
        return sum(values)
    return max(values)


class _Merged:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge(texts: list[str], *, answering: int, silent: int) -> bytes:
    """Exposition texts of several processes as one."""
    order: list[str] = []
    kinds: dict[str, tuple[str, str]] = {}  # family → (type, help)
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in kinds:
                order.append(family.name)
                kinds[family.name] = (family.type, family.documentation)
                samples[family.name] = {}
            bucket = samples[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                bucket.setdefault(key, []).append(sample.value)
    families = []
    for name in order:
        kind, documentation = kinds[name]
        metric = Metric(name, documentation, kind)
        for (sample_name, labels), values in samples[name].items():
            metric.samples.append(
                Sample(sample_name, dict(labels), _combine(name, kind, sample_name, values))
            )
        families.append(metric)
    processes = Metric(
        "twofold_gateway_processes", "Gateway processes of this node, by whether they answered", "gauge"
    )
    processes.samples.append(Sample("twofold_gateway_processes", {"state": "answering"}, float(answering)))
    processes.samples.append(Sample("twofold_gateway_processes", {"state": "silent"}, float(silent)))
    families.append(processes)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(families))
    return generate_latest(registry)
