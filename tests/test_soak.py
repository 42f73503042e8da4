"""The soak of `make soak` (bench/soak.py), short enough for the suite (about 20 s): keep-alive
clients sending signed payments through `twofold serve` — not one error, and serve's memory
does not grow between the first and the last third of the run. `make soak` runs the issue's
100 clients × 60 s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_a_short_soak_has_no_errors_and_no_memory_growth() -> None:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--clients", "20", "--seconds", "10", "--warm-up", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_kinds"]
    assert report["requests"] > 100
    assert report["rss_growth"] < 0.10, report
    assert report["serve_alive"]
    assert report["tracebacks_in_log"] == 0
    assert done.returncode == 0, done.stderr
