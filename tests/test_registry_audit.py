"""The audit log: every change is recorded (actor, time, action, object), the log is a hash
chain, and `verify_audit` finds an altered or removed entry — on SQLite and PostgreSQL.

Tampering is done the way an attacker with database access would: raw SQL on the table.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select, text, update

from registry_helpers import add_person, make_cert, make_operator, make_org
from twofold.registry import audit
from twofold.registry.auth import SYSTEM
from twofold.registry.models import AuditEntry
from twofold.registry.service import Registry


async def entries(reg: Registry) -> list[AuditEntry]:
    async with reg.sessions() as session:
        return list((await session.execute(select(AuditEntry).order_by(AuditEntry.id))).scalars())


async def sql(reg: Registry, statement: str, **params: Any) -> None:
    async with reg.engine.begin() as conn:
        await conn.execute(text(statement), params)


async def test_every_change_adds_one_entry_naming_actor_action_and_object(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    ops = await make_operator(registry)
    cert = make_cert("acme-client")
    state: dict[str, Any] = {}

    async def add_cert() -> None:
        state["cert"] = await registry.add_certificate(acme.security, "cat", "mtls", cert.pem)

    async def new_project() -> None:
        state["project"] = (await registry.create_project(acme.developer, "Treasury"))["id"]

    async def new_token() -> None:
        await registry.create_token(acme.security, "ci")
        state["token"] = (await registry.list_tokens(acme.security))[0]["id"]

    steps: list[tuple[Callable[[], Awaitable[Any]], str, str, str, Callable[[], str]]] = [
        (lambda: registry.add_org(ops, "globex"), ops.name, "org.create", "organisation", lambda: "globex"),
        (
            lambda: registry.add_user(
                ops, "dev@globex.example", org="globex", roles="developer", password=None
            ),
            ops.name,
            "user.create",
            "user",
            lambda: "dev@globex.example",
        ),
        (
            lambda: registry.set_roles(ops, "dev@globex.example", "developer,api_security"),
            ops.name,
            "user.roles",
            "user",
            lambda: "dev@globex.example",
        ),
        (
            lambda: registry.set_password(ops, "dev@globex.example", "a long enough password"),
            ops.name,
            "user.password",
            "user",
            lambda: "dev@globex.example",
        ),
        (
            lambda: registry.save_environment(ops, "uat", name="UAT", allow_self_signed=True),
            ops.name,
            "environment.create",
            "environment",
            lambda: "uat",
        ),
        (
            lambda: registry.save_environment(ops, "uat", name="User Acceptance"),
            ops.name,
            "environment.update",
            "environment",
            lambda: "uat",
        ),
        (
            lambda: registry.save_product(
                ops, "payments", name="Payments", path_prefix="/p", upstream="sandbox:x"
            ),
            ops.name,
            "product.create",
            "product",
            lambda: "payments",
        ),
        (add_cert, acme.security.name, "certificate.add", "certificate", lambda: cert.fingerprint),
        (
            lambda: registry.remove_certificate(acme.security, "cat", cert.fingerprint),
            acme.security.name,
            "certificate.remove",
            "certificate",
            lambda: cert.fingerprint,
        ),
        (new_project, acme.developer.name, "project.create", "project", lambda: str(state["project"])),
        (
            lambda: registry.set_project_product(
                acme.developer, state["project"], "payments", "cat", present=True
            ),
            acme.developer.name,
            "project.product.add",
            "project",
            lambda: str(state["project"]),
        ),
        (
            lambda: registry.set_project_product(
                acme.developer, state["project"], "payments", "cat", present=False
            ),
            acme.developer.name,
            "project.product.remove",
            "project",
            lambda: str(state["project"]),
        ),
        (
            lambda: registry.delete_project(acme.developer, state["project"]),
            acme.developer.name,
            "project.delete",
            "project",
            lambda: str(state["project"]),
        ),
        (new_token, acme.security.name, "token.create", "user", lambda: acme.security.name),
        (
            lambda: registry.revoke_token(acme.security, state["token"]),
            acme.security.name,
            "token.revoke",
            "token",
            lambda: "tf_",
        ),
        (
            lambda: registry.create_session(acme.developer),
            acme.developer.name,
            "session.create",
            "user",
            lambda: acme.developer.name,
        ),
    ]
    for do, actor, action, object_type, object_id in steps:
        before = len(await entries(registry))
        started = dt.datetime.now(dt.UTC)
        await do()
        after = await entries(registry)
        assert len(after) == before + 1, action
        last = after[-1]
        assert (last.actor, last.action, last.object_type) == (actor, action, object_type)
        assert last.object_id.startswith(object_id()), (action, last.object_id)
        assert (
            started - dt.timedelta(seconds=1) <= last.at <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        )
    assert (await registry.verify_audit()).ok


async def test_certificate_entries_tell_what_and_where_and_organisations_see_only_their_own(
    registry: Registry,
) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    cert = make_cert("acme-client")
    await registry.add_certificate(acme.security, "cat", "mtls", cert.pem)
    await registry.add_certificate(globex.security, "cat", "mtls", make_cert("globex-client").pem)

    mine = await registry.audit_entries(acme.developer)
    assert {e["id"] for e in mine} == {e.id for e in await entries(registry) if e.org_id == acme.id}
    assert not [e for e in mine if "globex" in json.dumps(e)]
    (added,) = [e for e in mine if e["action"] == "certificate.add"]
    assert (added["actor"], added["object_id"]) == (acme.security.name, cert.fingerprint)
    assert added["details"]["environment"] == "cat"
    assert added["details"]["use"] == "mtls"
    assert added["details"]["common_name"] == "acme-client"

    every = await registry.audit_entries(SYSTEM)
    assert {e["id"] for e in every} == {e.id for e in await entries(registry)}
    globex_only = await registry.audit_entries(SYSTEM, org="globex")
    assert {e["id"] for e in globex_only} == {e.id for e in await entries(registry) if e.org_id == globex.id}


async def a_log(reg: Registry) -> list[AuditEntry]:
    """A log of a dozen entries from ordinary work."""
    acme = await make_org(reg, "acme")
    await add_person(reg, "both@acme.example", org=acme, roles="api_security,developer")
    added = await reg.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    await reg.add_certificate(
        acme.security, "cat", "signature", make_cert("acme-sign", usage="signature").pem
    )
    await reg.remove_certificate(acme.security, "cat", added["fingerprint"])
    await reg.create_project(acme.developer, "Treasury")
    log = await entries(reg)
    assert len(log) >= 8
    report = await reg.verify_audit()
    assert (report.ok, report.entries, report.head, report.problems) == (True, len(log), log[-1].hash, [])
    return log


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("details", json.dumps({"environment": "prod", "use": "mtls", "common_name": "acme-client"})),
        ("actor", "someone-else@acme.example"),
        ("action", "certificate.remove"),
        ("object_id", "0" * 64),
    ],
)
async def test_an_entry_altered_with_raw_sql_is_reported_by_id(
    registry: Registry, column: str, value: str
) -> None:
    log = await a_log(registry)
    victim = next(e for e in log if e.action == "certificate.add")
    assert victim is not log[-1]
    await sql(registry, f"UPDATE audit_log SET {column} = :value WHERE id = :id", value=value, id=victim.id)
    await assert_only_altered(registry, log, victim, column)


@pytest.mark.parametrize(
    ("column", "value"),
    [("org_id", None), ("at", dt.datetime(2020, 1, 1, tzinfo=dt.UTC)), ("object_type", "user")],
)
async def test_an_entry_altered_in_any_column_is_reported_by_id(
    registry: Registry, column: str, value: Any
) -> None:
    log = await a_log(registry)
    victim = next(e for e in log if e.action == "certificate.add")
    async with registry.engine.begin() as conn:
        await conn.execute(update(AuditEntry).where(AuditEntry.id == victim.id).values({column: value}))
    await assert_only_altered(registry, log, victim, column)


async def assert_only_altered(
    registry: Registry, log: list[AuditEntry], victim: AuditEntry, column: str
) -> None:
    assert getattr((await entries(registry))[log.index(victim)], column) != getattr(victim, column)
    report = await registry.verify_audit()
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"entry {victim.id} ")
    assert "altered" in report.problems[0]


async def test_rewriting_an_entry_with_a_fresh_hash_breaks_the_link_to_the_next(registry: Registry) -> None:
    log = await a_log(registry)
    i = next(i for i, e in enumerate(log) if e.action == "certificate.add")
    victim, follower = log[i], log[i + 1]
    forged_details = {**victim.details, "environment": "prod"}
    forged = audit.entry_hash(
        victim.prev_hash, victim.at, victim.actor, victim.action, victim.object_type,
        victim.object_id, victim.org_id, forged_details,
    )  # fmt: skip
    await sql(
        registry,
        "UPDATE audit_log SET details = :details, hash = :hash WHERE id = :id",
        details=json.dumps(forged_details),
        hash=forged,
        id=victim.id,
    )
    report = await registry.verify_audit()
    assert not report.ok
    assert [p.split(" (")[0] for p in report.problems] == [f"entry {follower.id}"]
    assert "does not follow the previous entry" in report.problems[0]


async def test_a_deleted_middle_entry_is_reported(registry: Registry) -> None:
    log = await a_log(registry)
    middle = log[len(log) // 2]
    await sql(registry, "DELETE FROM audit_log WHERE id = :id", id=middle.id)
    report = await registry.verify_audit()
    assert not report.ok
    after = log[len(log) // 2 + 1]
    assert any(p.startswith(f"entry {after.id} ") and "removed" in p for p in report.problems)
    assert report.entries == len(log) - 1


async def test_deleting_the_first_entry_is_reported(registry: Registry) -> None:
    log = await a_log(registry)
    await sql(registry, "DELETE FROM audit_log WHERE id = :id", id=log[0].id)
    report = await registry.verify_audit()
    assert not report.ok
    assert report.problems[0].startswith(f"entry {log[1].id} ")


async def test_a_deleted_last_entry_is_found_only_against_a_recorded_head(registry: Registry) -> None:
    log = await a_log(registry)
    head = (await registry.verify_audit()).head
    assert head == log[-1].hash
    assert (await registry.verify_audit(expect_head=head)).ok

    await sql(registry, "DELETE FROM audit_log WHERE id = :id", id=log[-1].id)
    truncated = await registry.verify_audit()
    assert truncated.ok
    assert truncated.head == log[-2].hash
    report = await registry.verify_audit(expect_head=head)
    assert not report.ok
    assert len(report.problems) == 1
    assert "expected head" in report.problems[0]
    assert head[:16] in report.problems[0]


async def test_an_emptied_log_is_found_against_a_recorded_head(registry: Registry) -> None:
    head = (await a_log(registry))[-1].hash
    await sql(registry, "DELETE FROM audit_log")
    assert (await registry.verify_audit()).ok
    assert not (await registry.verify_audit(expect_head=head)).ok


async def test_the_chain_keeps_growing_from_its_head_after_verification(registry: Registry) -> None:
    log = await a_log(registry)
    acme_sec = next(e.actor for e in log if e.action == "certificate.add")
    assert acme_sec
    await registry.add_org(SYSTEM, "late")
    new = await entries(registry)
    assert new[-1].prev_hash == log[-1].hash
    assert (await registry.verify_audit(expect_head=new[-1].hash)).ok
