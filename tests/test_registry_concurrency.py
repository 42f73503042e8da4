"""The counting rules under parallel uploads, on SQLite and on PostgreSQL: many uploads of
the same Common Name (or of one organisation's signature certificates) at the same moment,
both inside one event loop (one Registry, many connections) and from separate OS processes
(each with its own Registry on the same database), must end with exactly the allowed
number registered and every other upload refused cleanly with the rule's code — never a
database error, never a "registry busy" 5xx — and with an audit chain that still verifies.
"""

from __future__ import annotations

import asyncio

import pytest

from registry_helpers import (
    Org,
    active_certs,
    cn_owner,
    count,
    make_cert,
    make_org,
    outcome,
    race_in_loop,
    race_in_processes,
    tally,
)
from twofold.registry.auth import Principal
from twofold.registry.models import AuditEntry, Certificate, CnOwner
from twofold.registry.service import Registry

N = 8  # contenders per rule race; uploads are EC P-256, so cheap to make
BURST = 16  # contenders when all should win: more than the registry's 8 transaction attempts

Upload = tuple[Principal, str, str, bytes]


async def race(registry: Registry, how: str, uploads: list[Upload]) -> list[str]:
    if how == "loop":
        return await race_in_loop(registry, uploads)
    return await asyncio.to_thread(race_in_processes, registry.url, uploads)


async def assert_consistent(registry: Registry, outcomes: list[str]) -> None:
    """Whatever the race, the books must balance: one audit entry per accepted upload, a
    valid chain, and slots 1 and 2 at most once per CN / per organisation."""
    assert not [o for o in outcomes if o.startswith("UNEXPECTED")], outcomes
    report = await registry.verify_audit()
    assert report.ok, report.problems
    adds = await count(registry, AuditEntry, AuditEntry.action == "certificate.add")
    assert adds == outcomes.count("ok") == await count(registry, Certificate)
    for cert in await active_certs(registry):
        assert cert.slot in (1, 2)


@pytest.fixture(params=["loop", "processes"])
def how(request: pytest.FixtureRequest) -> str:
    """In one event loop (asyncio.gather on one Registry), or from N OS processes."""
    return str(request.param)


async def test_parallel_mtls_uploads_of_one_cn_register_exactly_two(registry: Registry, how: str) -> None:
    acme = await make_org(registry, "acme")
    uploads: list[Upload] = [(acme.security, "cat", "mtls", make_cert("race-client").pem) for _ in range(N)]

    outcomes = await race(registry, how, uploads)

    assert tally(outcomes) == {"ok": 2, "mtls_cn_limit": N - 2}, outcomes
    await assert_consistent(registry, outcomes)
    registered = await active_certs(registry, Certificate.cn_key == "race-client")
    assert sorted(c.slot for c in registered) == [1, 2]
    assert await cn_owner(registry, "cat", "race-client") == acme.id
    # The winners are the uploads that said "ok".
    winners = {uploads[i][3] for i, o in enumerate(outcomes) if o == "ok"}
    assert {c.der for c in registered} == {make_cert_der(pem) for pem in winners}


async def test_parallel_signature_uploads_of_one_org_register_exactly_two(
    registry: Registry, how: str
) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    uploads: list[Upload] = [
        (acme.security, "cat", "signature", make_cert(f"acme-sign-{i}", usage="signature").pem)
        for i in range(N)
    ]
    # Another organisation uploading at the same moment is not limited by acme's two.
    uploads += [
        (globex.security, "cat", "signature", make_cert(f"globex-sign-{i}", usage="signature").pem)
        for i in range(2)
    ]

    outcomes = await race(registry, how, uploads)

    assert tally(outcomes[:N]) == {"ok": 2, "signature_limit": N - 2}, outcomes
    assert outcomes[N:] == ["ok", "ok"], outcomes
    await assert_consistent(registry, outcomes)
    for org in (acme, globex):
        mine = await active_certs(registry, Certificate.org_id == org.id, Certificate.use == "signature")
        assert sorted(c.slot for c in mine) == [1, 2]


async def test_two_organisations_racing_for_one_cn_leave_it_with_exactly_one(
    registry: Registry, how: str
) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    orgs: list[Org] = [acme, globex] * (N // 2)
    uploads: list[Upload] = [(org.security, "cat", "mtls", make_cert("Contested-Name").pem) for org in orgs]

    outcomes = await race(registry, how, uploads)

    await assert_consistent(registry, outcomes)
    owner = await cn_owner(registry, "cat", "contested-name")
    winner = acme if owner == acme.id else globex
    assert owner == winner.id
    assert await count(registry, CnOwner) == 1
    by_org: dict[int, list[str]] = {acme.id: [], globex.id: []}
    for org, result in zip(orgs, outcomes, strict=True):
        by_org[org.id].append(result)
    loser = globex if winner is acme else acme
    assert tally(by_org[winner.id]) == {"ok": 2, "mtls_cn_limit": N // 2 - 2}, outcomes
    assert tally(by_org[loser.id]) == {"cn_taken": N // 2}, outcomes
    registered = await active_certs(registry, Certificate.cn_key == "contested-name")
    assert {c.org_id for c in registered} == {winner.id}
    assert sorted(c.slot for c in registered) == [1, 2]


async def test_a_burst_of_uploads_of_different_names_all_succeed(registry: Registry, how: str) -> None:
    """No false refusals under contention: BURST different CNs all register. Every one must
    also take its place at the head of the audit chain, so this is the chain's own race —
    and more writers than the transaction retry budget, so losing and retrying is not enough."""
    acme = await make_org(registry, "acme")
    uploads: list[Upload] = [
        (acme.security, "cat", "mtls", make_cert(f"client-{i}").pem) for i in range(BURST)
    ]
    outcomes = await race(registry, how, uploads)
    assert outcomes == ["ok"] * BURST, tally(outcomes)
    await assert_consistent(registry, outcomes)
    assert len(await active_certs(registry)) == BURST


async def test_the_same_certificate_uploaded_in_parallel_registers_once(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    pem = make_cert("twice").pem
    outcomes = await race_in_loop(registry, [(acme.security, "cat", "mtls", pem)] * N)
    assert tally(outcomes) == {"ok": 1, "certificate_duplicate": N - 1}, outcomes
    await assert_consistent(registry, outcomes)


async def test_removing_and_adding_one_cn_in_parallel_keeps_its_owner_right(registry: Registry) -> None:
    """An organisation rotates its only certificate of a CN (remove + add at once) while
    another organisation tries to take the CN: the CN must never end up with certificates of
    two organisations, nor with certificates and no recorded owner."""
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    for round_ in range(6):
        cn = f"rotating-{round_}"
        old = await registry.add_certificate(acme.security, "cat", "mtls", make_cert(cn).pem)
        results = await asyncio.gather(
            registry.remove_certificate(acme.security, "cat", old["fingerprint"]),
            registry.add_certificate(acme.security, "cat", "mtls", make_cert(cn).pem),
            return_exceptions=True,
        )
        assert all(isinstance(r, dict) for r in results), results
        taken = await asyncio.gather(
            registry.add_certificate(globex.security, "cat", "mtls", make_cert(cn).pem),
            return_exceptions=True,
        )
        assert [outcome(t) for t in taken] == ["cn_taken"]
        registered = await active_certs(registry, Certificate.cn_key == cn)
        assert {c.org_id for c in registered} == {acme.id}, (
            f"round {round_}: {[c.org_id for c in registered]}"
        )
        assert await cn_owner(registry, "cat", cn) == acme.id
    assert (await registry.verify_audit()).ok


async def test_removing_both_certificates_of_a_cn_in_parallel_releases_the_name(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    for round_ in range(4):
        cn = f"retiring-{round_}"
        pair = [
            await registry.add_certificate(acme.security, "cat", "mtls", make_cert(cn).pem) for _ in range(2)
        ]
        await asyncio.gather(
            *(registry.remove_certificate(acme.security, "cat", c["fingerprint"]) for c in pair)
        )
        assert await active_certs(registry, Certificate.cn_key == cn) == []
        assert await cn_owner(registry, "cat", cn) is None, f"round {round_}: the name stayed with acme"
        await registry.add_certificate(globex.security, "cat", "mtls", make_cert(cn).pem)
    assert (await registry.verify_audit()).ok


async def test_two_removals_of_one_certificate_at_once_remove_it_once(registry: Registry) -> None:
    """Two API Security users (or an operator's incident response and the owner) remove the
    same certificate at the same moment: exactly one removal succeeds, the other is told it is
    not there (404), and the audit log records one removal. PostgreSQL without a row lock let
    both succeed in 30 of 30 rounds."""
    acme = await make_org(registry, "acme")
    rounds = 12
    for round_ in range(rounds):
        row = await registry.add_certificate(acme.security, "cat", "mtls", make_cert(f"once-{round_}").pem)
        results = await asyncio.gather(
            *(registry.remove_certificate(acme.security, "cat", row["fingerprint"]) for _ in range(2)),
            return_exceptions=True,
        )
        assert sorted(outcome(r) for r in results) == ["certificate_not_found", "ok"], (round_, results)
        assert [getattr(r, "status", None) for r in results if not isinstance(r, dict)] == [404]
        removals = await count(
            registry,
            AuditEntry,
            AuditEntry.action == "certificate.remove",
            AuditEntry.object_id == row["fingerprint"],
        )
        assert removals == 1, f"round {round_}: {removals} audit entries for one removal"
    assert await count(registry, AuditEntry, AuditEntry.action == "certificate.remove") == rounds
    assert (await registry.verify_audit()).ok


def make_cert_der(pem: bytes) -> bytes:
    from twofold.crypto import certs

    return certs.certificate_der(certs.load_certificate(pem))
