"""One notifier process of tests/test_notices.py's multi-process race: its own Registry on the
shared database, the clock fixed at argv[2], mail into the outbox argv[3]. It reports "ready",
waits for the file argv[4] to appear (everyone starts together), runs once and prints how many
notices it sent."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

from twofold.lifecycle import ExpiryNotifier
from twofold.mail import OutboxMailer
from twofold.registry.service import Registry


async def main(url: str, now: dt.datetime, outbox: Path, go: Path) -> int:
    registry = await Registry.open(url, migrate=False)
    try:
        await registry.version()  # connected before the start
        print("ready", flush=True)
        while not go.exists():
            time.sleep(0.005)
        notifier = ExpiryNotifier(
            registry,
            mailer=OutboxMailer(outbox),
            signer=None,
            portal_url="https://portal.test",
            clock=lambda: now,
        )
        return len(await notifier.run_once())
    finally:
        await registry.close()


if __name__ == "__main__":
    sent = asyncio.run(
        main(sys.argv[1], dt.datetime.fromisoformat(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    )
    print(f"sent {sent}", flush=True)
