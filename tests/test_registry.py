"""Who may do what in the registry, how people and tokens are authenticated, and how the
schema and the change counter behave — on SQLite and on PostgreSQL.

Authorisation lives in the registry, so every caller (pages, JSON API, CLI) gets the same
answers: organisation users see and change only their own organisation; API Security users
manage certificates; Developers manage projects; operators manage the platform.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import select

from registry_helpers import (
    add_person,
    expired_cert,
    make_cert,
    make_operator,
    make_org,
    open_in_processes,
    refused,
    snapshot,
    table_rows,
)
from twofold.registry.auth import SYSTEM, Principal
from twofold.registry.db import alembic_config, migrate_async
from twofold.registry.models import Base, Certificate, User
from twofold.registry.rules import Forbidden, NotFound, Unauthorized
from twofold.registry.service import Registry

PASSWORD = "a long enough password"


# --- certificates: API Security of the own organisation only -------------------------------------


async def test_a_developer_sees_certificates_but_cannot_add_or_remove_them(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    added = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)

    assert [c["fingerprint"] for c in await registry.list_certificates(acme.developer, "cat")] == [
        added["fingerprint"]
    ]
    error = await refused(
        registry, registry.add_certificate(acme.developer, "cat", "mtls", make_cert("acme-dev").pem)
    )
    assert isinstance(error, Forbidden)
    assert (error.code, error.status) == ("api_security_only", 403)
    error = await refused(registry, registry.remove_certificate(acme.developer, "cat", added["fingerprint"]))
    assert (error.code, error.status) == ("api_security_only", 403)


async def test_a_developer_is_refused_before_the_file_is_even_looked_at(registry: Registry) -> None:
    """A Developer uploading garbage learns about the role, not about the file."""
    acme = await make_org(registry, "acme")
    error = await refused(registry, registry.add_certificate(acme.developer, "cat", "mtls", b"garbage"))
    assert error.code == "api_security_only"


async def test_an_org_cannot_see_or_remove_another_orgs_certificates(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    mine = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    theirs = await registry.add_certificate(globex.security, "cat", "mtls", make_cert("globex-client").pem)
    theirs_sig = await registry.add_certificate(
        globex.security, "cat", "signature", make_cert("globex-sign", usage="signature").pem
    )

    for who in (acme.security, acme.developer):
        seen = {c["fingerprint"] for c in await registry.list_certificates(who)}
        assert seen == {mine["fingerprint"]}
        seen = {c["fingerprint"] for c in await registry.list_certificates(who, "cat", org="globex")}
        assert seen == {mine["fingerprint"]}, "the org filter is for operators only"
        seen = {c["fingerprint"] for c in await registry.list_certificates(who, include_removed=True)}
        assert seen == {mine["fingerprint"]}

    for fingerprint in (theirs["fingerprint"], theirs_sig["fingerprint"]):
        error = await refused(registry, registry.remove_certificate(acme.security, "cat", fingerprint))
        assert isinstance(error, NotFound)
        assert error.code == "certificate_not_found"
    # Nothing tells acme that the certificate exists: the answer equals that for a made-up one.
    made_up = await refused(registry, registry.remove_certificate(acme.security, "cat", "ab" * 32))
    assert made_up.code == "certificate_not_found"
    assert {c["fingerprint"] for c in await registry.list_certificates(globex.security)} == {
        theirs["fingerprint"],
        theirs_sig["fingerprint"],
    }


async def test_operators_see_every_organisations_certificates_and_may_remove_any(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    ops = await make_operator(registry)
    a = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    g = await registry.add_certificate(globex.security, "cat", "mtls", make_cert("globex-client").pem)

    everything = await registry.list_certificates(ops)
    assert {(c["organisation"], c["fingerprint"]) for c in everything} == {
        ("acme", a["fingerprint"]),
        ("globex", g["fingerprint"]),
    }
    only_globex = await registry.list_certificates(ops, org="globex")
    assert [c["fingerprint"] for c in only_globex] == [g["fingerprint"]]

    # Operators do not upload for organisations (a certificate must belong to one) …
    error = await refused(registry, registry.add_certificate(ops, "cat", "mtls", make_cert("ops-client").pem))
    assert error.code == "api_security_only"
    # … but may remove any certificate (incident response); the fingerprint may have colons.
    colon_form = ":".join(g["fingerprint"][i : i + 2] for i in range(0, 64, 2)).upper()
    removed = await registry.remove_certificate(ops, "cat", colon_form)
    assert removed["removed_by"] == ops.name
    assert await registry.list_certificates(globex.security) == []


async def test_a_user_without_an_organisation_cannot_list_certificates(registry: Registry) -> None:
    stray = Principal("nobody@example.com", 999, None, None, frozenset({"developer"}))
    with pytest.raises(Forbidden):
        await registry.list_certificates(stray)
    no_org_security = Principal("sec@example.com", 998, None, None, frozenset({"api_security"}))
    error = await refused(
        registry, registry.add_certificate(no_org_security, "cat", "mtls", make_cert("x").pem)
    )
    assert error.code == "api_security_only"


# --- the platform: operators only --------------------------------------------------------------------


async def test_only_operators_add_organisations_users_products_and_environments(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    both = await add_person(registry, "both@acme.example", org=acme, roles="api_security,developer")
    colleague = await add_person(registry, "colleague@acme.example", org=acme, roles="developer")
    for who in (acme.security, acme.developer, both):
        attempts = [
            registry.add_org(who, "evil"),
            registry.add_user(who, "x@evil.example", org="acme", roles="api_security", password=None),
            registry.add_user(who, "root@evil.example", org=None, roles="operator", password=None),
            registry.save_product(
                who, "payments", name="Payments", path_prefix="/pay", upstream="sandbox:payments"
            ),
            registry.save_environment(who, "uat", name="UAT", allow_self_signed=True),
            registry.save_environment(who, "prod", allow_self_signed=True),
            registry.set_roles(who, colleague.name, "api_security"),
            registry.set_roles(who, who.name, "api_security,developer"),
            registry.set_password(who, colleague.name, PASSWORD),
        ]
        for attempt in attempts:
            error = await refused(registry, attempt)
            assert (error.code, error.status) == ("operator_only", 403)
    assert (await registry.environment("prod"))["allow_self_signed"] is False

    ops = await make_operator(registry)
    await registry.add_org(ops, "initech")
    await registry.add_user(ops, "dev@initech.example", org="initech", roles="developer", password=None)
    await registry.save_product(
        ops, "payments", name="Payments", path_prefix="/tsapi/v1/payments", upstream="sandbox:payments"
    )
    await registry.save_environment(ops, "uat", name="UAT", allow_self_signed=True)
    assert [o["slug"] for o in await registry.list_orgs(ops)] == ["acme", "initech"]
    assert [o["slug"] for o in await registry.list_orgs(acme.developer)] == ["acme"]
    assert [e["id"] for e in await registry.list_environments()] == ["cat", "prod", "uat"]


async def test_users_see_only_the_people_of_their_own_organisation(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    ops = await make_operator(registry)
    assert {u["email"] for u in await registry.list_users(acme.developer)} == {
        acme.security.name,
        acme.developer.name,
    }
    assert {u["organisation"] for u in await registry.list_users(ops)} == {"acme", "globex", None}
    assert {u["email"] for u in await registry.list_users(ops, org="globex")} == {
        globex.security.name,
        globex.developer.name,
    }


# --- projects: Developers of the own organisation -----------------------------------------------------


async def test_developers_create_projects_and_add_products_per_environment(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    await registry.save_product(
        SYSTEM, "payments", name="Payments", path_prefix="/tsapi/v1/payments", upstream="sandbox:payments"
    )
    project = await registry.create_project(acme.developer, "Treasury integration")
    await registry.set_project_product(acme.developer, project["id"], "payments", "cat", present=True)
    await registry.set_project_product(acme.developer, project["id"], "payments", "prod", present=True)
    listed = await registry.list_projects(acme.security)  # API Security may look
    assert listed == [
        {
            "id": project["id"],
            "name": "Treasury integration",
            "products": [
                {"product": "payments", "environment": "cat"},
                {"product": "payments", "environment": "prod"},
            ],
        }
    ]
    await registry.set_project_product(acme.developer, project["id"], "payments", "prod", present=False)
    assert (await registry.list_projects(acme.developer))[0]["products"] == [
        {"product": "payments", "environment": "cat"}
    ]


async def test_api_security_alone_cannot_manage_projects(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    await registry.save_product(
        SYSTEM, "payments", name="Payments", path_prefix="/p", upstream="sandbox:payments"
    )
    project = await registry.create_project(acme.developer, "Treasury")
    for attempt in (
        registry.create_project(acme.security, "Mine"),
        registry.set_project_product(acme.security, project["id"], "payments", "cat", present=True),
        registry.delete_project(acme.security, project["id"]),
    ):
        error = await refused(registry, attempt)
        assert (error.code, error.status) == ("developer_only", 403)


async def test_another_organisations_project_is_not_found(registry: Registry) -> None:
    acme, globex = await make_org(registry, "acme"), await make_org(registry, "globex")
    await registry.save_product(
        SYSTEM, "payments", name="Payments", path_prefix="/p", upstream="sandbox:payments"
    )
    theirs = await registry.create_project(globex.developer, "Globex payments")
    for attempt in (
        registry.set_project_product(acme.developer, theirs["id"], "payments", "cat", present=True),
        registry.delete_project(acme.developer, theirs["id"]),
    ):
        error = await refused(registry, attempt)
        assert (error.code, error.status) == ("project_not_found", 404)
    assert await registry.list_projects(acme.developer) == []
    assert [p["name"] for p in await registry.list_projects(globex.developer)] == ["Globex payments"]
    # The same project name is fine in another organisation, not twice in one.
    await registry.create_project(acme.developer, "Globex payments")
    assert (
        await refused(registry, registry.create_project(acme.developer, "Globex payments"))
    ).code == "project_exists"


# --- passwords, tokens, sessions -----------------------------------------------------------------------


async def test_passwords_are_stored_as_argon2id_and_a_wrong_one_is_refused(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    await add_person(registry, "alice@acme.example", org=acme, roles="api_security", password=PASSWORD)
    async with registry.sessions() as session:
        stored = (
            await session.execute(select(User.password_hash).where(User.email == "alice@acme.example"))
        ).scalar()
    assert stored is not None
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored

    me = await registry.authenticate("Alice@Acme.example ", PASSWORD)
    assert (me.name, me.org_slug, me.roles) == ("alice@acme.example", "acme", frozenset({"api_security"}))
    for email, password in (
        ("alice@acme.example", PASSWORD + "!"),
        ("alice@acme.example", ""),
        ("nobody@acme.example", PASSWORD),
        (acme.developer.name, PASSWORD),  # a user without a password cannot sign in
    ):
        with pytest.raises(Unauthorized) as caught:
            await registry.authenticate(email, password)
        assert caught.value.code == "login_failed"
        assert caught.value.status == 401
        assert caught.value.message == "wrong email or password"  # the same for unknown users


async def test_a_token_round_trips_to_its_user_and_is_stored_only_hashed(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    token = await registry.create_token(acme.security, "ci pipeline")
    assert token.startswith("tf_")
    assert len(token) > 40

    principal = await registry.token_principal(token)
    assert principal == acme.security
    # The token works like the user: it may add certificates.
    await registry.add_certificate(principal, "cat", "mtls", make_cert("acme-ci").pem)

    rows = (await table_rows(registry))["api_tokens"]
    assert len(rows) == 1
    stored = repr(rows).encode()
    assert token.encode() not in stored
    assert token[10:].encode() not in stored
    dump = repr(await table_rows(registry)).encode()
    assert token.encode() not in dump
    assert token[10:].encode() not in dump
    assert [t["name"] for t in await registry.list_tokens(acme.security)] == ["ci pipeline"]


async def test_a_revoked_or_unknown_token_is_refused(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    token = await registry.create_token(acme.security, "old")
    (listed,) = await registry.list_tokens(acme.security)
    # Another user cannot revoke it.
    error = await refused(registry, registry.revoke_token(acme.developer, listed["id"]))
    assert error.code == "token_not_found"
    await registry.revoke_token(acme.security, listed["id"])
    assert (await registry.list_tokens(acme.security))[0]["revoked"] is True
    for bad in (token, token[:-1] + ("A" if token[-1] != "A" else "B"), "tf_unknown", "not-a-token", ""):
        with pytest.raises(Unauthorized) as caught:
            await registry.token_principal(bad)
        assert caught.value.code == "token_invalid"


async def test_only_operators_create_tokens_for_other_users(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    ops = await make_operator(registry)
    error = await refused(registry, registry.create_token(acme.developer, for_email=acme.security.name))
    assert error.code == "forbidden"
    token = await registry.create_token(ops, "for acme", for_email=acme.security.name)
    assert await registry.token_principal(token) == acme.security


async def test_sessions_are_created_looked_up_and_ended(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    cookie, csrf = await registry.create_session(acme.developer)
    found = await registry.session_principal(cookie)
    # A new session has not passed a second factor (a token, as in acme.developer, has).
    assert found == (dataclasses.replace(acme.developer, mfa_passed=False), csrf)
    assert await registry.session_principal(cookie + "x") is None
    stored = repr((await table_rows(registry))["sessions"]).encode()
    assert cookie.encode() not in stored  # only the cookie's hash is kept
    await registry.end_session(cookie)
    assert await registry.session_principal(cookie) is None


async def test_changing_a_password_ends_the_users_sessions(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    cookie, _ = await registry.create_session(acme.security)
    await registry.set_password(acme.security, acme.security.name, PASSWORD)  # one's own: allowed
    assert await registry.session_principal(cookie) is None
    # A password alone has not passed the second factor.
    assert (await registry.authenticate(acme.security.name, PASSWORD)) == dataclasses.replace(
        acme.security, mfa_passed=False
    )


async def test_a_deactivated_user_loses_sessions_tokens_and_sign_in_at_once(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    email = acme.security.name
    await registry.set_password(SYSTEM, email, PASSWORD)
    cookie, _ = await registry.create_session(acme.security)
    token = await registry.create_token(acme.security)

    view = await registry.set_active(SYSTEM, email, active=False)

    assert view["active"] is False
    assert await registry.session_principal(cookie) is None
    with pytest.raises(Unauthorized):
        await registry.token_principal(token)
    with pytest.raises(Unauthorized):
        await registry.authenticate(email, PASSWORD)
    await registry.set_active(SYSTEM, email, active=True)
    assert (await registry.authenticate(email, PASSWORD)).name == email
    with pytest.raises(Unauthorized):  # reactivation does not bring old tokens back
        await registry.token_principal(token)


async def test_only_operators_deactivate_users(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    with pytest.raises(Forbidden):
        await registry.set_active(acme.security, acme.developer.name, active=False)


async def test_an_operator_password_reset_revokes_tokens_but_ones_own_change_keeps_them(
    registry: Registry,
) -> None:
    acme = await make_org(registry, "acme")
    token = await registry.create_token(acme.security)
    await registry.set_password(acme.security, acme.security.name, PASSWORD)
    assert (await registry.token_principal(token)).name == acme.security.name
    await registry.set_password(SYSTEM, acme.security.name, PASSWORD + "-reset")
    with pytest.raises(Unauthorized):
        await registry.token_principal(token)


async def test_revoking_all_tokens_of_a_user(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    tokens = [await registry.create_token(acme.security, f"t{i}") for i in range(3)]
    assert await registry.revoke_user_tokens(SYSTEM, acme.security.name) == 3
    for token in tokens:
        with pytest.raises(Unauthorized):
            await registry.token_principal(token)
    with pytest.raises(Forbidden):
        await registry.revoke_user_tokens(acme.developer, acme.security.name)


HEAD = ScriptDirectory.from_config(alembic_config("sqlite:///unused.db")).get_current_head()


# --- schema and change counter ----------------------------------------------------------------------


async def test_migrating_twice_is_idempotent_and_keeps_data(registry_url: str) -> None:
    await migrate_async(registry_url)
    await migrate_async(registry_url)
    reg = await Registry.open(registry_url)  # migrates a third time
    try:
        await reg.ensure_defaults()
        acme = await make_org(reg, "acme")
        await reg.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
        before = await table_rows(reg)
        await migrate_async(registry_url)
        assert await table_rows(reg) == before
        assert before["alembic_version"] == [(HEAD,)]
        assert set(before) == {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"}
        assert await reg.ensure_defaults() == []  # the defaults are not made twice either
    finally:
        await reg.close()


async def _schema_description(registry_url: str, schema: str) -> list[tuple[str, ...]]:
    """Tables, columns, indexes and constraints of a PostgreSQL schema, names unqualified."""
    import asyncpg

    from conftest import POSTGRES_HOST, POSTGRES_PORT

    conn = await asyncpg.connect(
        host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", database=registry_url.rsplit("/", 1)[1]
    )
    try:
        rows = await conn.fetch(
            """
            SELECT 'column', table_name, column_name,
                   concat_ws(' ', data_type, character_maximum_length, is_nullable, column_default)
              FROM information_schema.columns WHERE table_schema = $1
            UNION ALL
            SELECT 'index', tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = $1
            UNION ALL
            SELECT 'constraint', t.relname, c.conname, pg_get_constraintdef(c.oid)
              FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             WHERE c.connamespace = $1::regnamespace
            """,
            schema,
        )
        data = [tuple(r) for r in await conn.fetch(f'SELECT version_num FROM "{schema}".alembic_version')]
    finally:
        await conn.close()
    strip = (f"{schema}.", f'"{schema}".')
    described = []
    for row in rows:
        text = str(row[3])
        for prefix in strip:
            text = text.replace(prefix, "")
        described.append((row[0], row[1], row[2], text))
    return sorted(described) + [("alembic_version", *map(str, d)) for d in data]


async def test_the_tests_fast_schema_is_the_migrated_schema(
    registry_url: str, request: pytest.FixtureRequest
) -> None:
    """The `registry` fixture builds each test's schema the cheap way (a copy of a migrated
    SQLite file; the migrations' offline SQL on PostgreSQL): it must be exactly what running
    the migrations gives, or the suite would test a schema production never has."""
    await migrate_async(registry_url)
    if registry_url.startswith("sqlite"):
        import sqlite3

        def schema(path: str) -> list[tuple[str, ...]]:
            with sqlite3.connect(path) as db:
                return sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall())

        template = str(request.getfixturevalue("sqlite_registry_template"))
        assert schema(registry_url.split(":///", 1)[1]) == schema(template)
        return
    sql = request.getfixturevalue("postgres_schema_sql")
    import asyncpg

    from conftest import POSTGRES_HOST, POSTGRES_PORT

    conn = await asyncpg.connect(
        host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", database=registry_url.rsplit("/", 1)[1]
    )
    try:
        await conn.execute("CREATE SCHEMA offline; SET search_path TO offline")
        await conn.execute(sql)
    finally:
        await conn.close()
    online = await _schema_description(registry_url, "public")
    offline = await _schema_description(registry_url, "offline")
    assert len(online) > 100
    assert offline == online


async def test_several_processes_opening_a_new_registry_at_once_all_start(registry_url: str) -> None:
    """Several `twofold serve` instances starting together on an empty database: each
    migrates on open; one does the work, the others wait for it and find the schema current."""
    outcomes = await asyncio.to_thread(open_in_processes, registry_url, 4)
    assert outcomes == ["ok"] * 4
    reg = await Registry.open(registry_url)
    try:
        rows = await table_rows(reg)
        assert rows["alembic_version"] == [(HEAD,)]
        assert sorted(r[0] for r in rows["environments"]) == ["cat", "prod"]
        assert (await reg.verify_audit()).entries == 1  # the defaults, made once
    finally:
        await reg.close()


async def test_the_schema_enforces_the_slot_rules_by_itself(registry: Registry) -> None:
    """The constraints hold even for a writer that skips the service's checks."""
    acme = await make_org(registry, "acme")
    added = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    async with registry.engine.connect() as conn:
        row = (
            await conn.execute(select(Certificate).where(Certificate.fingerprint == added["fingerprint"]))
        ).one()
    values = dict(row._mapping)
    values.pop("id")
    for changes in (
        {"fingerprint": "0" * 64, "spki_sha256": "1" * 64},  # same CN, same slot
        {"slot": 3, "fingerprint": "2" * 64, "spki_sha256": "3" * 64},  # no third slot
        {"slot": 2, "spki_sha256": "4" * 64},  # same fingerprint
        {"slot": 2, "fingerprint": "5" * 64},  # same public key
    ):
        with pytest.raises(Exception, match=r"(?i)unique|constraint|check"):
            async with registry.engine.begin() as conn:
                await conn.execute(Certificate.__table__.insert().values(**{**values, **changes}))


async def test_the_registry_version_bumps_on_certificate_add_and_remove_only(registry: Registry) -> None:
    acme = await make_org(registry, "acme")
    v0 = await registry.version()
    assert v0 >= 1  # ensure_defaults counted
    added = await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client").pem)
    assert await registry.version() == v0 + 1
    await refused(
        registry, registry.add_certificate(acme.security, "cat", "mtls", expired_cert("acme-client").pem)
    )
    assert await registry.version() == v0 + 1
    await registry.remove_certificate(acme.security, "cat", added["fingerprint"])
    assert await registry.version() == v0 + 2
    await refused(registry, registry.remove_certificate(acme.security, "cat", added["fingerprint"]))
    assert await registry.version() == v0 + 2
    snap = await snapshot(registry)
    await registry.list_certificates(acme.security)
    await registry.create_session(acme.developer)
    assert (await snapshot(registry)).version == snap.version  # reads and sign-ins are not registry changes


def test_the_sqlite_database_is_private_to_its_owner(tmp_path: Path) -> None:
    from twofold.registry.db import migrate

    database = tmp_path / "fresh" / "twofold.db"
    migrate(str(database))
    assert database.stat().st_mode & 0o777 == 0o600
    assert database.parent.stat().st_mode & 0o777 == 0o700
