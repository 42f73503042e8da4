"""Prometheus metrics of the gateway, in their own registry (one per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "twofold_gateway_requests",
            "Requests by environment, product and outcome",
            ["environment", "product", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "twofold_gateway_request_seconds",
            "Time from request to response, upstream included",
            ["environment"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
