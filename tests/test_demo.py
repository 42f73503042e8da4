"""`twofold demo` end to end, as a newcomer runs it: it starts `twofold serve` (free ports, a
fresh data directory), invites its API Security user by mail (the outbox), activates the
account through the link as the person would — password, authenticator, API token — and
walks the calls to the dashboard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from clientkit import free_port
from mailkit import links, outbox


def test_demo_walks_the_invitation_flow(tmp_path: Path) -> None:
    config = tmp_path / "twofold.toml"
    config.write_text(
        f"portal_port = {free_port()}\nadmin_port = {free_port()}\n"
        f"[ports]\ncat = {free_port()}\nprod = {free_port()}\n"
    )
    twofold = str(Path(sys.executable).with_name("twofold"))
    done = subprocess.run(
        [
            twofold,
            "demo",
            "--start",
            "--config",
            str(config),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "Demo complete" in done.stdout
    assert "authenticator set up" in done.stdout
    (message,) = outbox(tmp_path / "data" / "outbox")
    assert message["To"].startswith("security@demo-")
    assert [u for u in links(message) if "/account/link/" in u]
    checklist = done.stdout.split("The dashboard", 1)[1]
    assert checklist.count("✓") == 4, checklist[:800]
    assert "/accessapi/balance" in checklist
