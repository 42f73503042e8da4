"""sslyze ``--mozilla_config intermediate`` against the real `twofold serve` (portal and a
gateway, on free ports): compliant — TLS 1.2/1.3 only, the intermediate suites, the curves
X25519, P-256 and P-384 only (no P-521, no X448), a server certificate that lives at most
366 days. sslyze is given serve's local CA, so that certificate path validation passes too
(without it, the local CA not being publicly trusted is the one finding, as expected).

sslyze runs from its own virtualenv (``.venv/sslyze``, made by ``make test``; see
pyproject.toml's ``tls-scan`` group for why)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import twofold
from conftest import require
from gatewaykit import wait_until
from servekit import ServeProcess, serve_process
from twofold.crypto import certs, keys
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry
from twofold.serve import MAX_SERVER_CERT_DAYS, local_tls

SSLYZE = Path(
    os.environ.get("TWOFOLD_SSLYZE", Path(sys.executable).parent.parent / "sslyze" / "bin" / "sslyze")
)


@dataclass
class Scanned:
    serve: ServeProcess
    mtls: Path
    key: Path


async def _register_client(db: Path, pem: bytes) -> None:
    registry = await Registry.open(str(db), migrate=False)
    try:
        await registry.add_org(SYSTEM, "acme")
        await registry.add_user(SYSTEM, "sec@acme.test", org="acme", roles="api_security", password=None)
        who = await registry.token_principal(await registry.create_token(SYSTEM, for_email="sec@acme.test"))
        await registry.add_certificate(who, "cat", "mtls", pem)
    finally:
        await registry.close()


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Scanned]:
    require("sslyze (make .venv/sslyze/bin/sslyze)", SSLYZE.exists(), request.node.nodeid)
    work = tmp_path_factory.mktemp("tls-scan")
    with serve_process(work) as served:
        key = keys.generate_private_key("ec")
        cert = certs.self_signed_certificate(key, "/O=Acme/CN=acme-scan")
        (work / "mtls.crt").write_bytes(certs.certificate_pem(cert))
        (work / "mtls.key").write_bytes(keys.private_key_bytes(key))
        asyncio.run(_register_client(served.data / "twofold.db", certs.certificate_pem(cert)))
        scanned = Scanned(served, work / "mtls.crt", work / "mtls.key")

        def gateway_accepts() -> bool:
            try:
                with twofold.Client(
                    verify=str(served.ca), cert=scanned.mtls, key=scanned.key, timeout=5
                ) as client:
                    return client.get(f"https://localhost:{served.cat}/accessapi/balance").status_code < 500
            except httpx.TransportError:
                return False

        wait_until(gateway_accepts, 5, 0.1)
        yield scanned


def _sslyze(served: ServeProcess, port: int, *client: str) -> str:
    done = subprocess.run(
        [
            str(SSLYZE),
            "--mozilla_config",
            "intermediate",
            "--certinfo_ca_file",
            str(served.ca),
            *client,
            f"localhost:{port}{{127.0.0.1}}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done.stdout


def _assert_compliant(output: str, port: int) -> None:
    assert f"localhost:{port}: OK - Compliant." in output, output[-3000:]
    supported = next(line for line in output.splitlines() if "Supported curves:" in line)
    assert {c.strip() for c in supported.split(":", 1)[1].split(",")} == {"X25519", "secp256r1", "secp384r1"}
    assert (
        "TLS 1.1 Cipher Suites:\n     Attempted to connect using 80 cipher suites; the server rejected all"
        in output
    )


def test_the_portal_is_compliant_with_mozilla_intermediate(scanned: Scanned) -> None:
    _assert_compliant(_sslyze(scanned.serve, scanned.serve.portal), scanned.serve.portal)


def test_a_gateway_is_compliant_with_mozilla_intermediate(scanned: Scanned) -> None:
    """The gateway requires a registered client certificate: sslyze presents one."""
    output = _sslyze(scanned.serve, scanned.serve.cat, "--cert", str(scanned.mtls), "--key", str(scanned.key))
    _assert_compliant(output, scanned.serve.cat)


def test_a_data_directory_with_a_long_lived_server_certificate_gets_a_new_one(tmp_path: Path) -> None:
    """Data directories of earlier versions hold an 825-day server certificate: renewed at start."""
    said: list[str] = []
    first = local_tls(tmp_path, said.append)
    life = first.server_cert.not_valid_after_utc - first.server_cert.not_valid_before_utc
    assert life <= dt.timedelta(days=MAX_SERVER_CERT_DAYS)
    old = first.ca.issue("localhost", usage="server", sans=["DNS:localhost"], days=825)
    (tmp_path / "tls" / "server.crt").write_bytes(certs.certificate_pem(old.certificate))
    (tmp_path / "tls" / "server.key").write_bytes(keys.private_key_bytes(old.key))
    said.clear()
    renewed = local_tls(tmp_path, said.append)
    assert renewed.server_cert != old.certificate
    life = renewed.server_cert.not_valid_after_utc - renewed.server_cert.not_valid_before_utc
    assert life <= dt.timedelta(days=MAX_SERVER_CERT_DAYS)
    assert any("825 days" in line for line in said), said
    assert certs.load_certificate((tmp_path / "tls" / "server.crt").read_bytes()) == renewed.server_cert
    renewed.server_cert.verify_directly_issued_by(first.ca.certificate)
    # A current certificate is kept as it is.
    assert local_tls(tmp_path, said.append).server_cert == renewed.server_cert


def test_a_server_certificate_about_to_expire_is_renewed(tmp_path: Path) -> None:
    first = local_tls(tmp_path, lambda _m: None)
    soon = first.ca.issue("localhost", usage="server", sans=["DNS:localhost"], days=10)
    (tmp_path / "tls" / "server.crt").write_bytes(certs.certificate_pem(soon.certificate))
    (tmp_path / "tls" / "server.key").write_bytes(keys.private_key_bytes(soon.key))
    said: list[str] = []
    assert local_tls(tmp_path, said.append).server_cert != soon.certificate
    assert any("expires in" in line for line in said), said
