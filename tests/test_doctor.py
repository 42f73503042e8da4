"""`twofold doctor` against `twofold serve` in its own process: a healthy setup passes every
check, and each failure mode — wrong CA, unregistered, wrong environment, key/cert mismatch,
expired, signing key not registered, product not in a project — is produced for real and
answered ✗ with what to do."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from servekit import Member, Served, serving
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA


@dataclass
class Setup:
    served: Served
    member: Member
    creds: Path

    def doctor(
        self, *args: str, url: str | None = None, portal: bool = True
    ) -> subprocess.CompletedProcess[str]:
        base = [
            "doctor",
            url or self.served.gateway("cat") + "/accessapi/balance",
            "--cacert",
            str(self.served.ca),
        ]
        if portal:
            base += ["--portal", self.served.portal, "--token", self.member.token]
        return self.served.cli(None, *base, *args, "--json")

    def checks(self, done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
        assert "Traceback" not in done.stderr
        report = json.loads(done.stdout)
        assert report["ok"] is (done.returncode == 0)
        return {c["id"]: c for c in report["checks"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("doctor")
    with serving(work) as served:
        member = served.member("acme", {"cat": ["balance", "echo"]})
        creds = work / "acme-cat"
        served.credentials(member, creds, "acme-doc")
        yield Setup(served, member, creds)


def mine(setup: Setup, *extra: str) -> list[str]:
    c = setup.creds
    return ["--cert", str(c / "mtls.crt"), "--key", str(c / "mtls.key"), *extra]


def signing(setup: Setup) -> list[str]:
    return ["--sign-key", str(setup.creds / "sign.key"), "--sign-cert", str(setup.creds / "sign.crt")]


def test_a_healthy_setup_passes_every_check(setup: Setup) -> None:
    done = setup.doctor(*mine(setup), *signing(setup))
    checks = setup.checks(done)
    assert done.returncode == 0, done.stdout
    assert {k: v["status"] for k, v in checks.items()} == dict.fromkeys(
        [
            "files",
            "key_pair",
            "validity",
            "client_auth",
            "reachable",
            "server_tls",
            "client_cert",
            "registered",
            "product",
            "signature",
            "signed_probe",
            "clock",
        ],
        "pass",
    )
    assert checks["server_tls"]["detail"].startswith("TLSv1.")
    assert checks["product"]["detail"] == "balance (/accessapi/balance) is in project 'acme treasury' in cat"
    # The human form: one line per check, ✓ or ✗.
    text = setup.served.cli(
        None, "doctor", setup.served.gateway("cat") + "/accessapi/balance", "--cacert", str(setup.served.ca),
        "--portal", setup.served.portal, "--token", setup.member.token, *mine(setup), *signing(setup),
    )  # fmt: skip
    assert text.returncode == 0
    assert text.stdout.count("✓") == 12
    assert "all 12 checks passed" in text.stderr


def test_wrong_ca(setup: Setup, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(certs.certificate_pem(LocalCA("somebody else's CA").certificate))
    done = setup.served.cli(
        None,
        "doctor",
        setup.served.gateway("cat") + "/accessapi/balance",
        "--cacert",
        str(other),
        *mine(setup),
        "--json",
    )
    checks = setup.checks(done)
    assert done.returncode == 1
    assert checks["server_tls"]["status"] == "fail"
    assert "not trusted by" in checks["server_tls"]["detail"]
    assert "--cacert" in checks["server_tls"]["fix"]
    assert checks["client_cert"]["status"] == "skip"


def test_unregistered_certificate(setup: Setup, tmp_path: Path) -> None:
    key = keys.generate_private_key("ec")
    (tmp_path / "new.key").write_bytes(keys.private_key_bytes(key))
    (tmp_path / "new.crt").write_bytes(
        certs.certificate_pem(certs.self_signed_certificate(key, "/CN=acme-new"))
    )
    done = setup.doctor("--cert", str(tmp_path / "new.crt"), "--key", str(tmp_path / "new.key"))
    checks = setup.checks(done)
    assert done.returncode == 1
    assert checks["client_cert"]["status"] == "fail"
    assert "refused the client certificate" in checks["client_cert"]["detail"]
    assert checks["registered"]["status"] == "fail"
    assert checks["registered"]["detail"].endswith("is not registered as MTLS in cat")
    assert "twofold portal cert add --env cat --use mtls" in checks["registered"]["fix"]


def test_wrong_environment(setup: Setup) -> None:
    done = setup.doctor(*mine(setup), url=setup.served.gateway("prod") + "/accessapi/balance")
    checks = setup.checks(done)
    assert done.returncode == 1
    assert checks["client_cert"]["status"] == "fail"
    assert checks["registered"]["status"] == "fail"
    assert "not registered as MTLS in prod; it is registered in cat (MTLS)" in checks["registered"]["detail"]
    assert "call the gateway of the environment where it is registered" in checks["registered"]["fix"]


def test_key_that_is_not_the_certificate_s(setup: Setup) -> None:
    done = setup.doctor("--cert", str(setup.creds / "mtls.crt"), "--key", str(setup.creds / "sign.key"))
    checks = setup.checks(done)
    assert done.returncode == 1
    assert checks["key_pair"]["status"] == "fail"
    assert "is not the private key of" in checks["key_pair"]["detail"]
    assert checks["client_cert"]["status"] == "skip"


def test_expired_certificate(setup: Setup, tmp_path: Path) -> None:
    key = keys.generate_private_key("ec")
    expired = certs.issue_certificate(
        subject="/CN=acme-old",
        public_key=key.public_key(),
        issuer_key=key,
        days=1,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
    )
    (tmp_path / "old.key").write_bytes(keys.private_key_bytes(key))
    (tmp_path / "old.crt").write_bytes(certs.certificate_pem(expired))
    done = setup.doctor("--cert", str(tmp_path / "old.crt"), "--key", str(tmp_path / "old.key"), portal=False)
    checks = setup.checks(done)
    assert done.returncode == 1
    assert checks["validity"]["status"] == "fail"
    assert checks["validity"]["detail"].startswith("expired on ")
    assert checks["client_cert"]["status"] == "fail"
    assert checks["registered"]["status"] == "skip"  # no portal given


def test_signing_key_not_registered(setup: Setup, tmp_path: Path) -> None:
    key = keys.generate_private_key("rsa", bits=2048)
    (tmp_path / "stray.key").write_bytes(keys.private_key_bytes(key))
    done = setup.doctor(*mine(setup), "--sign-key", str(tmp_path / "stray.key"))
    checks = setup.checks(done)
    assert done.returncode == 1
    assert checks["signature"]["status"] == "fail"
    assert (
        "matches none of the 1 Digital Signature certificate(s) registered in cat"
        in checks["signature"]["detail"]
    )
    assert checks["signed_probe"]["status"] == "fail"
    assert (
        "jws_signature_invalid" in checks["signed_probe"]["detail"]
        or "jws_no_key" in checks["signed_probe"]["detail"]
    )
    assert checks["client_cert"]["status"] == "pass"


def test_product_not_in_a_project(setup: Setup) -> None:
    done = setup.doctor(*mine(setup), url=setup.served.gateway("cat") + "/tsapi/v1/payments")
    checks = setup.checks(done)
    assert done.returncode == 1
    assert checks["product"]["status"] == "fail"
    assert (
        checks["product"]["detail"]
        == "payments (/tsapi/v1/payments) is in no project of your organisation in cat"
    )
    assert "Projects page" in checks["product"]["fix"]
    assert checks["client_cert"]["status"] == "pass"  # the gateway itself says product_not_in_project
