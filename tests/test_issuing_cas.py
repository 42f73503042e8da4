"""Where issuing CAs come from: `twofold admin env set --issuing-ca-key/--issuing-ca-cert`
(copied into the data directory, 0600), files named in serve's settings, and the local CA that
`serve` makes for Production on first start — and when it must not make one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.issuing import IssuingCAs, IssuingFiles, sync_issuing_cas
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry
from twofold.settings import ServeConfig

TWOFOLD = str(Path(sys.executable).with_name("twofold"))


def write_ca(directory: Path, name: str = "bank issuing CA", passphrase: bytes | None = None) -> LocalCA:
    ca = LocalCA(name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.key").write_bytes(keys.private_key_bytes(ca.key, passphrase=passphrase))
    (directory / "ca.crt").write_bytes(certs.certificate_pem(ca.certificate))
    return ca


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWOFOLD, *args], capture_output=True, text=True, timeout=60)


def test_admin_env_set_installs_an_issuing_ca(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def serve_made_it() -> None:  # admin commands use the registry a serve made; none make one
        registry = await Registry.open(str(data / "twofold.db"))
        try:
            await registry.ensure_defaults()
        finally:
            await registry.close()

    asyncio.run(serve_made_it())
    ca = write_ca(tmp_path / "given", passphrase=b"ca secret")
    (tmp_path / "pass.txt").write_text("ca secret\n")
    done = run(
        "admin", "env", "set", "prod", "--data", str(data), "--issuing-ca-key", str(tmp_path / "given" / "ca.key"),
        "--issuing-ca-cert", str(tmp_path / "given" / "ca.crt"), "--issuing-ca-passphrase-file",
        str(tmp_path / "pass.txt"), "--max-validity-days", "397",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "issuing CA CN=bank issuing CA" in done.stderr
    assert "ca secret" not in done.stderr + done.stdout
    installed = data / "issuing" / "prod" / "ca.key"
    assert installed.stat().st_mode & 0o777 == 0o600
    assert keys.public_key_bytes(keys.load_private_key(installed.read_bytes())) == keys.public_key_bytes(
        ca.key
    )

    async def prod() -> dict[str, object]:
        registry = await Registry.open(str(data / "twofold.db"), migrate=False)
        try:
            return await registry.environment("prod")
        finally:
            await registry.close()

    env = asyncio.run(prod())
    assert env["issuing_ca"] == "CN=bank issuing CA,O=twofold"
    assert env["max_validity_days"] == 397
    # A key that is not the certificate's is refused, and the installed CA stays as it was.
    write_ca(tmp_path / "other", "other CA")
    done = run(
        "admin", "env", "set", "prod", "--data", str(data), "--issuing-ca-key", str(tmp_path / "other" / "ca.key"),
        "--issuing-ca-cert", str(tmp_path / "given" / "ca.crt"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "[key_cert_mismatch]" in done.stderr
    assert "Traceback" not in done.stderr
    assert keys.public_key_bytes(keys.load_private_key(installed.read_bytes())) == keys.public_key_bytes(
        ca.key
    )
    done = run("admin", "env", "set", "prod", "--data", str(data), "--no-issuing-ca")
    assert done.returncode == 0, done.stderr
    assert asyncio.run(prod())["issues_certificates"] is False


async def test_serve_names_the_cas_it_holds_and_makes_one_for_production(
    registry: Registry, tmp_path: Path
) -> None:
    announced: list[str] = []
    bank = write_ca(tmp_path / "etc", "bank CA for cat")
    issuers = IssuingCAs(
        tmp_path / "data", {"cat": IssuingFiles(tmp_path / "etc" / "ca.key", tmp_path / "etc" / "ca.crt")}
    )
    await sync_issuing_cas(registry, issuers, announced.append)
    envs = {e["id"]: e for e in await registry.list_environments()}
    assert envs["cat"]["issuing_ca"] == bank.certificate.subject.rfc4514_string()
    assert envs["prod"]["issues_certificates"] is True  # a local one, in the data directory
    assert (tmp_path / "data" / "issuing" / "prod" / "ca.key").stat().st_mode & 0o777 == 0o600
    prod_pem = await registry.issuing_ca_pem("prod")
    assert issuers.get("prod", prod_pem) is not None
    assert any("created a local issuing CA for Production" in line for line in announced)
    # Started again: nothing new is made, nothing is replaced.
    announced.clear()
    await sync_issuing_cas(registry, IssuingCAs(tmp_path / "data", issuers.configured), announced.append)
    assert await registry.issuing_ca_pem("prod") == prod_pem
    assert not any("created" in line for line in announced)
    # A node whose files are not the CA the registry names says so and does not issue.
    other = IssuingCAs(tmp_path / "other-node")
    write_ca(tmp_path / "other-node" / "issuing" / "prod", "a stranger")
    announced.clear()
    await sync_issuing_cas(registry, other, announced.append)
    assert await registry.issuing_ca_pem("prod") == prod_pem
    assert any("is not the issuing CA the registry names for prod" in line for line in announced)
    assert other.get("prod", prod_pem) is None


async def test_no_local_ca_where_production_trusts_a_ca_already(registry: Registry, tmp_path: Path) -> None:
    bank = LocalCA("the bank's own CA")
    await registry.save_environment(SYSTEM, "prod", ca_pem=certs.certificate_pem(bank.certificate).decode())
    await sync_issuing_cas(registry, IssuingCAs(tmp_path / "data"), lambda _m: None)
    assert (await registry.environment("prod"))["issues_certificates"] is False
    assert not (tmp_path / "data" / "issuing").exists()
    # ... nor when the operator turned it off.
    await registry.save_environment(SYSTEM, "prod", ca_pem="")
    await sync_issuing_cas(registry, IssuingCAs(tmp_path / "data"), lambda _m: None, create_local=False)
    assert (await registry.environment("prod"))["issues_certificates"] is False


def test_serve_settings_name_issuing_ca_files(tmp_path: Path) -> None:
    toml = tmp_path / "twofold.toml"
    toml.write_text(
        '[issuing_ca.prod]\nkey = "/etc/twofold/prod-ca.key"\ncert = "/etc/twofold/prod-ca.crt"\n'
    )
    files = ServeConfig.load(str(toml)).issuing_files()
    assert files == {"prod": IssuingFiles(Path("/etc/twofold/prod-ca.key"), Path("/etc/twofold/prod-ca.crt"))}
    toml.write_text('[issuing_ca.prod]\nkey = "/etc/twofold/prod-ca.key"\n')
    done = subprocess.run(
        [TWOFOLD, "serve", "--config", str(toml), "--data", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "[issuing_ca.prod] needs key" in done.stderr
    assert not (tmp_path / "d").exists()
