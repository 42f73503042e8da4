"""Two gateway nodes on one PostgreSQL registry (issue 11): node A is `twofold serve` in this
process, node B a `twofold serve` process of its own with its own data directory (its own TLS
CA, its own response key). A signed request captured on its way to one node cannot be replayed
to the other; the same request sent to both at once is forwarded once; each node's response
key is in the JWKS that either portal serves, so a response signed by B verifies with A's."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import POSTGRES_HOST, POSTGRES_PORT, own_postgres_database
from gatewaykit import World, assert_refusal, post_at_once, running_world, wait_until
from servekit import ServeProcess, serve_process
from twofold.client import ResponseVerifier
from twofold.crypto import jws
from twofold.provider_keys import JWKS_PATH, ProviderKey
from twofold.registry.auth import SYSTEM

pytestmark = pytest.mark.postgres
JOSE = {"Content-Type": "application/jose"}


@dataclass
class Nodes:
    a: World
    b: ServeProcess

    def post(self, node: str, body: bytes) -> int:
        with self.client(node) as client:
            return client.post("/guarded/payments", content=body, headers=JOSE).status_code

    def client(self, node: str) -> httpx.Client:
        if node == "a":
            return self.a.client(self.a.orgs["acme"].mtls)
        acme = self.a.orgs["acme"].mtls
        context = self.b.client_context()
        context.load_cert_chain(str(acme.cert_path), str(acme.key_path))
        return httpx.Client(base_url=f"https://localhost:{self.b.cat}", verify=context, timeout=15)

    def b_version(self) -> int:
        ready = httpx.get(f"http://127.0.0.1:{self.b.admin}/readyz", timeout=5).json()
        return int(ready["registry_version"] or 0)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    base = tmp_path_factory.mktemp("replay-nodes")
    with own_postgres_database("twofold_replay") as name:
        url = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
        with running_world(base / "a", db=url) as a:
            a.call(
                a.registry.save_product(
                    SYSTEM,
                    "guarded",
                    name="Guarded payments",
                    path_prefix="/guarded",
                    upstream=a.upstream.url,
                    signature="required",
                    content_types=["application/jose"],
                    replay_window=60,
                )
            )
            a.call(a.registry.set_product_protection(SYSTEM, "balance", sign_responses=True))
            with a.api("acme") as api:
                assert (
                    api.put(f"/api/v1/projects/{a.orgs['acme'].project_id}/products/cat/guarded").status_code
                    == 200
                )
            a.sync()
            settings = f'db = "{url}"\nlocal_issuing_ca = false'
            with serve_process(base / "b", settings) as b:
                nodes = Nodes(a, b)
                wait_until(lambda: nodes.b_version() >= a.version(), 30, 0.1)
                yield nodes
                assert "Traceback" not in b.log()
            a.assert_no_internal_errors()


def signed(nodes: Nodes) -> bytes:
    key = nodes.a.orgs["acme"].sign
    assert key is not None
    claims = {"iat": int(time.time()), "jti": uuid.uuid4().hex, "amount": "99.00"}
    return jws.sign(json.dumps(claims).encode(), key.key).encode()


def test_a_request_accepted_by_one_node_is_refused_by_the_other(nodes: Nodes) -> None:
    mark = nodes.a.upstream.count()
    body = signed(nodes)
    assert nodes.post("a", body) == 200
    with nodes.client("b") as client:
        assert_refusal(client.post("/guarded/payments", content=body, headers=JOSE), 409, "replay_detected")
    other = signed(nodes)
    assert nodes.post("b", other) == 200
    assert nodes.post("a", other) == 409
    assert len(nodes.a.upstream.since(mark)) == 2


def test_the_same_request_sent_to_both_nodes_at_once_is_forwarded_once(nodes: Nodes) -> None:
    for _round in range(3):
        body = signed(nodes)
        mark = nodes.a.upstream.count()
        makers = [lambda node="ab"[i % 2]: nodes.client(node) for i in range(12)]
        statuses = post_at_once(makers, "/guarded/payments", body, JOSE)
        assert statuses == [200] + [409] * 11
        assert len(nodes.a.upstream.since(mark)) == 1


def test_each_nodes_response_key_is_in_the_jwks_of_either_portal(nodes: Nodes) -> None:
    key_a = ProviderKey.load_or_create(nodes.a.config.response_key_path)
    key_b = ProviderKey.load_or_create(nodes.b.data / "gateway" / "response-signing.key")
    assert key_a.kid != key_b.kid
    jwks_a = httpx.get(nodes.a.portal + JWKS_PATH, verify=nodes.a.client_context(None), timeout=10).json()
    jwks_b = httpx.get(
        f"https://localhost:{nodes.b.portal}{JWKS_PATH}", verify=nodes.b.client_context(), timeout=10
    ).json()
    kids_a = {k["kid"] for k in jwks_a["keys"]}
    assert {key_a.kid, key_b.kid} <= kids_a
    assert kids_a == {k["kid"] for k in jwks_b["keys"]}
    assert len(kids_a) == 4  # and each node's notice key
    # A balance answer signed by node B verifies with the JWKS of node A's portal.
    verifier = ResponseVerifier(nodes.a.portal + JWKS_PATH, verify=nodes.a.ca_path)
    with nodes.client("b") as client:
        answer = verifier.verified(client.get("/accessapi/balance"))
    assert answer.extensions["twofold.response_header"]["kid"] == key_b.kid
    assert answer.json()["organisation"] == "acme"


def test_the_response_keys_are_files_for_their_owner_only(nodes: Nodes) -> None:
    assert Path(nodes.a.config.response_key_path).stat().st_mode & 0o077 == 0
    assert (nodes.b.data / "gateway" / "response-signing.key").stat().st_mode & 0o077 == 0
