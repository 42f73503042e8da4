"""Shared fixtures. Suites that need an outside part (PostgreSQL, nginx, Chromium, openssl,
curl) ask for it through `require(...)`: missing parts fail the run in CI (TWOFOLD_CI=1)
and are listed loudly as NOT RUN at the end of a local run — never passed silently."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("TWOFOLD_CI") == "1"
_NOT_RUN: dict[str, set[str]] = {}
VECTORS = Path(__file__).parent / "vectors"


def require(part: str, available: bool, nodeid: str = "") -> None:
    """Skip (locally) or fail (CI) when an outside part is missing."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{part} is required in CI but is not available", pytrace=False)
    _NOT_RUN.setdefault(part, set()).add(nodeid)
    pytest.skip(f"NOT RUN: {part} is not available on this machine")


def require_binary(name: str, request: pytest.FixtureRequest | None = None) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    require(name, path is not None, request.node.nodeid if request else "")
    assert path is not None
    return path


@pytest.fixture
def openssl(request: pytest.FixtureRequest) -> str:
    return require_binary("openssl", request)


@pytest.fixture
def curl(request: pytest.FixtureRequest) -> str:
    return require_binary("curl", request)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    parts = sorted(
        {str(r.longrepr[2]).split("NOT RUN: ", 1)[1] for r in skipped if "NOT RUN:" in str(r.longrepr)}
    )
    if parts:
        terminalreporter.section("SUITES NOT RUN", sep="!", red=True, bold=True)
        for line in parts:
            terminalreporter.line(f"NOT RUN: {line}", red=True, bold=True)
        terminalreporter.line("These suites always run in CI (TWOFOLD_CI=1), where a missing part fails.")
