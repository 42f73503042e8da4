"""`kill -9` of `twofold serve` in the middle of certificate uploads (issue 11 faults): on
restart the audit chain verifies (`twofold admin audit verify`), every certificate in the
registry is whole (its DER parses and is what its fingerprint names) and audited, and every
upload that was answered 201 before the kill is there."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
from sqlalchemy import select

from gatewaykit import wait_until
from servekit import TWOFOLD, Served, serving
from twofold.crypto import certs, keys
from twofold.registry.auth import SYSTEM
from twofold.registry.models import AuditEntry, Certificate
from twofold.registry.service import Registry

UPLOADERS = 6


def _upload_until_stopped(
    served: Served, token: str, index: int, accepted: list[str], stop: threading.Event
) -> None:
    with served.api(token) as api:
        n = 0
        while not stop.is_set():
            n += 1
            key = keys.generate_private_key("ec")  # a public key is registered once
            cert = certs.self_signed_certificate(key, f"/O=Acme/CN=acme-crash-{index}-{n}")
            pem = certs.certificate_pem(cert).decode()
            try:
                response = api.post(
                    "/api/v1/certificates", json={"environment": "cat", "use": "mtls", "certificate": pem}
                )
            except httpx.HTTPError:
                return  # the server is gone
            if response.status_code == 201:
                accepted.append(response.json()["fingerprint"])
            else:
                accepted.append(f"refused: {response.status_code} {response.text[:200]}")


def test_kill_9_in_the_middle_of_uploads_leaves_a_whole_registry(tmp_path: Path) -> None:
    accepted: list[str] = []
    stop = threading.Event()
    with serving(tmp_path) as served:
        member = served.member("acme", {})
        threads = [
            threading.Thread(target=_upload_until_stopped, args=(served, member.token, i, accepted, stop))
            for i in range(UPLOADERS)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(accepted) >= 40, 60, 0.01)
        os.killpg(served.proc.process.pid, signal.SIGKILL)  # uploads in flight, mid-transaction
        served.proc.process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(30)
    data = tmp_path / "data"
    verified = subprocess.run(
        [TWOFOLD, "admin", "audit", "verify", "--data", str(data)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "audit log intact" in verified.stdout

    with serving(tmp_path) as again:  # and serve starts on it again, and takes uploads
        rows, audited = again.registry(_certificates_and_audit)
        fresh = keys.generate_private_key("ec")
        pem = certs.certificate_pem(
            certs.self_signed_certificate(fresh, "/O=Acme/CN=acme-after-crash")
        ).decode()
        token = again.registry(lambda r: r.create_token(SYSTEM, "after", for_email="security@acme.example"))
        with again.api(token) as api:
            assert (
                api.post(
                    "/api/v1/certificates", json={"environment": "cat", "use": "mtls", "certificate": pem}
                ).status_code
                == 201
            )
    refused = [a for a in accepted if a.startswith("refused")]
    assert refused == []
    fingerprints = {row.fingerprint for row in rows}
    assert set(accepted) <= fingerprints  # every 201 is there
    for row in rows:  # and nothing is there half
        assert hashlib.sha256(row.der).hexdigest() == row.fingerprint
        parsed = certs.load_certificate(row.der)
        assert certs.fingerprint_sha256(parsed) == row.fingerprint
        assert row.common_name.startswith("acme-crash-")
    assert fingerprints == audited  # one certificate.add entry per certificate, no more, no less


async def _certificates_and_audit(registry: Registry) -> tuple[list[Certificate], set[str]]:
    async with registry.sessions() as session:
        rows = list((await session.execute(select(Certificate))).scalars())
        audited = {
            entry.object_id
            for entry in (
                await session.execute(select(AuditEntry).where(AuditEntry.action == "certificate.add"))
            ).scalars()
        }
    return rows, audited
