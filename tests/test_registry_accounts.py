"""Invitations, links, the second factor and recorded gateway calls in the registry, on
SQLite and PostgreSQL: role ceilings, link expiry (the registry's clock moved, no sleeping),
reuse and tampering, TOTP replay within its window, single-use recovery codes, the
operator's audited reset, and the dashboards' data (each organisation sees only its own)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable

import pyotp
import pytest

from registry_helpers import make_cert, make_operator, make_org, table_rows
from twofold.registry.auth import SYSTEM, Principal, hash_password, secret_hash
from twofold.registry.calls import KEEP
from twofold.registry.models import utcnow
from twofold.registry.rules import Conflict, Forbidden, RegistryError, Unauthorized
from twofold.registry.service import CallRecord, LinkInvalid, Registry

PASSWORD = "a long enough password"


class Clock:
    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return utcnow() + self.offset

    def move(self, **delta: float) -> None:
        self.offset += dt.timedelta(**delta)


@pytest.fixture
def clock(registry: Registry) -> Clock:
    clock = Clock()
    registry.clock = clock
    return clock


async def _session_of(registry: Registry, email: str) -> tuple[Principal, str]:
    who = await registry.authenticate(email, PASSWORD)
    cookie, _csrf = await registry.create_session(who)
    return who, cookie


async def _enrolled(registry: Registry, clock: Clock, email: str) -> tuple[str, list[str]]:
    """Set ``email``'s password and second factor; returns (TOTP secret, recovery codes)."""
    await registry.set_password(SYSTEM, email, PASSWORD)
    who, _cookie = await _session_of(registry, email)
    secret = (await registry.mfa_begin(who))["secret"]
    codes = await registry.mfa_confirm(who, pyotp.TOTP(secret).at(clock()))
    clock.move(seconds=30)
    return secret, codes


# --- invitations and links -----------------------------------------------------------------


async def test_an_invitation_activates_once_and_signs_the_user_in(registry: Registry, clock: Clock) -> None:
    acme = await make_org(registry, "acme")
    link = await registry.invite(SYSTEM, "new@acme.example", org="acme", roles=["api_security"])
    assert link.purpose == "activate"
    assert link.organisation == "Acme Ltd"
    assert link.expires_at - clock() > dt.timedelta(hours=71.9)
    (pending,) = await registry.list_invitations(acme.security)
    assert pending["email"] == "new@acme.example"
    assert not pending["link_expired"]
    with pytest.raises(Unauthorized):  # no password yet: cannot sign in
        await registry.authenticate("new@acme.example", "")
    assert (await registry.check_link(link.token))["mfa_required"] is True
    who, done = await registry.use_link(link.token, PASSWORD)
    assert who.name == "new@acme.example"
    assert who.org_slug == "acme"
    assert who.mfa_required
    assert done["purpose"] == "activate"
    assert await registry.list_invitations(SYSTEM) == []
    assert (await registry.authenticate("new@acme.example", PASSWORD)).name == "new@acme.example"
    with pytest.raises(LinkInvalid):  # used
        await registry.use_link(link.token, PASSWORD + "!")
    rows = await table_rows(registry)
    assert link.token not in repr(rows["account_links"])  # only its hash is stored
    actions = [e["action"] for e in await registry.audit_entries(SYSTEM, org="acme", limit=10)]
    assert {"user.invite", "user.activate_link"} <= set(actions)


async def test_links_expire_and_tampered_links_are_refused_alike(registry: Registry, clock: Clock) -> None:
    await make_org(registry, "acme")
    link = await registry.invite(
        SYSTEM, "late@acme.example", org="acme", roles=["developer"], lifetime=dt.timedelta(hours=2)
    )
    tampered = link.token[:-2] + ("AA" if not link.token.endswith("AA") else "BB")
    clock.move(hours=1, minutes=59)
    assert (await registry.check_link(link.token))["email"] == "late@acme.example"
    for bad in (tampered, link.token[:20], ""):
        with pytest.raises(LinkInvalid) as refused:
            await registry.check_link(bad)
        assert refused.value.status == 410
        assert "ask for a new one" in refused.value.message
    clock.move(minutes=2)
    with pytest.raises(LinkInvalid) as expired:
        await registry.use_link(link.token, PASSWORD)
    assert str(expired.value) == str(refused.value)  # one answer: nothing else is revealed
    assert (await registry.list_invitations(SYSTEM))[0]["link_expired"] is True
    # A new link replaces the old one; the old one stays dead.
    fresh = await registry.request_link("late@acme.example")
    assert fresh is not None
    assert fresh.purpose == "activate"
    await registry.use_link(fresh.token, PASSWORD)


async def test_inviting_again_replaces_the_link(registry: Registry, clock: Clock) -> None:
    await make_org(registry, "acme")
    first = await registry.invite(SYSTEM, "twice@acme.example", org="acme", roles=["developer"])
    second = await registry.invite(SYSTEM, "twice@acme.example", org="acme", roles=["developer"])
    with pytest.raises(LinkInvalid):
        await registry.check_link(first.token)
    await registry.use_link(second.token, PASSWORD)
    with pytest.raises(Conflict):  # active now: not invitable again
        await registry.invite(SYSTEM, "twice@acme.example", org="acme", roles=["developer"])


async def test_concurrent_uses_of_one_link_succeed_once(registry: Registry, clock: Clock) -> None:
    await make_org(registry, "acme")
    link = await registry.invite(SYSTEM, "race@acme.example", org="acme", roles=["developer"])
    results = await asyncio.gather(
        *(registry.use_link(link.token, f"{PASSWORD} {i}") for i in range(4)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, LinkInvalid) for r in results if isinstance(r, BaseException))


async def test_role_ceilings_on_invitations(registry: Registry, clock: Clock) -> None:
    acme = await make_org(registry, "acme")
    await make_org(registry, "globex")
    both = dataclasses.replace(acme.security, roles=frozenset({"api_security", "developer"}))
    cases: list[tuple[Principal, str | None, list[str], type[Exception], str]] = [
        (acme.security, None, ["developer"], Forbidden, "role_ceiling"),  # above their own
        (acme.security, None, ["operator"], Forbidden, "role_ceiling"),
        (acme.developer, None, ["developer"], Forbidden, "api_security_only"),
        (acme.security, "globex", ["api_security"], Forbidden, "forbidden"),  # another organisation
        (SYSTEM, None, ["developer"], RegistryError, "org_required"),
        (SYSTEM, "acme", ["operator"], RegistryError, "role_invalid"),
        (
            dataclasses.replace(acme.security, mfa_passed=False),
            None,
            ["api_security"],
            Forbidden,
            "second_factor_required",
        ),
    ]
    for actor, org, roles, error, code in cases:
        with pytest.raises(error) as refused:
            await registry.invite(actor, "someone@acme.example", org=org, roles=roles)
        assert refused.value.code == code, (actor.name, roles)
    assert (
        await registry.invite(acme.security, "a@acme.example", org=None, roles=["api_security"])
    ).roles == ("api_security",)
    link = await registry.invite(both, "b@acme.example", org="acme", roles=["developer", "api_security"])
    assert link.roles == ("api_security", "developer")
    ops = await registry.invite(SYSTEM, "ops2@platform.example", org=None, roles=["operator"])
    assert ops.organisation is None
    with pytest.raises(Conflict) as exists:
        await registry.invite(acme.security, acme.developer.name, org=None, roles=["api_security"])
    assert "ask a platform operator" in exists.value.message


async def test_password_reset_by_link_signs_out_and_keeps_tokens_and_second_factor(
    registry: Registry, clock: Clock
) -> None:
    acme = await make_org(registry, "acme")
    email = acme.security.name
    await _enrolled(registry, clock, email)
    _who, cookie = await _session_of(registry, email)
    token = await registry.create_token(acme.security)
    assert await registry.request_link("nobody@acme.example") is None  # unknown: nothing to send
    link = await registry.request_link(email)
    assert link is not None
    assert link.purpose == "reset"
    assert await registry.request_link(email) is None  # at most one a minute
    clock.move(seconds=61)
    newer = await registry.request_link(email)
    assert newer is not None
    with pytest.raises(LinkInvalid):  # the newer link replaced it
        await registry.use_link(link.token, PASSWORD + " new")
    with pytest.raises(RegistryError) as weak:
        await registry.use_link(newer.token, "short")
    assert weak.value.code == "password_weak"
    who, done = await registry.use_link(newer.token, PASSWORD + " new")
    assert done == {"purpose": "reset", "sessions_ended": 2, "tokens_kept": 1, "second_factor_kept": True}
    assert who.mfa_enrolled
    assert not who.mfa_passed
    assert await registry.session_principal(cookie) is None
    assert (await registry.token_principal(token)).name == email
    await registry.set_active(SYSTEM, email, active=False)
    assert await registry.request_link(email) is None  # deactivated: nothing


# --- the second factor ---------------------------------------------------------------------


async def test_totp_codes_work_once_within_their_window(registry: Registry, clock: Clock) -> None:
    acme = await make_org(registry, "acme")
    email = acme.security.name
    secret, _codes = await _enrolled(registry, clock, email)
    who, cookie = await _session_of(registry, email)
    assert who.mfa_enrolled
    assert who.needs_second_factor
    totp = pyotp.TOTP(secret)
    with pytest.raises(Unauthorized) as wrong:
        await registry.mfa_verify(cookie, "000000" if totp.at(clock()) != "000000" else "111111")
    assert wrong.value.code == "mfa_failed"
    code = totp.at(clock())
    assert (await registry.mfa_verify(cookie, code))["method"] == "totp"
    found = await registry.session_principal(cookie)
    assert found is not None
    assert found[0].mfa_passed
    assert not found[0].needs_second_factor
    _who, other = await _session_of(registry, email)
    with pytest.raises(Unauthorized):  # the same code again, still inside its window
        await registry.mfa_verify(other, code)
    with pytest.raises(Unauthorized):  # an older step is refused too
        await registry.mfa_verify(other, totp.at(clock() - dt.timedelta(seconds=30)))
    clock.move(seconds=30)
    assert (await registry.mfa_verify(other, totp.at(clock())))["method"] == "totp"
    clock.move(seconds=95)  # a code from a device 30 s behind still works; 90 s behind does not
    assert (await registry.mfa_verify(other, totp.at(clock() - dt.timedelta(seconds=30))))["method"] == "totp"
    with pytest.raises(Unauthorized):
        await registry.mfa_verify(other, totp.at(clock() - dt.timedelta(seconds=90)))


async def test_recovery_codes_work_once_each(registry: Registry, clock: Clock) -> None:
    acme = await make_org(registry, "acme")
    _secret, codes = await _enrolled(registry, clock, acme.security.name)
    assert len(codes) == 10
    assert len(set(codes)) == 10
    _who, cookie = await _session_of(registry, acme.security.name)
    result = await registry.mfa_verify(cookie, codes[0].upper())  # case and dashes do not matter
    assert result == {"method": "recovery_code", "recovery_codes_left": 9}
    _who, cookie = await _session_of(registry, acme.security.name)
    with pytest.raises(Unauthorized):
        await registry.mfa_verify(cookie, codes[0])
    assert (await registry.mfa_verify(cookie, codes[1].replace("-", "")))["recovery_codes_left"] == 8
    rows = repr((await table_rows(registry))["recovery_codes"])
    assert not any(c in rows or c.replace("-", "") in rows for c in codes)  # hashes only
    details = [
        e["details"] for e in await registry.audit_entries(SYSTEM, org="acme") if e["action"] == "session.mfa"
    ]
    assert details[0] == {"method": "recovery_code", "recovery_codes_left": 8}


async def test_credential_changes_need_a_session_that_passed_the_second_factor(
    registry: Registry, clock: Clock
) -> None:
    acme = await make_org(registry, "acme")
    ops = await make_operator(registry)
    await registry.set_password(SYSTEM, acme.security.name, PASSWORD)
    password_only = await registry.authenticate(acme.security.name, PASSWORD)
    assert password_only.needs_second_factor
    cert = make_cert("acme-client")
    attempts: list[Callable[[], object]] = [
        lambda: registry.add_certificate(password_only, "cat", "mtls", cert.pem),
        lambda: registry.remove_certificate(password_only, "cat", cert.fingerprint),
        lambda: registry.create_token(password_only),
        lambda: registry.invite(password_only, "x@acme.example", org=None, roles=["api_security"]),
        lambda: registry.mfa_reset(dataclasses.replace(ops, mfa_passed=False), acme.security.name),
    ]
    for attempt in attempts:
        with pytest.raises(Forbidden) as refused:
            await attempt()  # type: ignore[misc]
        assert refused.value.code == "second_factor_required"
    # A Developer without a second factor creates tokens; one who enrolled must pass it.
    await registry.set_password(SYSTEM, acme.developer.name, PASSWORD)
    assert await registry.create_token(await registry.authenticate(acme.developer.name, PASSWORD))
    await _enrolled(registry, clock, acme.developer.name)
    with pytest.raises(Forbidden):
        await registry.create_token(await registry.authenticate(acme.developer.name, PASSWORD))


async def test_an_operator_resets_a_lost_second_factor(registry: Registry, clock: Clock) -> None:
    acme = await make_org(registry, "acme")
    ops = await make_operator(registry)
    email = acme.security.name
    _secret, codes = await _enrolled(registry, clock, email)
    _who, cookie = await _session_of(registry, email)
    with pytest.raises(Forbidden):
        await registry.mfa_reset(acme.security, email)
    assert await registry.mfa_reset(ops, email) == {"email": email, "had_second_factor": True}
    assert await registry.session_principal(cookie) is None  # signed out everywhere
    who, cookie = await _session_of(registry, email)
    assert not who.mfa_enrolled
    assert who.needs_second_factor
    with pytest.raises(RegistryError):
        await registry.mfa_verify(cookie, codes[2])  # the old recovery codes are gone
    (entry,) = [e for e in await registry.audit_entries(SYSTEM) if e["action"] == "user.mfa_reset"]
    assert entry["actor"] == ops.name
    assert entry["object_id"] == email
    assert (await registry.verify_audit()).ok


# --- recorded calls and dashboards -------------------------------------------------------------


def _call(org_id: int | None, status: int = 200, outcome: str = "ok", **kw: object) -> CallRecord:
    values: dict[str, object] = {
        "at": utcnow(),
        "environment": "cat",
        "org_id": org_id,
        "product": "balance",
        "method": "GET",
        "path": "/accessapi/balance",
        "status": status,
        "outcome": outcome,
        "message": None,
    }
    values.update(kw)
    return CallRecord(**values)  # type: ignore[arg-type]


async def test_calls_are_kept_per_organisation_and_pruned_to_the_newest(
    registry: Registry, clock: Clock
) -> None:
    acme = await make_org(registry, "acme")
    globex = await make_org(registry, "globex")
    await registry.record_calls([_call(acme.id, path=f"/accessapi/balance/{i}") for i in range(KEEP + 20)])
    await registry.record_calls(
        [
            _call(globex.id, 401, "signature_invalid", message="signature does not verify"),
            _call(None, 403, "no_cert"),
        ]
    )
    mine = await registry.recent_calls(acme.developer, "cat")
    assert len(mine) == KEEP
    assert mine[0]["path"] == f"/accessapi/balance/{KEEP + 19}"  # newest first
    assert mine[-1]["path"] == "/accessapi/balance/20"
    assert len((await table_rows(registry))["gateway_calls"]) == KEEP + 1
    (theirs,) = await registry.recent_calls(globex.security, "cat")
    assert theirs["message"] == "signature does not verify"
    assert theirs["status"] == 401
    assert await registry.recent_calls(acme.developer, "cat", org="globex") == mine  # ?org= is for operators
    overview = await registry.overview(SYSTEM)
    assert {(r["outcome"], r["count"]) for r in overview["refused_last_hour"]} == {
        ("signature_invalid", 1),
        ("no_cert", 1),
    }
    clock.move(minutes=61)
    assert (await registry.overview(SYSTEM))["refused_last_hour"] == []


async def test_the_checklist_follows_the_registry(registry: Registry, clock: Clock) -> None:
    acme = await make_org(registry, "acme")
    dev = dataclasses.replace(acme.developer, roles=frozenset({"developer"}))

    def done(board: dict[str, object]) -> dict[str, bool]:
        return {i["item"]: i["done"] for i in board["checklist"]}  # type: ignore[attr-defined]

    assert done(await registry.dashboard(dev, "cat")) == dict.fromkeys(
        ("project", "mtls", "signature", "call"), False
    )
    for product, prefix, signature in (
        ("balance", "/accessapi/balance", "none"),
        ("payments", "/tsapi", "required"),
    ):
        await registry.save_product(
            SYSTEM, product, name=product, path_prefix=prefix, upstream="sandbox:echo", signature=signature
        )
    project = await registry.create_project(dev, "p")
    await registry.set_project_product(dev, project["id"], "balance", "cat", present=True)
    board = await registry.dashboard(dev, "cat")
    assert done(board) == {
        "project": True,
        "mtls": False,
        "signature": True,
        "call": False,
    }  # balance needs none
    await registry.set_project_product(dev, project["id"], "payments", "cat", present=True)
    assert done(await registry.dashboard(dev, "cat"))["signature"] is False  # payments needs one
    await registry.add_certificate(acme.security, "cat", "mtls", make_cert("acme-client", days=20).pem)
    await registry.add_certificate(
        acme.security, "cat", "signature", make_cert("acme-sign", usage="signature").pem
    )
    await registry.record_calls([_call(acme.id, 401, "signature_invalid"), _call(acme.id)])
    board = await registry.dashboard(dev, "cat")
    assert board["complete"] is True
    (expiring,) = board["expiring"]
    assert expiring["common_name"] == "acme-client"
    assert expiring["days_left"] in (19, 20)
    assert done(await registry.dashboard(dev, "prod")) == dict.fromkeys(
        ("project", "mtls", "signature", "call"), False
    )
    await registry.record_calls([_call(acme.id, 502, "upstream_502") for _ in range(KEEP)])
    assert done(await registry.dashboard(dev, "cat"))["call"] is True  # kept after the call left the list
    with pytest.raises(RegistryError):
        await registry.dashboard(SYSTEM, "cat")  # operators say which organisation


async def test_migration_0003_upgrades_an_existing_database(registry_url: str) -> None:
    """A database at the revision before 0003, with a user and a session in it: 0003 keeps
    all of it (no invitation pending, no second factor yet, the session not past one)."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from twofold.registry.db import alembic_config

    config = alembic_config(registry_url)
    previous = ScriptDirectory.from_config(config).get_revision("0003").down_revision
    await asyncio.to_thread(command.upgrade, config, str(previous))
    old = await Registry.open(registry_url, migrate=False)
    try:
        await old.ensure_defaults()
        await old.add_org(SYSTEM, "acme")
        async with old.engine.begin() as conn:  # the old schema, written as the old code did
            from sqlalchemy import text

            await conn.execute(
                text(
                    "INSERT INTO users (email, password_hash, org_id, roles, active, created_at, must_change_password)"
                    " VALUES ('old@acme.example', :hash, 1, 'api_security', :t, :now, :f)"
                ),
                {"hash": hash_password(PASSWORD), "t": True, "f": False, "now": utcnow()},
            )
            await conn.execute(
                text(
                    "INSERT INTO sessions (id_hash, user_id, csrf_token, created_at, expires_at)"
                    " VALUES (:id, 1, 'csrf', :now, :later)"
                ),
                {"id": secret_hash("old-cookie"), "now": utcnow(), "later": utcnow() + dt.timedelta(hours=1)},
            )
    finally:
        await old.close()
    upgraded = await Registry.open(registry_url)  # migrates to head
    try:
        found = await upgraded.session_principal("old-cookie")
        assert found is not None
        who, csrf = found
        assert csrf == "csrf"
        assert who.name == "old@acme.example"
        assert not who.mfa_enrolled
        assert not who.mfa_passed
        assert who.needs_second_factor
        (user,) = await upgraded.list_users(SYSTEM)
        assert user["pending_activation"] is False
        assert user["second_factor"] is False
        assert (await upgraded.authenticate("old@acme.example", PASSWORD)).name == "old@acme.example"
        await upgraded.record_calls([_call(1)])
        assert len(await upgraded.recent_calls(who, "cat")) == 1
    finally:
        await upgraded.close()
