"""One contender in a cross-process race (see registry_helpers.in_processes).

Run with runpy in a child process, with ARGS, BARRIER and RESULTS injected as globals.
Task "add": open a Registry of this process's own on the shared URL, connect, wait for every
contender at the barrier, upload once. Task "open": wait at the barrier, then open (and so
migrate) the registry and make its defaults. Report "ok", a refusal's code, or a loud
UNEXPECTED line.
"""

from __future__ import annotations

import asyncio
from typing import Any

from twofold.registry.auth import Principal
from twofold.registry.rules import RegistryError
from twofold.registry.service import Registry


async def contend(args: dict[str, Any], barrier: Any) -> str:
    if args["task"] == "open":
        return await open_fresh(args, barrier)
    p = args["principal"]
    actor = Principal(
        p["name"], p["user_id"], p["org_id"], p["org_slug"], frozenset(p["roles"]), mfa_passed=True
    )
    reg = await Registry.open(args["url"], migrate=False)
    try:
        await reg.version()  # connected and warm before the start signal
        await asyncio.to_thread(barrier.wait, 60)
        try:
            await reg.add_certificate(actor, args["env"], args["use"], args["data"])
        except RegistryError as exc:
            if exc.status >= 500:
                return f"UNEXPECTED {exc.status} {exc.code}: {exc.message}"
            return exc.code
        except Exception as exc:
            return f"UNEXPECTED {type(exc).__name__}: {exc}"
        return "ok"
    finally:
        await reg.close()


async def open_fresh(args: dict[str, Any], barrier: Any) -> str:
    await asyncio.to_thread(barrier.wait, 60)
    try:
        reg = await Registry.open(args["url"])
        try:
            await reg.ensure_defaults()
        finally:
            await reg.close()
    except Exception as exc:
        return f"UNEXPECTED {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return "ok"


if __name__ == "__race__":
    args, barrier, results = globals()["ARGS"], globals()["BARRIER"], globals()["RESULTS"]
    try:
        result = asyncio.run(contend(args, barrier))
    except BaseException as exc:  # report, never hang the parent
        result = f"UNEXPECTED {type(exc).__name__}: {exc}"
    results.put((args["index"], result))
