"""The gateway's snapshot reloads only the mTLS certificates changed since the version it
holds (each change stamps its rows with its own registry version): after any sequence of
additions, removals and a re-added certificate, the incremental snapshot equals a full load,
on SQLite and PostgreSQL — and a change reads one row, not the whole table."""

from __future__ import annotations

from sqlalchemy import select

from registry_helpers import make_cert, make_org
from twofold.gateway.snapshot import Snapshot, load_snapshot
from twofold.registry.auth import SYSTEM
from twofold.registry.models import Certificate
from twofold.registry.service import Registry


def _view(snapshot: Snapshot) -> dict[str, dict[str, tuple[int, str, str]]]:
    return {
        env: {fp: (c.org_id, c.org, c.common_name) for fp, c in certs.items()}
        for env, certs in snapshot.mtls.items()
    }


async def test_the_incremental_snapshot_equals_a_full_load_after_every_change(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    first = [make_cert(f"acme-{i}") for i in range(3)]
    for cert in first:
        await registry.add_certificate(acme.security, "cat", "mtls", cert.pem)
    held = await load_snapshot(registry)
    assert set(held.mtls["cat"]) == {c.fingerprint for c in first}

    async def step() -> None:
        nonlocal held
        incremental = await load_snapshot(registry, held)
        full = await load_snapshot(registry)
        assert incremental.version == full.version
        assert _view(incremental) == _view(full)
        held = incremental

    removed_version = held.version
    await registry.remove_certificate(acme.security, "cat", first[0].fingerprint)
    await step()
    assert first[0].fingerprint not in held.mtls["cat"]
    async with registry.sessions() as session:  # the change's row carries its version: one row to read
        changed = (
            await session.execute(
                select(Certificate.fingerprint).where(Certificate.changed_version > removed_version)
            )
        ).all()
    assert [row[0] for row in changed] == [first[0].fingerprint]

    other = make_cert("globex-1")
    await registry.add_certificate(globex.security, "cat", "mtls", other.pem)
    await registry.remove_certificate(acme.security, "cat", first[1].fingerprint)  # two changes at once
    await step()
    assert held.mtls["cat"][other.fingerprint].org == "globex"
    assert first[1].fingerprint not in held.mtls["cat"]

    await registry.add_certificate(acme.security, "cat", "mtls", first[0].pem)  # removed, then added again
    await registry.remove_certificate(acme.security, "cat", first[2].fingerprint)
    await step()
    assert first[0].fingerprint in held.mtls["cat"]
    assert first[2].fingerprint not in held.mtls["cat"]

    before = held
    await registry.add_org(SYSTEM, "initech", "Initech")  # organisations changed: read whole
    await step()
    assert held.mtls["cat"] is not before.mtls["cat"]
