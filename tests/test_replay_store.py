"""The replay guard and the provider's published signing keys, straight on a registry database
(SQLite and PostgreSQL): ids recorded once, taken over once expired, swept; ids of one batch
told apart; an unreachable database refused as such; keys published, listed in the JWKS,
retired, and a retired key refused when a node publishes it again; `twofold admin signing-key`
and `twofold admin product set`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from twofold.errors import TwofoldError
from twofold.gateway.replay import Claim, ReplayError, ReplayGuard
from twofold.provider_keys import ProviderKey
from twofold.registry.auth import SYSTEM
from twofold.registry.db import RegistryUnavailable
from twofold.registry.service import Registry

TWOFOLD = str(Path(sys.executable).with_name("twofold"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def claim(org_id: int, jti: str, expires_at: int) -> Claim:
    return Claim(org_id, "acme", hashlib.sha256(jti.encode()).digest(), expires_at, "jti")


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "fast"])
async def test_ids_are_recorded_once_taken_over_when_expired_and_swept(
    registry: Registry, durable: bool
) -> None:
    org = await registry.add_org(SYSTEM, "acme")
    clock = Clock()
    guard = ReplayGuard(registry, durable=durable, clock=clock)
    try:
        await guard.admit(claim(org["id"], "a", int(clock.now) + 60))
        with pytest.raises(ReplayError) as seen:
            await guard.admit(claim(org["id"], "a", int(clock.now) + 60))
        assert seen.value.code == "replay_detected"
        assert seen.value.status == 409
        # Another process (an empty memory) asks the database, which says the same.
        other = ReplayGuard(registry, durable=durable, clock=clock)
        with pytest.raises(ReplayError):
            await other.admit(claim(org["id"], "a", int(clock.now) + 60))
        # The same id sent twice in one batch: the first is recorded, the second is the replay.
        results = await asyncio.gather(
            other.admit(claim(org["id"], "b", int(clock.now) + 60)),
            other.admit(claim(org["id"], "b", int(clock.now) + 60)),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["NoneType", "ReplayError"]
        await other.close()
        # Once its window has passed an id may be used again (the window itself refuses the old request).
        clock.now += 61
        await guard.admit(claim(org["id"], "a", int(clock.now) + 60))
        await guard.admit(claim(org["id"], "c", int(clock.now) + 5))
        clock.now += 10
        assert await guard.sweep_once() == 2  # "b" and "c"; "a" (taken over) is still valid
        with pytest.raises(ReplayError):
            await guard.admit(claim(org["id"], "a", int(clock.now) + 60))
    finally:
        await guard.close()


async def test_an_unreachable_database_is_a_503_not_a_pass(registry_url: str, tmp_path: Path) -> None:
    if registry_url.startswith("sqlite"):
        url = str(tmp_path / "missing" / "dir" / "registry.db")  # cannot be opened
    else:
        url = "postgresql://postgres@127.0.0.1:1/nowhere"
    registry = Registry(None, url)  # type: ignore[arg-type]  (the guard needs only the URL)
    guard = ReplayGuard(registry)
    try:
        with pytest.raises(RegistryUnavailable) as refused:
            await guard.admit(claim(1, "x", 2_000_000_000))
        assert refused.value.status == 503
        assert "nothing was forwarded" in refused.value.message
    finally:
        await guard.close()


async def test_signing_keys_are_published_listed_and_retired(registry: Registry, tmp_path: Path) -> None:
    notices = ProviderKey.load_or_create(tmp_path / "notice.key", alg="RS256")
    responses = ProviderKey.load_or_create(tmp_path / "response.key")
    other_node = ProviderKey.load_or_create(tmp_path / "other.key", alg="PS256")
    for purpose, key in (("notices", notices), ("responses", responses), ("responses", other_node)):
        await registry.publish_signing_key(purpose, key.jwk)
    await registry.publish_signing_key("responses", responses.jwk)  # a restart: nothing new
    jwks = await registry.signing_jwks()
    assert [k["kid"] for k in jwks["keys"]] == [notices.kid, responses.kid, other_node.kid]
    assert all("d" not in k for k in jwks["keys"])
    assert {k["alg"] for k in jwks["keys"]} == {"RS256", "ES256", "PS256"}
    with pytest.raises(TwofoldError) as private:
        await registry.publish_signing_key("responses", {**responses.jwk, "d": "secret"})
    assert private.value.code == "signing_key_invalid"
    retired = await registry.retire_signing_key(SYSTEM, other_node.kid)
    assert retired["retired_at"]
    assert other_node.kid not in {k["kid"] for k in (await registry.signing_jwks())["keys"]}
    with pytest.raises(TwofoldError) as refused:
        await registry.publish_signing_key("responses", other_node.jwk)
    assert refused.value.code == "signing_key_retired"
    assert "new key file" in refused.value.message
    listed = await registry.list_signing_keys(SYSTEM)
    assert [(k["purpose"], bool(k["retired_at"])) for k in listed] == [
        ("notices", False),
        ("responses", False),
        ("responses", True),
    ]
    entries = await registry.audit_entries(SYSTEM)
    assert {"signing_key.publish", "signing_key.retire"} <= {e["action"] for e in entries}
    assert (await registry.verify_audit()).ok


def test_the_admin_commands_for_keys_and_product_protection(tmp_path: Path) -> None:
    data = tmp_path / "data"

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TWOFOLD, "admin", *args, "--data", str(data)], capture_output=True, text=True, timeout=60
        )

    key = ProviderKey.load_or_create(tmp_path / "k.key")

    async def create_and_publish() -> None:  # what `twofold serve` does at its first start
        registry = await Registry.open(str(data / "twofold.db"))
        try:
            await registry.publish_signing_key("responses", key.jwk)
        finally:
            await registry.close()

    data.mkdir()
    asyncio.run(create_and_publish())
    saved = admin(
        "product", "add", "payments", "--name", "Payments", "--path", "/p", "--upstream", "sandbox:payments"
    )
    assert saved.returncode == 0, saved.stderr
    done = admin(
        "product",
        "set",
        "payments",
        "--replay-window",
        "300",
        "--replay-id",
        "header:jti",
        "--sign-responses",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert (row["replay_window"], row["replay_iat"], row["replay_id"], row["sign_responses"]) == (
        300,
        "iat",
        "header:jti",
        True,
    )
    listed = admin("product", "list")
    assert "replay ±300s (iat, header:jti); signed responses" in listed.stdout
    bad = admin("product", "set", "payments", "--replay-iat", "a..b")
    assert bad.returncode == 1
    assert "product_invalid" in bad.stderr
    assert "Traceback" not in bad.stderr
    nothing = admin("product", "set", "payments")
    assert nothing.returncode == 2
    assert "say what to change" in nothing.stderr

    shown = admin("signing-key", "list")
    assert key.kid in shown.stdout
    assert "responses" in shown.stdout
    assert admin("signing-key", "retire", key.kid).returncode == 0
    assert json.loads(admin("signing-key", "list", "--json").stdout)[0]["retired_at"]
    missing = admin("signing-key", "retire", "nope")
    assert missing.returncode == 1
    assert "signing_key_not_found" in missing.stderr


async def test_migration_0005_upgrades_an_existing_registry(registry_url: str) -> None:
    """A registry before 0005 keeps its products, with replay protection and signed responses
    off and the default fields."""
    from alembic import command
    from sqlalchemy import text

    from twofold.registry.db import alembic_config, create_engine, migrate_async

    await asyncio.to_thread(command.upgrade, alembic_config(registry_url), "0003")
    engine = create_engine(registry_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO api_products (id, name, path_prefix, upstream, signature, content_types, "
                    "algorithms) VALUES ('old', 'Old', '/old', 'sandbox:echo', 'required', '[]', '[\"RS256\"]')"
                )
            )
        await migrate_async(registry_url)
        registry = Registry(engine, registry_url)
        [old] = await registry.list_products()
        assert await registry.signing_jwks() == {"keys": []}
    finally:
        await engine.dispose()
    assert (old["replay_window"], old["replay_iat"], old["replay_id"], old["sign_responses"]) == (
        None,
        "iat",
        "jti",
        False,
    )
