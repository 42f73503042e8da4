"""How one node's /metrics merges its gateway processes' metrics (the exposition texts of
real Metrics objects, one per process)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from twofold.gateway.fleet import merge
from twofold.gateway.metrics import Metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_histograms_and_connections_add_up_the_registry_version_is_the_slowest() -> None:
    processes = [Metrics(), Metrics()]
    for index, metrics in enumerate(processes):
        for _ in range(index + 2):  # 2 and 3 requests
            metrics.requests.count("cat", "balance", "ok", 0.002)
        metrics.handshake_failures.labels("cat").inc(index + 1)
        metrics.connections.labels("cat").set(10 * (index + 1))
        metrics.registry_version.set(41 + index)
        metrics.expiring.labels("cat").set(3)
    merged = _samples(merge([m.render().decode() for m in processes], answering=2, silent=0).decode())
    cat = (("environment", "cat"),)
    assert merged[("twofold_gateway_requests_total", (*cat, ("outcome", "ok"), ("product", "balance")))] == 5
    assert merged[("twofold_gateway_request_seconds_count", cat)] == 5
    assert merged[("twofold_gateway_request_seconds_bucket", (*cat, ("le", "0.0025")))] == 5
    assert merged[("twofold_gateway_tls_handshake_failures_total", cat)] == 3
    assert merged[("twofold_gateway_connections", cat)] == 30
    assert merged[("twofold_registry_version", ())] == 41
    assert merged[("twofold_certificates_expiring_30d", cat)] == 3
    assert merged[("twofold_gateway_processes", (("state", "answering"),))] == 2
