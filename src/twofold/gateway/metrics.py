"""Prometheus metrics of the gateway, in their own registry (one per process)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BOUNDS = (*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf")  # as Prometheus writes `le`


class RequestCounts:
    """``twofold_gateway_requests_total{environment,product,outcome}`` and the latency
    histogram ``twofold_gateway_request_seconds{environment}``, counted in plain numbers on
    the event loop (a Prometheus counter and histogram per request cost more than the rest of
    the request's bookkeeping) and turned into metric families when scraped."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}  # environment → count per bucket, +Inf last
        self.sums: dict[str, float] = {}

    def count(self, environment: str, product: str, outcome: str, seconds: float) -> None:
        key = (environment, product, outcome)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        buckets = self.buckets.get(environment)
        if buckets is None:
            buckets = self.buckets[environment] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.sums[environment] = 0.0
        buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[environment] += seconds

    def describe(self) -> Iterator[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(empty=False)

    def _families(self, *, empty: bool) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "twofold_gateway_requests",
            "Requests by environment, product and outcome",
            labels=["environment", "product", "outcome"],
        )
        latency = HistogramMetricFamily(
            "twofold_gateway_request_seconds",
            "Time from request to response, upstream included",
            labels=["environment"],
        )
        if not empty:
            for labels, value in list(self.counts.items()):
                requests.add_metric(list(labels), value)
            for environment, buckets in list(self.buckets.items()):
                cumulative, total = [], 0
                for bound, value in zip(_BOUNDS, buckets, strict=True):
                    total += value
                    cumulative.append((bound, total))
                latency.add_metric([environment], cumulative, self.sums[environment])
        yield requests
        yield latency


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestCounts()
        self.registry.register(self.requests)
        self.handshake_failures = Counter(
            "twofold_gateway_tls_handshake_failures",
            "TLS handshakes that failed (untrusted or missing client certificate, protocol errors)",
            ["environment"],
            registry=self.registry,
        )
        self.connections_dropped = Counter(
            "twofold_gateway_connections_dropped",
            "Connections closed at once: 'shed' (still in the TLS handshake, to make room near the "
            "connection cap) or 'full' (refused: every connection was authenticated)",
            ["environment", "reason"],
            registry=self.registry,
        )
        self.connections = Gauge(
            "twofold_gateway_connections",
            "Open client connections, handshakes included",
            ["environment"],
            registry=self.registry,
        )
        self.expiring = Gauge(
            "twofold_certificates_expiring_30d",
            "Active certificates expiring within 30 days",
            ["environment"],
            registry=self.registry,
        )
        self.registry_version = Gauge(
            "twofold_registry_version",
            "Registry version of the gateway's snapshot",
            registry=self.registry,
        )
        self.snapshot_reloads = Counter(
            "twofold_snapshot_reloads", "Registry snapshots loaded since start", registry=self.registry
        )
        self.snapshot_seconds = Gauge(
            "twofold_snapshot_load_seconds",
            "How long the last registry snapshot took to load and apply (TLS trust included)",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
