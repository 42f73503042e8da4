"""`twofold rotate` against `twofold serve` in its own process: clients keep calling the
gateway with signed requests on several connections through a rotation of both credentials —
not one call fails — and a failed probe rolls everything back."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import twofold
from servekit import Served, serving
from twofold.crypto import certs, keys


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("rotate")) as running:
        yield running


def stamp(directory: Path) -> tuple[int, ...]:
    return tuple(
        p.stat().st_mtime_ns
        for p in (directory / n for n in ("mtls.key", "mtls.crt", "sign.key", "sign.crt"))
    )


def pair_matches(key_path: Path, cert_path: Path) -> bool:
    key = keys.load_private_key(key_path.read_bytes())
    return keys.public_key_bytes(key) == keys.public_key_bytes(
        certs.load_certificate(cert_path.read_bytes()).public_key()  # type: ignore[arg-type]
    )


@dataclass
class Caller:
    """A client calling the payments API (signed) in a loop on its own keep-alive connection; it
    picks up new credential files between calls, once the files on disk form matching pairs."""

    served: Served
    directory: Path
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    reloads: int = 0
    after: int = 0  # calls made with the credentials loaded last
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self) -> twofold.Client:
        d = self.directory
        return twofold.Client(
            self.served.gateway("cat"),
            cert=d / "mtls.crt",
            key=d / "mtls.key",
            signing_key=d / "sign.key",
            signing_cert=d / "sign.crt",
            verify=str(self.served.ca),
            timeout=15,
        )

    def run(self) -> None:
        seen = stamp(self.directory)
        api = self.client()
        try:
            while not self.stop.is_set():
                now = stamp(self.directory)
                if now != seen and all(
                    pair_matches(self.directory / f"{n}.key", self.directory / f"{n}.crt")
                    for n in ("mtls", "sign")
                ):
                    api.close()
                    api, seen = self.client(), now
                    self.reloads += 1
                    self.after = 0
                body = {"payments": {"paymentIdentifiers": {"endToEndId": f"E2E-{uuid.uuid4().hex[:20]}"}}}
                try:
                    response = api.post("/tsapi/v1/payments", json=body)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    if response.status_code == 202:
                        self.ok += 1
                        self.after += 1
                    else:
                        self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                time.sleep(0.005)
        finally:
            api.close()


def test_clients_keep_calling_through_a_rotation_of_both_credentials(served: Served, tmp_path: Path) -> None:
    member = served.member("acme", {"cat": ["payments", "echo"]})
    directory = tmp_path / "acme-cat"
    served.credentials(member, directory, "acme-rot")
    old = {
        n: certs.fingerprint_sha256(certs.load_certificate((directory / f"{n}.crt").read_bytes()))
        for n in ("mtls", "sign")
    }
    callers = [Caller(served, directory) for _ in range(3)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in callers]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while not all(c.ok >= 5 for c in callers):
            assert time.monotonic() < deadline, [c.failures for c in callers]
            time.sleep(0.05)
        done = served.cli(member, "rotate", "--env", "cat", "--dir", str(directory), "--grace", "2", "--json")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 20
        while not all(c.after >= 5 and c.reloads for c in callers):  # calls go on after the removal
            assert time.monotonic() < deadline, [(c.reloads, c.after, c.failures) for c in callers]
            time.sleep(0.05)
    finally:
        for caller in callers:
            caller.stop.set()
        for thread in threads:
            thread.join(20)
    assert [c.failures for c in callers] == [[], [], []]
    # Each caller loaded the new files: once, or twice when it looked between the switch of the
    # mTLS pair and that of the signature pair (each pair matching on its own).
    assert all(c.reloads in (1, 2) for c in callers), [c.reloads for c in callers]
    total = sum(c.ok for c in callers)
    assert total >= 30
    # The registry holds the new certificates only; the files are the new ones; no *.old left.
    new = {
        n: certs.fingerprint_sha256(certs.load_certificate((directory / f"{n}.crt").read_bytes()))
        for n in ("mtls", "sign")
    }
    assert set(new.values()).isdisjoint(old.values())
    with served.api(member.token) as api:
        registered = {c["fingerprint"] for c in api.get("/api/v1/certificates", params={"env": "cat"}).json()}
    assert registered == set(new.values())
    assert sorted(p.name for p in directory.iterdir()) == [
        "mtls.crt",
        "mtls.csr",
        "mtls.key",
        "sign.crt",
        "sign.csr",
        "sign.key",
    ]
    assert (directory / "mtls.key").stat().st_mode & 0o777 == 0o600
    assert keys.describe_key(keys.load_private_key((directory / "mtls.key").read_bytes())) == "RSA 2048"
    assert "✓ probe: POST" in done.stderr
    assert "removed the old Digital Signature certificate" in done.stderr


def test_a_failed_probe_rolls_back_and_says_why(served: Served, tmp_path: Path) -> None:
    member = served.member("globex", {"cat": ["payments", "balance"]})
    directory = tmp_path / "globex-cat"
    served.credentials(member, directory, "globex-rot")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with served.api(member.token) as api:
        registered = {c["fingerprint"] for c in api.get("/api/v1/certificates").json()}
    # The balance API verifies no signature: a signed probe there cannot prove the new key.
    done = served.cli(
        member,
        "rotate",
        "--env",
        "cat",
        "--dir",
        str(directory),
        "--use",
        "signature",
        "--probe",
        "/accessapi/balance",
    )
    assert done.returncode == 1
    assert "rolled back" in done.stderr
    assert "content_type_not_accepted" in done.stderr
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no .new, no .old, same files
    with served.api(member.token) as api:
        assert {c["fingerprint"] for c in api.get("/api/v1/certificates").json()} == registered
    # Credentials of cat are not rotated in prod: refused before anything is made.
    done = served.cli(member, "rotate", "--env", "prod", "--dir", str(directory), "--use", "mtls")
    assert done.returncode == 2
    assert "is not registered in prod (it is registered in cat)" in done.stderr
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_rotation_in_production_gets_the_new_certificate_from_the_issuing_ca(
    served: Served, tmp_path: Path
) -> None:
    member = served.member("initech", {"prod": ["echo"]})
    directory = tmp_path / "initech-prod"
    directory.mkdir()
    key = keys.generate_private_key("ec", curve="P-384")
    (directory / "mtls.key").write_bytes(keys.private_key_bytes(key))
    (directory / "mtls.csr").write_bytes(certs.csr_pem(certs.build_csr(key, "/O=Initech/CN=initech-prod")))
    done = served.cli(
        member, "portal", "cert", "request", "--env", "prod", "--use", "mtls", str(directory / "mtls.csr"),
        "--out", str(directory / "mtls.crt"), "--days", "30",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    old = certs.load_certificate((directory / "mtls.crt").read_bytes())
    served.sync()
    done = served.cli(
        member, "rotate", "--env", "prod", "--use", "mtls", "--dir", str(directory), "--grace", "0"
    )
    assert done.returncode == 0, done.stderr
    assert "issued by Production's CA" in done.stderr
    new = certs.load_certificate((directory / "mtls.crt").read_bytes())
    ca = certs.load_certificate((served.data / "issuing" / "prod" / "ca.crt").read_bytes())
    new.verify_directly_issued_by(ca)
    assert new.subject == old.subject
    assert keys.describe_key(keys.load_private_key((directory / "mtls.key").read_bytes())) == "EC P-384"
    with served.api(member.token) as api:
        rows = api.get("/api/v1/certificates", params={"env": "prod"}).json()
    assert [r["fingerprint"] for r in rows] == [certs.fingerprint_sha256(new)]
    assert rows[0]["days_left"] == 730  # the environment's maximum, not the old certificate's 30 days
