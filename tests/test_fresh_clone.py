"""What a fresh clone's first minutes show: `make run` installs the project without build
warnings, and the serve it starts names the demo command as it can be typed there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from twofold.cli import _common

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_installing_the_project_prints_no_build_warnings() -> None:
    """`make run` installs with pip; setuptools printed three 14-line deprecation warnings
    (`project.license` as a TOML table). pip builds the metadata here the same way (an
    isolated build environment with the setuptools pyproject.toml asks for)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "-q",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    warnings = [
        line
        for line in done.stderr.splitlines()
        if re.search(r"(Setuptools|BuildBackend|Deprecation)\w*Warning|deprecated|!!", line)
    ]
    assert warnings == [], "\n".join(warnings)


@pytest.mark.parametrize(("on_path", "expected"), [(False, ".venv/bin/twofold"), (True, "twofold")])
def test_the_serve_banner_names_the_demo_command_as_typed_here(
    monkeypatch: pytest.MonkeyPatch, on_path: bool, expected: str
) -> None:
    """`make run` runs .venv/bin/twofold; a fresh clone has no `twofold` on PATH."""
    if BIN != ROOT / ".venv" / "bin":
        pytest.skip("the tests run from a virtual environment outside the clone")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [".venv/bin/twofold", "serve"])
    monkeypatch.setenv("PATH", f"{BIN}:/usr/bin:/bin" if on_path else "/usr/bin:/bin")
    assert _common.self_command() == expected
