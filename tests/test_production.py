"""Production walked end to end on the embedded default (`twofold.serve.run`, SQLite): the
local issuing CA that `serve` makes on first start issues certificates from CSRs (through
`twofold portal cert request` and the JSON API), they are registered, and a signed call with
them through the prod gateway is accepted — by httpx, by `curl --cert --key`, and the issued
certificate verifies with `openssl verify -CAfile`. A self-signed certificate is still refused
in Production, and a CSR for another organisation's Common Name is refused."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import twofold
from gatewaykit import (
    Pair,
    World,
    assert_refusal,
    ec_pair,
    payment,
    running_world,
    save_pair,
    tls_outcome,
    wait_until,
)
from twofold.crypto import certs, keys
from twofold.lifecycle import JWKS_PATH, NoticeSigner
from twofold.provider_keys import ProviderKey
from twofold.registry.auth import SYSTEM

TWOFOLD = str(Path(sys.executable).with_name("twofold"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_world(tmp_path_factory.mktemp("production")) as running:
        yield running


def cli(world: World, org: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TWOFOLD_PORTAL": world.portal,
        "TWOFOLD_TOKEN": world.orgs[org].token,
        "TWOFOLD_CACERT": str(world.ca_path),
    }
    return subprocess.run([TWOFOLD, *args], capture_output=True, text=True, env=env, timeout=60)


def issuing_ca(world: World) -> Path:
    return world.config.data / "issuing" / "prod" / "ca.crt"


@pytest.fixture(scope="module")
def issued(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """acme's mTLS certificate (a CSR made by `twofold csr new`, through the CLI) and its Digital
    Signature certificate (a CSR sent to the JSON API), both issued in prod."""
    work = tmp_path_factory.mktemp("acme-prod")
    mtls_key = keys.generate_private_key("ec")
    (work / "mtls.key").write_bytes(keys.private_key_bytes(mtls_key))
    made = subprocess.run(
        [TWOFOLD, "csr", "new", "--key", str(work / "mtls.key"), "--subject", "/C=US/O=Acme/CN=acme-prod-issued",
         "--out", str(work / "mtls.csr")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = cli(
        world, "acme", "portal", "cert", "request", "--env", "prod", "--use", "mtls", str(work / "mtls.csr"),
        "--out", str(work / "mtls.crt"), "--chain", str(work / "chain.pem"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "issued and registered MTLS certificate acme-prod-issued in prod" in done.stderr
    mtls = Pair(
        mtls_key,
        certs.load_certificate((work / "mtls.crt").read_bytes()),
        work / "mtls.key",
        work / "mtls.crt",
    )

    sign_key = keys.generate_private_key("rsa", bits=2048)
    csr = certs.csr_pem(certs.build_csr(sign_key, "/O=Acme/CN=acme-prod-sign"))
    with world.api("acme") as api:
        response = api.post(
            "/api/v1/certificates/requests",
            json={"environment": "prod", "use": "signature", "csr": csr.decode(), "days": 90},
        )
        assert response.status_code == 201, response.text
        row = response.json()
        assert row["days_left"] == 90
        for product in ("balance", "payments"):
            added = api.put(f"/api/v1/projects/{world.orgs['acme'].project_id}/products/prod/{product}")
            assert added.status_code == 200, added.text
    sign = save_pair(work, "sign", sign_key, certs.load_certificate(row["certificate_pem"].encode()))
    world.sync()
    return {
        "mtls": mtls,
        "sign": sign,
        "chain": Pair(mtls_key, mtls.certificate, work / "mtls.key", work / "chain.pem"),
    }


def test_serve_made_a_local_issuing_ca_for_production(world: World) -> None:
    assert any("created a local issuing CA for Production" in line for line in world.extra["announced"])
    assert (world.config.data / "issuing" / "prod" / "ca.key").stat().st_mode & 0o777 == 0o600
    with world.api("acme") as api:
        envs = {e["id"]: e for e in api.get("/api/v1/environments").json()}
    assert envs["prod"]["issues_certificates"] is True
    assert envs["cat"]["issues_certificates"] is False
    assert envs["prod"]["gateway_url"] == world.url("", "prod")
    assert "ca.key" not in str(envs)
    assert "PRIVATE" not in str(envs)


def test_a_signed_call_with_issued_certificates_is_accepted_in_production(
    world: World, issued: dict[str, Pair]
) -> None:
    with twofold.Client(
        world.url("", "prod"),
        cert=issued["mtls"].cert_path,
        key=issued["mtls"].key_path,
        signing_key=issued["sign"].key_path,
        signing_cert=issued["sign"].cert_path,
        verify=str(world.ca_path),
        timeout=15,
    ) as api:
        response = api.post("/tsapi/v1/payments", json=payment())
        assert response.status_code == 202, response.text
        assert api.get("/accessapi/balance").status_code == 200
    line = [entry for entry in world.access.since(0) if entry["env"] == "prod" and entry["status"] == 202]
    assert line
    assert line[-1]["signed_by"] == issued["sign"].fingerprint


def test_openssl_verifies_the_issued_certificate_and_curl_calls_with_it(
    world: World, issued: dict[str, Pair], openssl: str, curl: str
) -> None:
    chain = issued["chain"].cert_path
    assert chain.read_bytes() == issuing_ca(world).read_bytes()
    for pair in (issued["mtls"], issued["sign"]):
        verified = subprocess.run(
            [openssl, "verify", "-CAfile", str(chain), str(pair.cert_path)], capture_output=True, text=True
        )
        assert verified.returncode == 0, verified.stderr
    answer = subprocess.run(
        [curl, "--silent", "--show-error", "--fail", "--cert", str(issued["mtls"].cert_path), "--key",
         str(issued["mtls"].key_path), "--cacert", str(world.ca_path), "--header", "Content-Type: application/json",
         world.url("/accessapi/balance", "prod")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    assert '"balances"' in answer.stdout or '"balance"' in answer.stdout


def test_self_signed_certificates_are_still_refused_in_production(world: World, tmp_path: Path) -> None:
    self_signed = ec_pair(tmp_path, "self", "acme-prod-self")
    with world.api("acme") as api:
        response = api.post(
            "/api/v1/certificates",
            json={"environment": "prod", "use": "mtls", "certificate": self_signed.pem},
        )
    assert_refusal(response, 400, "self_signed_not_allowed")
    # acme's self-signed cat certificate opens no connection to the prod gateway.
    assert tls_outcome(world.port("prod"), world.orgs["acme"].mtls, world.ca_path)[0] == "refused"


def test_a_csr_for_another_organisation_s_common_name_is_refused(world: World, tmp_path: Path) -> None:
    key = keys.generate_private_key("ec")
    (tmp_path / "req.csr").write_bytes(certs.csr_pem(certs.build_csr(key, "/O=Acme/CN=globex-cat")))
    done = cli(
        world, "acme", "portal", "cert", "request", "--env", "prod", "--use", "mtls", str(tmp_path / "req.csr"),
        "--out", str(tmp_path / "cert.pem"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "[cn_taken]" in done.stderr
    assert "belongs to another organisation" in done.stderr
    assert not (tmp_path / "cert.pem").exists()
    # Client Testing has no issuing CA: a CSR there is refused with what to do instead.
    done = cli(
        world, "acme", "portal", "cert", "request", "--env", "cat", "--use", "mtls", str(tmp_path / "req.csr"),
        "--out", str(tmp_path / "cert.pem"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "[environment_not_issuing]" in done.stderr


def test_the_ca_key_is_never_in_the_registry_or_the_logs(world: World, issued: dict[str, Pair]) -> None:
    key_pem = (world.config.data / "issuing" / "prod" / "ca.key").read_bytes()
    secret = keys.load_private_key(key_pem)
    der = keys.private_key_bytes(secret, der=True)
    database = (world.config.data / "twofold.db").read_bytes()
    for wal in world.config.data.glob("twofold.db-wal"):
        database += wal.read_bytes()
    assert key_pem not in database
    assert der[-32:] not in database
    assert b"PRIVATE KEY" not in database
    log_text = "\n".join(world.access.raw_since(0)) + "\n".join(world.extra["announced"])
    assert "PRIVATE KEY" not in log_text


def test_the_expiry_metric_and_the_notice_jwks_are_served(world: World, issued: dict[str, Pair]) -> None:
    not_after = issued["mtls"].certificate.not_valid_after_utc

    def expiry() -> float:
        return world.metric("twofold_certificate_expiry_seconds", environment="prod", org="acme", use="mtls")

    wait_until(lambda: expiry() > 0, 10)
    left = (not_after - dt.datetime.now(dt.UTC)).total_seconds()
    soonest_prod = min(  # acme has two mTLS certificates in prod: the metric is the soonest
        left,
        (world.extra["acme_prod"].certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds(),
    )
    assert expiry() == pytest.approx(soonest_prod, abs=30)
    assert (
        world.metric("twofold_certificate_expiry_seconds", environment="cat", org="globex", use="signature")
        > 0
    )
    jwks = httpx.get(world.portal + JWKS_PATH, verify=world.client_context(None), timeout=10).json()
    signer = NoticeSigner.load_or_create(world.config.data / "portal" / "notice-signing.key")
    responses = ProviderKey.load_or_create(world.config.response_key_path)
    # One JWKS: the notice key and the gateway's response key, public halves only.
    assert sorted(jwks["keys"], key=lambda k: k["kid"]) == sorted(
        [signer.jwk, responses.jwk], key=lambda k: k["kid"]
    )


def test_the_portal_shows_a_banner_for_certificates_expiring_soon(world: World, tmp_path: Path) -> None:
    short = ec_pair(tmp_path, "short", "acme-short-lived", days=6)
    world.register("acme", "cat", "mtls", short)
    email = "banner-reader@acme.example"
    world.call(
        world.registry.add_user(
            SYSTEM, email, org="acme", roles="developer", password="a long enough password"
        )
    )
    with httpx.Client(base_url=world.portal, verify=world.client_context(None), timeout=10) as browser:
        signed_in = browser.post("/login", data={"email": email, "password": "a long enough password"})
        assert signed_in.status_code == 303
        page = browser.get("/projects").text  # any page
    assert 'id="expiry-banner"' in page
    assert "acme-short-lived" in page
    assert "in 6 days" in page
    assert "acme-cat</a>" not in page  # a year left: not in the banner
    world.remove("acme", "cat", short)
