"""The portal's JSON API (``/api/v1``) and its error handling, over real HTTPS with bearer
tokens (httpx), against the portal served as in production on a temporary SQLite registry.

* the authorisation matrix: every route of ``twofold.portal.api.ROUTES`` × every kind of
  caller, own and other organisation — generated from ROUTES, so a new route without an
  expectation fails; nothing of organisation "alpha" ever reaches a caller of "bravo";
* bad uploads: each refusal gets a 4xx JSON error with a code and a message, and leaves the
  registry exactly as it was;
* the OpenAPI document is valid OpenAPI 3 and describes exactly the served routes;
* pages never show a stack trace; errors under /api/ are always JSON.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailkit import outbox
from portalkit import (
    PASSWORD,
    PROD_ISSUER,
    PortalServer,
    ec_key,
    pem,
    raw_certificate,
    rsa_key,
    self_signed,
    weak_hash_certificate,
)
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.mail import OutboxMailer
from twofold.portal import api
from twofold.portal.app import init_app
from twofold.portal.web import PortalConfig
from twofold.registry.auth import SYSTEM, Principal
from twofold.registry.service import CallRecord

MEMBERS = ("operator", "alpha_security", "alpha_developer", "bravo_security", "bravo_developer")
ROLES = ("anonymous", "bad_token", *MEMBERS)
EMAILS = {
    "operator": "ops@platform.test",
    "alpha_security": "security@alpha.test",
    "alpha_developer": "dev@alpha.test",
    "bravo_security": "security@bravo.test",
    "bravo_developer": "dev@bravo.test",
}
ROLE_NAMES = {
    "operator": "operator",
    "alpha_security": "api_security",
    "alpha_developer": "developer",
    "bravo_security": "api_security",
    "bravo_developer": "developer",
}
UNKNOWN_TOKEN = "tf_" + "A" * 43  # well-formed, never issued


# --- the world: two organisations, a user of each role, alpha's objects ------------------------


@dataclass
class World:
    server: PortalServer
    http: httpx.Client
    tokens: dict[str, str]
    principals: dict[str, Principal]
    alpha_certificate: x509.Certificate
    alpha_project: int
    alpha_markers: set[str] = field(default_factory=lambda: {"alpha"})
    outbox: Path = Path("outbox")
    serial: Iterator[int] = field(default_factory=itertools.count)

    def headers(self, role: str) -> dict[str, str]:
        if role == "anonymous":
            return {}
        if role == "bad_token":
            return {"Authorization": f"Bearer {UNKNOWN_TOKEN}"}
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{next(self.serial)}"

    def alpha_cert(self) -> x509.Certificate:
        """A fresh active mTLS certificate of alpha in cat."""
        certificate = self_signed(self.unique("alpha-client"))
        self.server.register(self.principals["alpha_security"], "cat", "mtls", certificate)
        self.alpha_markers.add(certs.fingerprint_sha256(certificate))
        return certificate

    def alpha_new_project(self, *, with_payments: bool = False) -> int:
        project = self.server.call(
            self.server.reg.create_project(self.principals["alpha_developer"], self.unique("alpha-project"))
        )
        if with_payments:
            self.set_link(project["id"], True)
        return int(project["id"])

    def set_link(self, project: int, present: bool) -> None:
        self.server.call(
            self.server.reg.set_project_product(
                self.principals["alpha_developer"], project, "payments", "cat", present=present
            )
        )

    def alpha_projects(self) -> dict[int, dict[str, Any]]:
        listed = self.server.call(self.server.reg.list_projects(SYSTEM, "alpha"))
        return {p["id"]: p for p in listed}

    def active_fingerprints(self) -> set[str]:
        return {c["fingerprint"] for c in self.server.certificates()}

    def token_works(self, token: str) -> bool:
        return self.http.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PortalServer]:
    directory = tmp_path_factory.mktemp("portal-api")
    config = PortalConfig(mailer=OutboxMailer(directory / "outbox"))
    with PortalServer(directory / "registry.db", config=config) as running:
        yield running


@pytest.fixture(scope="module")
def world(server: PortalServer) -> Iterator[World]:
    server.add_org("alpha")
    server.add_org("bravo")
    for role, email in EMAILS.items():
        org = None if role == "operator" else role.split("_")[0]
        server.add_user(email, org=org, roles=ROLE_NAMES[role], password=None)
    tokens = {
        role: server.call(server.reg.create_token(SYSTEM, f"{role}-token", for_email=e))
        for role, e in EMAILS.items()
    }
    principals = {role: server.call(server.reg.token_principal(t)) for role, t in tokens.items()}
    server.call(
        server.reg.save_product(
            SYSTEM, "payments", name="Payments", path_prefix="/tsapi/v1/payments", upstream="sandbox:payments"
        )
    )
    alpha_certificate = self_signed("alpha-client")
    server.register(principals["alpha_security"], "cat", "mtls", alpha_certificate)
    server.register(principals["bravo_security"], "cat", "mtls", self_signed("bravo-client"))
    alpha_project = server.call(server.reg.create_project(principals["alpha_developer"], "alpha-project"))
    server.call(server.reg.create_project(principals["bravo_developer"], "bravo-project"))
    with httpx.Client(base_url=server.url, verify=server.client_verify(), timeout=30) as http:
        world = World(server, http, tokens, principals, alpha_certificate, int(alpha_project["id"]))
        world.outbox = server.config.mailer.directory  # type: ignore[union-attr]
        # A pending invitation and recorded gateway calls of alpha (the dashboards list them).
        server.call(
            server.reg.invite(
                principals["alpha_security"], "pending@alpha.test", org=None, roles=["api_security"]
            )
        )
        server.call(
            server.reg.record_calls(
                [
                    CallRecord(
                        server.now(),
                        "cat",
                        principals[f"{org}_security"].org_id,
                        "payments",
                        "POST",
                        f"/tsapi/v1/payments/{org}-call",
                        401,
                        "signature_invalid",
                        f"{org} message",
                    )
                    for org in ("alpha", "bravo")
                ]
            )
        )
        world.set_link(world.alpha_project, True)
        world.alpha_markers.add(certs.fingerprint_sha256(alpha_certificate))
        yield world


# --- the authorisation matrix ------------------------------------------------------------------


@dataclass
class Call:
    path_params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    json: Any = None
    # Called after the request with whether the request was expected to succeed: checks that
    # an allowed change happened and a refused one left everything as it was.
    verify: Callable[[bool, httpx.Response], None] | None = None


@dataclass(frozen=True)
class Spec:
    expect: dict[str, int]  # status per member role; anonymous and bad tokens always get 401
    prepare: Callable[[World, str], Call]
    # Roles whose answer must show alpha's objects: the positive control for the rule that
    # bravo's answers never do.
    shows_alpha: frozenset[str] = frozenset()


def everyone(status: int) -> dict[str, int]:
    return dict.fromkeys(MEMBERS, status)


def only(ok: int, *allowed: str, others: int = 403, **special: int) -> dict[str, int]:
    expect = {role: ok if role in allowed else others for role in MEMBERS}
    expect.update(special)
    return expect


def plain(**query: str) -> Callable[[World, str], Call]:
    return lambda world, role: Call(query=dict(query))


ALPHA_SIDE = frozenset({"operator", "alpha_security", "alpha_developer"})


def _me(world: World, role: str) -> Call:
    def verify(ok: bool, response: httpx.Response) -> None:
        if ok:
            assert response.json()["email"] == EMAILS[role]
            assert response.json()["roles"] == [ROLE_NAMES[role]]

    return Call(verify=verify)


def _new_environment(world: World, role: str) -> Call:
    env_id = world.unique("env")

    def verify(ok: bool, response: httpx.Response) -> None:
        ids = {e["id"] for e in world.server.call(world.server.reg.list_environments())}
        assert (env_id in ids) is ok

    return Call(json={"id": env_id, "name": "Extra"}, verify=verify)


def _new_product(world: World, role: str) -> Call:
    product_id = world.unique("product")

    def verify(ok: bool, response: httpx.Response) -> None:
        ids = {p["id"] for p in world.server.call(world.server.reg.list_products())}
        assert (product_id in ids) is ok

    body = {"id": product_id, "name": "Extra", "path_prefix": f"/x/{product_id}", "upstream": "sandbox:x"}
    return Call(json=body, verify=verify)


def _new_org(world: World, role: str) -> Call:
    slug = world.unique("org")

    def verify(ok: bool, response: httpx.Response) -> None:
        slugs = {o["slug"] for o in world.server.call(world.server.reg.list_orgs(SYSTEM))}
        assert (slug in slugs) is ok

    return Call(json={"slug": slug}, verify=verify)


def _new_user(world: World, role: str) -> Call:
    # Everyone tries to add a user to alpha — an API Security user of bravo included.
    email = world.unique("new") + "@alpha.test"

    def verify(ok: bool, response: httpx.Response) -> None:
        emails = {u["email"] for u in world.server.call(world.server.reg.list_users(SYSTEM))}
        assert (email in emails) is ok

    return Call(json={"email": email, "organisation": "alpha", "roles": ["api_security"]}, verify=verify)


def _new_certificate(world: World, role: str) -> Call:
    own = "bravo" if role.startswith("bravo") else "alpha"
    certificate = self_signed(world.unique(f"{own}-uploaded"))
    fingerprint = certs.fingerprint_sha256(certificate)
    if own == "alpha":
        world.alpha_markers.add(fingerprint)

    def verify(ok: bool, response: httpx.Response) -> None:
        assert (fingerprint in world.active_fingerprints()) is ok
        if ok:
            assert response.json()["fingerprint"] == fingerprint
            assert response.json()["organisation"] == own

    return Call(
        json={"environment": "cat", "use": "mtls", "certificate": pem(certificate).decode()}, verify=verify
    )


def _new_csr(world: World, role: str) -> Call:
    own = "bravo" if role.startswith("bravo") else "alpha"
    key = ec_key()
    csr = certs.build_csr(key, f"/O=Test/CN={world.unique(f'{own}-requested')}")
    spki = keys.public_key_bytes(key)

    def verify(ok: bool, response: httpx.Response) -> None:
        mine = [c for c in world.server.certificates(env="prod") if c["organisation"] == own]
        issued = [
            c
            for c in mine
            if c["common_name"] == certs.common_name(csr.subject) and c["environment"] == "prod"
        ]
        assert bool(issued) is ok
        if ok:
            body = response.json()
            certificate = certs.load_certificate(body["certificate_pem"].encode())
            assert keys.public_key_bytes(certificate.public_key()) == spki  # type: ignore[arg-type]
            assert body["organisation"] == own
            assert body["chain_pem"] == pem(PROD_ISSUER.certificate).decode()
            if own == "alpha":
                world.alpha_markers.add(body["fingerprint"])

    return Call(
        json={"environment": "prod", "use": "mtls", "csr": certs.csr_pem(csr).decode()}, verify=verify
    )


def _alpha_certificate_pem(world: World, role: str) -> Call:
    def verify(ok: bool, response: httpx.Response) -> None:
        if ok:
            got = certs.load_certificate(response.json()["certificate_pem"].encode())
            assert got == world.alpha_certificate
            assert response.json()["chain_pem"] == ""  # self-signed: no chain

    return Call(path_params={"fingerprint": certs.fingerprint_sha256(world.alpha_certificate)}, verify=verify)


def _alpha_certificate(world: World, role: str) -> Call:
    def verify(ok: bool, response: httpx.Response) -> None:
        if ok:
            assert response.json()["fingerprint"] == certs.fingerprint_sha256(world.alpha_certificate)
            assert response.json()["organisation"] == "alpha"

    return Call(path_params={"fingerprint": certs.fingerprint_sha256(world.alpha_certificate)}, verify=verify)


def _remove_alpha_certificate(world: World, role: str) -> Call:
    fingerprint = certs.fingerprint_sha256(world.alpha_cert())

    def verify(ok: bool, response: httpx.Response) -> None:
        assert (fingerprint not in world.active_fingerprints()) is ok

    return Call(path_params={"fingerprint": fingerprint}, query={"env": "cat"}, verify=verify)


def _new_project(world: World, role: str) -> Call:
    own = "bravo" if role.startswith("bravo") else "alpha"
    name = world.unique(f"{own}-new-project")

    def verify(ok: bool, response: httpx.Response) -> None:
        names = {p["name"] for p in world.server.call(world.server.reg.list_projects(SYSTEM))}
        assert (name in names) is ok

    return Call(json={"name": name}, verify=verify)


def _delete_alpha_project(world: World, role: str) -> Call:
    project = world.alpha_new_project()

    def verify(ok: bool, response: httpx.Response) -> None:
        assert (project not in world.alpha_projects()) is ok

    return Call(path_params={"project": str(project)}, verify=verify)


def _alpha_project(world: World, role: str) -> Call:
    project = world.alpha_new_project(with_payments=True)

    def verify(ok: bool, response: httpx.Response) -> None:
        if ok:
            assert response.json() == world.alpha_projects()[project]
            assert response.json()["products"] == [{"product": "payments", "environment": "cat"}]

    return Call(path_params={"project": str(project)}, verify=verify)


def _link_alpha_project(world: World, role: str) -> Call:
    project = world.alpha_new_project()

    def verify(ok: bool, response: httpx.Response) -> None:
        links = world.alpha_projects()[project]["products"]
        assert (links == [{"product": "payments", "environment": "cat"}]) is ok
        if ok:  # the answer is the project as it now is
            assert response.json()["products"] == links

    return Call(path_params={"project": str(project), "env": "cat", "product": "payments"}, verify=verify)


def _unlink_alpha_project(world: World, role: str) -> Call:
    project = world.alpha_new_project(with_payments=True)

    def verify(ok: bool, response: httpx.Response) -> None:
        assert (world.alpha_projects()[project]["products"] == []) is ok
        if ok:
            assert response.json()["products"] == []

    return Call(path_params={"project": str(project), "env": "cat", "product": "payments"}, verify=verify)


def _new_token(world: World, role: str) -> Call:
    def verify(ok: bool, response: httpx.Response) -> None:
        if ok:
            token = response.json()["token"]
            assert world.token_works(token)

    return Call(json={"name": f"{role}-extra"}, verify=verify)


def _revoke_alpha_token(world: World, role: str) -> Call:
    token = world.server.call(
        world.server.reg.create_token(SYSTEM, "alpha-ci", for_email=EMAILS["alpha_security"])
    )
    listed = world.server.call(world.server.reg.list_tokens(world.principals["alpha_security"]))
    (token_id,) = [t["id"] for t in listed if token.startswith(t["prefix"]) and not t["revoked"]]

    def verify(ok: bool, response: httpx.Response) -> None:
        assert world.token_works(token) is not ok

    return Call(path_params={"token": str(token_id)}, verify=verify)


def _invite(world: World, role: str) -> Call:
    # Everyone tries to invite an API Security user to alpha.
    email = world.unique("invited") + "@alpha.test"

    def verify(ok: bool, response: httpx.Response) -> None:
        pending = {u["email"] for u in world.server.call(world.server.reg.list_invitations(SYSTEM))}
        assert (email in pending) is ok
        assert any(email in m["To"] for m in outbox(world.outbox)) is ok
        if ok:
            assert response.json()["roles"] == ["api_security"]

    return Call(json={"email": email, "organisation": "alpha", "roles": ["api_security"]}, verify=verify)


def _reset_alpha_second_factor(world: World, role: str) -> Call:
    email = world.unique("mfa") + "@alpha.test"
    world.server.add_user(email, org="alpha", roles="api_security")  # enrolled

    def verify(ok: bool, response: httpx.Response) -> None:
        (user,) = [u for u in world.server.call(world.server.reg.list_users(SYSTEM)) if u["email"] == email]
        assert user["second_factor"] is not ok

    return Call(path_params={"email": email}, verify=verify)


def _audit_verify(world: World, role: str) -> Call:
    def verify(ok: bool, response: httpx.Response) -> None:
        if ok:
            assert response.json()["ok"] is True

    return Call(verify=verify)


SPECS: dict[tuple[str, str], Spec] = {
    ("GET", "/api/v1/me"): Spec(everyone(200), _me, frozenset({"alpha_security", "alpha_developer"})),
    ("GET", "/api/v1/environments"): Spec(everyone(200), plain()),
    ("POST", "/api/v1/environments"): Spec(only(201, "operator"), _new_environment),
    ("GET", "/api/v1/products"): Spec(everyone(200), plain()),
    ("POST", "/api/v1/products"): Spec(only(201, "operator"), _new_product),
    ("GET", "/api/v1/organisations"): Spec(everyone(200), plain(), ALPHA_SIDE),
    ("POST", "/api/v1/organisations"): Spec(only(201, "operator"), _new_org),
    ("GET", "/api/v1/users"): Spec(everyone(200), plain(org="alpha"), ALPHA_SIDE),
    ("POST", "/api/v1/users"): Spec(only(201, "operator"), _new_user),
    ("GET", "/api/v1/certificates"): Spec(everyone(200), plain(org="alpha", include_removed="1"), ALPHA_SIDE),
    ("POST", "/api/v1/certificates"): Spec(only(201, "alpha_security", "bravo_security"), _new_certificate),
    ("GET", "/api/v1/certificates/{fingerprint}"): Spec(
        only(200, *ALPHA_SIDE, others=404), _alpha_certificate, ALPHA_SIDE
    ),
    ("POST", "/api/v1/certificates/requests"): Spec(only(201, "alpha_security", "bravo_security"), _new_csr),
    ("GET", "/api/v1/certificates/{fingerprint}/pem"): Spec(
        only(200, *ALPHA_SIDE, others=404), _alpha_certificate_pem, ALPHA_SIDE
    ),
    ("DELETE", "/api/v1/certificates/{fingerprint}"): Spec(
        only(200, "operator", "alpha_security", bravo_security=404), _remove_alpha_certificate
    ),
    ("GET", "/api/v1/projects"): Spec(everyone(200), plain(org="alpha"), ALPHA_SIDE),
    ("POST", "/api/v1/projects"): Spec(only(201, "alpha_developer", "bravo_developer"), _new_project),
    ("GET", "/api/v1/projects/{project}"): Spec(only(200, *ALPHA_SIDE, others=404), _alpha_project),
    ("DELETE", "/api/v1/projects/{project}"): Spec(
        only(200, "alpha_developer", bravo_developer=404), _delete_alpha_project
    ),
    ("PUT", "/api/v1/projects/{project}/products/{env}/{product}"): Spec(
        only(200, "alpha_developer", bravo_developer=404), _link_alpha_project
    ),
    ("DELETE", "/api/v1/projects/{project}/products/{env}/{product}"): Spec(
        only(200, "alpha_developer", bravo_developer=404), _unlink_alpha_project
    ),
    ("GET", "/api/v1/tokens"): Spec(everyone(200), plain(), frozenset({"alpha_security", "alpha_developer"})),
    ("POST", "/api/v1/tokens"): Spec(everyone(201), _new_token),
    # Tokens are personal: nobody else may revoke one, not even an operator.
    ("DELETE", "/api/v1/tokens/{token}"): Spec(only(200, "alpha_security", others=404), _revoke_alpha_token),
    ("GET", "/api/v1/audit"): Spec(everyone(200), plain(org="alpha", limit="1000"), ALPHA_SIDE),
    ("GET", "/api/v1/audit/verify"): Spec(only(200, "operator"), _audit_verify),
    ("GET", "/api/v1/invitations"): Spec(everyone(200), plain(org="alpha"), ALPHA_SIDE),
    # Roles never above the inviter's own; API Security users invite to their own organisation.
    ("POST", "/api/v1/invitations"): Spec(only(201, "operator", "alpha_security"), _invite),
    ("DELETE", "/api/v1/users/{email}/mfa"): Spec(only(200, "operator"), _reset_alpha_second_factor),
    # Organisation users see their own organisation's (?org= is for operators only).
    ("GET", "/api/v1/dashboard"): Spec(everyone(200), plain(env="cat", org="alpha"), ALPHA_SIDE),
    ("GET", "/api/v1/calls"): Spec(everyone(200), plain(env="cat", org="alpha"), ALPHA_SIDE),
    ("GET", "/api/v1/overview"): Spec(only(200, "operator"), plain()),
}


def test_the_matrix_covers_every_route_and_every_role() -> None:
    routes = {(r.method, r.path) for r in api.ROUTES}
    assert set(SPECS) == routes, (
        f"routes without expectations: {routes - set(SPECS)}; stale: {set(SPECS) - routes}"
    )
    for key, spec in SPECS.items():
        assert set(spec.expect) == set(MEMBERS), key


def test_the_app_serves_exactly_the_routes_in_the_table(server: PortalServer) -> None:
    """So that the matrix, generated from ROUTES, covers every API endpoint there is."""
    app = init_app(server.reg)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method != "HEAD"
    }
    assert served == {(r.method, r.path) for r in api.ROUTES} | {("GET", "/api/v1/openapi.json")}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route", api.ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_authorisation_matrix(world: World, route: api.Route, role: str) -> None:
    spec = SPECS.get((route.method, route.path))
    if spec is None:
        pytest.fail(f"no expectation for {route.method} {route.path}: add it to SPECS")
    expected = 401 if role in ("anonymous", "bad_token") else spec.expect[role]
    call = spec.prepare(world, role)
    path = route.path.format(**call.path_params)
    audit_before = world.server.audit_count()
    kwargs: dict[str, Any] = {"params": call.query, "headers": world.headers(role)}
    if call.json is not None:
        kwargs["json"] = call.json
    response = world.http.request(route.method, path, **kwargs)

    assert response.status_code == expected, (role, route.method, path, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    succeeded = 200 <= expected < 300
    if not succeeded:
        assert set(body) == {"error"}, body
        assert body["error"]["code"], body
        assert body["error"]["message"], body
        assert world.server.audit_count() == audit_before, "a refused call changed the audit log"
    if role in ("anonymous", "bad_token"):
        assert body["error"]["code"] in ("unauthenticated", "token_invalid")
    if call.verify is not None:
        call.verify(succeeded, response)
    if role.startswith("bravo"):
        leaked = [marker for marker in world.alpha_markers if marker in response.text]
        assert not leaked, f"bravo saw alpha's {leaked} in {response.text[:500]}"
    if role in spec.shows_alpha:
        assert "alpha" in response.text, "positive control: alpha's own objects should be listed here"


def test_lists_for_another_organisation_hide_every_alpha_object(world: World) -> None:
    """The matrix checks each answer for alpha's markers; here, the lists one by one, with
    the positive control alongside: alpha's own user sees what bravo must not."""
    alpha_fp = certs.fingerprint_sha256(world.alpha_certificate)
    lists = {
        "/api/v1/certificates": lambda rows: {r["fingerprint"] for r in rows},
        "/api/v1/projects": lambda rows: {r["name"] for r in rows},
        "/api/v1/users": lambda rows: {r["email"] for r in rows},
        "/api/v1/organisations": lambda rows: {r["slug"] for r in rows},
        "/api/v1/audit": lambda rows: {r["object_id"] for r in rows},
    }
    alpha_things = {
        "/api/v1/certificates": alpha_fp,
        "/api/v1/projects": "alpha-project",
        "/api/v1/users": EMAILS["alpha_security"],
        "/api/v1/organisations": "alpha",
        "/api/v1/audit": alpha_fp,
    }
    for path, pick in lists.items():
        query = {"org": "alpha", "limit": "1000"}
        mine = pick(world.http.get(path, params=query, headers=world.headers("alpha_security")).json())
        assert alpha_things[path] in mine, path
        for role in ("bravo_security", "bravo_developer"):
            theirs = pick(world.http.get(path, params=query, headers=world.headers(role)).json())
            assert theirs, f"{path}: bravo sees nothing at all, so the check proves nothing"
            assert alpha_things[path] not in theirs, (path, role)
            assert not [t for t in theirs if "alpha" in str(t)], (path, role, theirs)


def test_another_organisation_cannot_remove_a_certificate_and_learns_nothing(world: World) -> None:
    target = certs.fingerprint_sha256(world.alpha_certificate)
    missing = "ab" * 32
    refused = world.http.delete(
        f"/api/v1/certificates/{target}", params={"env": "cat"}, headers=world.headers("bravo_security")
    )
    unknown = world.http.delete(
        f"/api/v1/certificates/{missing}", params={"env": "cat"}, headers=world.headers("bravo_security")
    )
    assert refused.status_code == unknown.status_code == 404
    assert refused.json()["error"]["code"] == unknown.json()["error"]["code"] == "certificate_not_found"
    # The same answer as for a certificate that does not exist, but for the fingerprint echoed.
    assert refused.json()["error"]["message"].replace(target[:16], "X") == unknown.json()["error"][
        "message"
    ].replace(missing[:16], "X")
    assert target in world.active_fingerprints()


def test_another_organisation_cannot_take_over_a_common_name(world: World) -> None:
    """A CN belongs to one organisation per environment: bravo cannot register a
    certificate with alpha's CN (which would let it pass for alpha at the gateway)."""
    before = world.server.all_certificates()
    response = world.http.post(
        "/api/v1/certificates",
        json={"environment": "cat", "use": "mtls", "certificate": pem(self_signed("alpha-client")).decode()},
        headers=world.headers("bravo_security"),
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "cn_taken"
    assert world.server.all_certificates() == before


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
        pytest.param("Bearer", id="empty-bearer"),
        pytest.param("Bearer not-a-twofold-token", id="malformed"),
        pytest.param(f"Bearer {UNKNOWN_TOKEN}", id="unknown"),
    ],
)
def test_bad_credentials_get_a_json_401(world: World, authorization: str) -> None:
    response = world.http.get("/api/v1/certificates", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.json()["error"]["code"] in ("token_invalid", "unauthenticated")
    assert response.json()["error"]["message"]


def test_a_revoked_token_stops_working_at_once(world: World) -> None:
    created = world.http.post(
        "/api/v1/tokens", json={"name": "short-lived"}, headers=world.headers("alpha_developer")
    )
    token = created.json()["token"]
    assert world.token_works(token)
    listed = world.http.get("/api/v1/tokens", headers={"Authorization": f"Bearer {token}"}).json()
    (token_id,) = [t["id"] for t in listed if token.startswith(t["prefix"])]
    revoked = world.http.delete(f"/api/v1/tokens/{token_id}", headers={"Authorization": f"Bearer {token}"})
    assert revoked.status_code == 200
    response = world.http.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_invalid"


def test_the_api_ignores_session_cookies(server: PortalServer, world: World) -> None:
    """Cookies ride along with cross-site requests; the API takes bearer tokens only, so a
    signed-in browser cannot be made to call it (no CSRF on the API)."""
    server.add_user("cookie@alpha.test", org="alpha", roles="api_security")
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as browser:
        server.sign_in(browser, "cookie@alpha.test")
        assert browser.cookies.get("twofold_session")
        assert browser.get("/security").status_code == 200
        assert browser.get("/api/v1/me").status_code == 401
        upload = browser.post(
            "/api/v1/certificates",
            json={
                "environment": "cat",
                "use": "mtls",
                "certificate": pem(self_signed("alpha-cookie")).decode(),
            },
        )
        assert upload.status_code == 401
    assert not [c for c in server.certificates() if c["common_name"] == "alpha-cookie"]


def test_cookies_are_secure_and_sign_out_ends_the_session(server: PortalServer, world: World) -> None:
    server.add_user("cookies@alpha.test", org="alpha", roles="developer")
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as browser:
        login = browser.post("/login", data={"email": "cookies@alpha.test", "password": PASSWORD})
        assert login.status_code == 303
        session_cookie = login.headers["set-cookie"]
        for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
            assert attribute in session_cookie, session_cookie
        page = browser.get("/projects")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf
        created = browser.post(
            "/projects", data={"csrf_token": csrf.group(1), "name": "alpha-cookie-project"}
        )
        assert created.status_code == 303
        flash_cookie = created.headers["set-cookie"]
        assert flash_cookie.startswith("twofold_flash=")
        for attribute in ("Secure", "HttpOnly", "SameSite=Strict"):
            assert attribute in flash_cookie, flash_cookie
        cookie = browser.cookies["twofold_session"]
        out = browser.post("/logout", data={"csrf_token": csrf.group(1)})
        assert out.status_code == 303
        assert out.headers["location"] == "/login"
    # The old cookie is dead on the server, not only forgotten by the browser.
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as replay:
        replay.cookies.set("twofold_session", cookie)
        again = replay.get("/projects")
        assert again.status_code == 303
        assert again.headers["location"].startswith("/login")


@pytest.mark.parametrize(("site", "status"), [("cross-site", 403), ("same-site", 403), ("same-origin", 303)])
def test_sign_in_from_another_site_is_refused(
    server: PortalServer, world: World, site: str, status: int
) -> None:
    email = f"{site}@alpha.test"
    server.add_user(email, org="alpha", roles="developer")
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as browser:
        response = browser.post(
            "/login", data={"email": email, "password": PASSWORD}, headers={"Sec-Fetch-Site": site}
        )
        assert response.status_code == status
        assert bool(browser.cookies.get("twofold_session")) is (status == 303)
        if status == 403:
            assert "cross_site_login" in response.text


def test_password_checks_do_not_block_the_event_loop(
    server: PortalServer, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from twofold.registry import accounts as service

    threads: list[str] = []
    real = service.check_password

    def recording(stored: str | None, password: str) -> bool:
        threads.append(threading.current_thread().name)
        return real(stored, password)

    monkeypatch.setattr(service, "check_password", recording)
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as client:
        client.post("/login", data={"email": "nobody@alpha.test", "password": "wrong password"})
    assert threads, "the password check did not run at all"
    assert "twofold-portal" not in threads, "argon2 ran on the portal's event-loop thread"


async def test_concurrent_sign_in_attempts_cannot_outrun_the_rate_limit(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Attempts are counted before the (slow) password check: 60 at once get at most 5 checks
    for one account, and even the right password among them does not get in once the limit
    is reached."""
    import asyncio

    with PortalServer(tmp_path_factory.mktemp("portal-limit") / "registry.db") as own:
        own.add_org("alpha")
        own.add_user("target@alpha.test", org="alpha", roles="developer")
        async with httpx.AsyncClient(base_url=own.url, verify=own.client_verify(), timeout=60) as client:

            async def attempt(password: str) -> int:
                response = await client.post(
                    "/login", data={"email": "target@alpha.test", "password": password}
                )
                return response.status_code

            statuses = await asyncio.gather(
                *(attempt(f"wrong password {i}") for i in range(59)), attempt(PASSWORD)
            )
    assert statuses.count(401) + statuses.count(303) <= 5, statuses
    assert statuses.count(429) >= 55
    assert statuses[-1] in (429, 303)  # the right password got in only if it was among the first five


# --- bad uploads -------------------------------------------------------------------------------


def _p12(password: bytes | None) -> bytes:
    key = ec_key()
    certificate = certs.self_signed_certificate(key, "/CN=alpha-p12")
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(b"alpha", key, certificate, None, encryption)


def _private_key_pem() -> bytes:
    return keys.private_key_bytes(ec_key())


def _cert_and_key() -> bytes:
    key = ec_key()
    return pem(certs.self_signed_certificate(key, "/CN=alpha-with-key")) + keys.private_key_bytes(key)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


BAD_UPLOADS: dict[str, tuple[Callable[[], bytes], str, int, str]] = {
    # name: (file, environment, status, error code)
    "expired": (
        lambda: pem(raw_certificate("alpha-old", not_before=_now() - dt.timedelta(days=60), not_after=_now() - dt.timedelta(days=1))),
        "cat", 400, "certificate_expired",
    ),
    "not-yet-valid": (
        lambda: pem(raw_certificate("alpha-future", not_before=_now() + dt.timedelta(days=2), not_after=_now() + dt.timedelta(days=60))),
        "cat", 400, "certificate_not_yet_valid",
    ),
    "rsa-1024": (lambda: pem(raw_certificate("alpha-weak", key=rsa_key(1024))), "cat", 400, "key_too_small"),
    "sha1-signature": (lambda: pem(weak_hash_certificate("alpha-sha1", "SHA1")), "cat", 400, "weak_signature"),
    "md5-signature": (lambda: pem(weak_hash_certificate("alpha-md5", "MD5")), "cat", 400, "weak_signature"),
    "secp256k1-key": (
        lambda: pem(raw_certificate("alpha-k1", key=ec.generate_private_key(ec.SECP256K1()))),
        "cat", 400, "key_unsupported",
    ),
    "eku-serverauth-for-mtls": (
        lambda: pem(raw_certificate("alpha-server", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))),
        "cat", 400, "eku_missing_client_auth",
    ),
    "no-common-name": (
        lambda: pem(raw_certificate("", name=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Alpha")]))),
        "cat", 400, "no_common_name",
    ),
    "self-signed-in-prod": (lambda: pem(self_signed("alpha-prod-self")), "prod", 400, "self_signed_not_allowed"),
    "foreign-ca-in-prod": (
        lambda: pem(LocalCA("some other CA").issue("alpha-prod-foreign").certificate),
        "prod", 400, "untrusted_issuer",
    ),
    "private-key-pem": (_private_key_pem, "cat", 400, "private_key_uploaded"),
    "private-key-der": (lambda: keys.private_key_bytes(ec_key(), der=True), "cat", 400, "private_key_uploaded"),
    "certificate-plus-its-key": (_cert_and_key, "cat", 400, "private_key_uploaded"),
    "pkcs12": (lambda: _p12(None), "cat", 400, "private_key_uploaded"),
    "pkcs12-encrypted": (lambda: _p12(b"secret"), "cat", 400, "private_key_uploaded"),
    "chain-of-pem-certificates": (
        lambda: pem(self_signed("alpha-leaf")) + pem(self_signed("alpha-intermediate")) + pem(self_signed("alpha-root")),
        "cat", 400, "certificate_chain",
    ),
    "csr": (lambda: certs.csr_pem(certs.build_csr(ec_key(), "/CN=alpha-csr")), "cat", 400, "not_a_certificate"),
    "empty-file": (lambda: b"", "cat", 400, "empty_file"),
    "whitespace-only": (lambda: b" \r\n\t\n", "cat", 400, "empty_file"),
    "garbage-text": (lambda: b"this is not a certificate, honestly\n", "cat", 400, "not_a_certificate"),
    "garbage-bytes": (lambda: os.urandom(2048), "cat", 400, "not_a_certificate"),
    "200-kb-of-garbage": (lambda: os.urandom(200 * 1024), "cat", 413, "file_too_large"),
    "10-mb-of-random-bytes": (lambda: os.urandom(10 * 1024 * 1024), "cat", 413, "file_too_large"),
}  # fmt: skip


def _registry_state(world: World) -> tuple[list[dict[str, Any]], int]:
    return world.server.all_certificates(), world.server.audit_count()


@pytest.mark.parametrize("how", ["multipart", "json"])
@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_bad_upload_is_refused_and_changes_nothing(
    world: World, name: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, env, status, code = BAD_UPLOADS[name]
    data = make()
    if how == "json" and status == 413 and len(data) > 1024 * 1024:
        data = data[: 700 * 1024]  # base64 would push it over the body limit: test the registry's own
    before = _registry_state(world)
    headers = world.headers("alpha_security")
    caplog.set_level(logging.DEBUG)
    try:
        if how == "multipart":
            response = world.http.post(
                "/api/v1/certificates",
                data={"environment": env, "use": "mtls"},
                files={"file": (f"{name}.pem", data, "application/octet-stream")},
                headers=headers,
            )
        else:
            import base64

            response = world.http.post(
                "/api/v1/certificates",
                json={"environment": env, "use": "mtls", "certificate_der": base64.b64encode(data).decode()},
                headers=headers,
            )
    except httpx.TransportError as exc:  # pragma: no cover - would mean the server hung up mid-upload
        pytest.fail(f"the server dropped the connection instead of answering: {exc!r}")
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert len(error["message"]) > 20, error
    assert _registry_state(world) == before
    if code == "private_key_uploaded":
        assert "treat this key as exposed" in error["message"]
        # Nothing of the key is echoed back or logged.
        body = "".join(data.decode("latin-1").split("\n")[1:3]) if data.startswith(b"-----") else ""
        for text in (response.text, caplog.text):
            assert "PRIVATE KEY-----" not in text
            if body:
                assert body[:40] not in text


def test_a_good_upload_after_all_refusals_still_works(world: World) -> None:
    """The refusals above did not wedge anything: the same caller can still register."""
    certificate = self_signed(world.unique("alpha-after-refusals"))
    response = world.http.post(
        "/api/v1/certificates",
        data={"environment": "cat", "use": "mtls"},
        files={"file": ("ok.crt", certs.certificate_der(certificate), "application/pkix-cert")},
        headers=world.headers("alpha_security"),
    )
    assert response.status_code == 201, response.text
    assert response.json()["fingerprint"] == certs.fingerprint_sha256(certificate)
    world.alpha_markers.add(certs.fingerprint_sha256(certificate))


def test_rule_refusals_leave_the_registry_unchanged(world: World) -> None:
    """Duplicate, reused key, a third certificate for one CN, a third signature certificate."""
    who = world.principals["alpha_security"]
    key = ec_key()
    first = certs.self_signed_certificate(key, f"/CN={world.unique('alpha-rules')}")
    world.server.register(who, "cat", "mtls", first)
    same_key = certs.self_signed_certificate(key, f"/CN={world.unique('alpha-rules')}")
    cn = world.unique("alpha-pair")
    world.server.register(who, "cat", "mtls", self_signed(cn))
    world.server.register(who, "cat", "mtls", self_signed(cn))
    sig_env = world.unique("sigenv")
    world.server.call(world.server.reg.save_environment(SYSTEM, sig_env, allow_self_signed=True))
    for _ in range(2):
        world.server.register(
            who, sig_env, "signature", self_signed(world.unique("alpha-sig"), usage="signature")
        )
    cases = [
        ("cat", "mtls", first, "certificate_duplicate"),
        ("cat", "mtls", same_key, "public_key_reused"),
        ("cat", "mtls", self_signed(cn), "mtls_cn_limit"),
        (sig_env, "signature", self_signed(world.unique("alpha-sig"), usage="signature"), "signature_limit"),
    ]
    for env, use, certificate, code in cases:
        before = _registry_state(world)
        response = world.http.post(
            "/api/v1/certificates",
            json={"environment": env, "use": use, "certificate": pem(certificate).decode()},
            headers=world.headers("alpha_security"),
        )
        assert response.status_code == 409, (code, response.text)
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["message"]
        assert _registry_state(world) == before, code


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({"environment": "nowhere", "use": "mtls"}, "environment_not_found", id="unknown-env"),
        pytest.param({"environment": "cat", "use": "tls"}, "use_invalid", id="unknown-use"),
        pytest.param({"use": "mtls"}, "field_missing", id="no-environment"),
        pytest.param({"environment": "cat", "use": 7}, "field_invalid", id="use-not-a-string"),
        pytest.param(
            {"environment": "cat", "use": "mtls", "certificate_der": "%%%"}, "field_invalid", id="bad-base64"
        ),
    ],
)
def test_upload_fields_are_checked(world: World, body: dict[str, Any], code: str) -> None:
    body = {"certificate": pem(self_signed(world.unique("alpha-fields"))).decode(), **body}
    before = _registry_state(world)
    response = world.http.post("/api/v1/certificates", json=body, headers=world.headers("alpha_security"))
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["code"] == code
    assert _registry_state(world) == before


# --- OpenAPI -----------------------------------------------------------------------------------


def test_openapi_document_is_valid_and_complete(world: World) -> None:
    from openapi_spec_validator import validate

    response = world.http.get("/api/v1/openapi.json")  # public: no token needed
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    validate(document)  # raises on anything that is not valid OpenAPI 3
    assert document["openapi"].startswith("3.")
    described = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert described == {(r.method, r.path) for r in api.ROUTES}
    operation_ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)
            assert op["security"] == [{"token": []}]
            assert {"401", "403"} <= set(op["responses"])
            success = "201" if method == "post" else "200"
            assert success in op["responses"], (method, path)


# --- errors: never a stack trace, always JSON under /api/ --------------------------------------

TRACE = re.compile(r"Traceback|File \"|line \d+, in|twofold/|site-packages")


def _signed_in(server: PortalServer, email: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=server.url, verify=server.client_verify())
    return client, server.sign_in(client, email)


@pytest.fixture(scope="module")
def developer_session(server: PortalServer, world: World) -> Iterator[tuple[httpx.Client, str]]:
    server.add_user("pages@alpha.test", org="alpha", roles="developer,api_security")
    client, csrf = _signed_in(server, "pages@alpha.test")
    yield client, csrf
    client.close()


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        ("POST", "/projects/abc/delete", 404, "no such project"),
        ("POST", "/projects/999999/delete", 404, "no project 999999"),
        ("POST", "/projects/abc/products", 404, "no such project"),
        ("POST", "/tokens/abc/revoke", 404, "no such token"),
        ("POST", "/tokens/999999/revoke", 404, "no such token"),
        ("GET", "/no/such/page", 404, "no such page"),
        ("GET", "/logout", 405, "method not allowed"),
        ("POST", "/security/certificates/remove", 404, "no active certificate"),
    ],
)
def test_page_errors_are_pages_without_stack_traces(
    developer_session: tuple[httpx.Client, str], method: str, path: str, status: int, says: str
) -> None:
    client, csrf = developer_session
    data = {"csrf_token": csrf, "environment": "cat", "fingerprint": "00" * 32}
    response = client.request(method, path, data=data if method == "POST" else None)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert says[:1].upper() + says[1:] in response.text  # a sentence on a page
    assert not TRACE.search(response.text), response.text[:1000]


def test_page_forms_need_the_session_csrf_token(
    server: PortalServer, developer_session: tuple[httpx.Client, str]
) -> None:
    client, csrf = developer_session
    other, other_csrf = _signed_in(server, "pages@alpha.test")  # a second session of the same user
    other.close()
    for token in ("", "forged", other_csrf):
        before = server.all_certificates()
        response = client.post(
            "/security/certificates",
            data={"csrf_token": token, "environment": "cat", "use": "mtls"},
            files={"file": ("a.pem", pem(self_signed("alpha-csrf")))},
        )
        assert response.status_code == 403
        assert "csrf_failed" in response.text
        assert server.all_certificates() == before
    assert csrf != other_csrf


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/api/v1/nope", {}, 404, "not_found"),
        ("GET", "/api/v2/me", {}, 404, "not_found"),
        ("POST", "/api/v1/me", {}, 405, "method_not_allowed"),
        ("POST", "/api/v1/projects", {"content": b"{not json"}, 400, "bad_json"),
        ("POST", "/api/v1/projects", {"json": ["a", "list"]}, 400, "bad_json"),
        ("POST", "/api/v1/projects", {"json": {}}, 400, "field_missing"),
        ("POST", "/api/v1/projects", {"json": {"name": 42}}, 400, "field_invalid"),
        ("POST", "/api/v1/projects", {"content": b"\xff\xfe\x00bad"}, 400, "bad_json"),
        ("DELETE", "/api/v1/projects/abc", {}, 400, "field_invalid"),
        ("PUT", "/api/v1/projects/999999/products/cat/payments", {}, 404, "project_not_found"),
        ("DELETE", "/api/v1/tokens/abc", {}, 400, "field_invalid"),
        ("GET", "/api/v1/audit?limit=lots", {}, 400, "field_invalid"),
        ("DELETE", "/api/v1/certificates/abcdef", {}, 400, "field_missing"),
        ("GET", "/api/v1/certificates?env=nowhere", {}, 404, "environment_not_found"),
        ("POST", "/api/v1/projects", {"content": b"x" * (2 * 1024 * 1024)}, 413, "file_too_large"),
    ],
)
def test_api_errors_are_json(
    world: World, method: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = world.http.request(method, path, headers=world.headers("alpha_developer"), **kwargs)
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert not TRACE.search(response.text)


def test_unexpected_failures_show_no_details(
    world: World, developer_session: tuple[httpx.Client, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(world.server.reg, "list_projects", broken)
    client, _ = developer_session
    page = client.get("/projects")
    assert page.status_code == 500
    assert "hunter2" not in page.text
    assert not TRACE.search(page.text)
    assert "went wrong" in page.text
    response = world.http.get("/api/v1/projects", headers=world.headers("alpha_developer"))
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "something went wrong on our side; it has been logged"}
    }


@pytest.fixture(scope="module")
def redirect_user(server: PortalServer, world: World) -> str:
    server.add_user("redirect@alpha.test", org="alpha", roles="developer")
    return "redirect@alpha.test"


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "/\\evil.example/",
        "/\t/evil.example/",
        "/\n/evil.example/",
        "https://evil.example/",
        "javascript:alert(1)",
        "evil",
    ],
)
def test_sign_in_never_redirects_off_the_portal(
    server: PortalServer, redirect_user: str, target: str
) -> None:
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as client:
        response = client.post("/login", data={"email": redirect_user, "password": PASSWORD, "next": target})
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_sign_in_keeps_a_local_next_page(server: PortalServer, redirect_user: str) -> None:
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as client:
        response = client.post(
            "/login", data={"email": redirect_user, "password": PASSWORD, "next": "/projects?x=1"}
        )
    assert response.status_code == 303
    assert response.headers["location"] == "/projects?x=1"


def test_a_one_time_password_opens_only_the_change_password_page(server: PortalServer) -> None:
    """Operators hand out generated passwords: the first sign-in leads to choosing one's own —
    the new one twice, not the one-time one again — and nothing else is reachable until then;
    the session goes on afterwards, and only the new password signs in."""
    server.add_org("onetime")
    server.call(
        server.reg.add_user(
            SYSTEM, "new@onetime.test", org="onetime", roles="api_security", password=PASSWORD, one_time=True
        )
    )
    new_password = PASSWORD + " but mine"
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as browser:
        login = browser.post("/login", data={"email": "new@onetime.test", "password": PASSWORD})
        assert login.status_code == 303
        assert browser.get("/security").headers["location"] == "/account/password"
        page = browser.get("/account/password")
        assert page.status_code == 200
        assert "one-time password" in page.text
        assert 'name="current_password"' not in page.text  # it was just typed: not asked again
        assert 'href="/security"' not in page.text  # no menu to pages that are not reachable yet
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        form = {"csrf_token": csrf.group(1)}
        mismatch = browser.post(
            "/account/password",
            data={**form, "new_password": new_password, "confirm_password": new_password + "x"},
        )
        assert mismatch.status_code == 400
        assert "password_mismatch" in mismatch.text
        same = browser.post(
            "/account/password", data={**form, "new_password": PASSWORD, "confirm_password": PASSWORD}
        )
        assert same.status_code == 400
        assert "not the one-time password" in same.text
        changed = browser.post(
            "/account/password", data={**form, "new_password": new_password, "confirm_password": new_password}
        )
        assert changed.status_code == 303
        assert changed.headers["location"] == "/"
        # Still signed in, no longer held at the password page: next, an API Security user sets
        # up the second factor.
        assert browser.get("/security").headers["location"] == "/account/mfa"
        # Now it is an ordinary password: changing it again needs the current one.
        page = browser.get("/account/password")
        assert 'name="current_password"' in page.text
    with httpx.Client(base_url=server.url, verify=server.client_verify()) as browser:
        assert (
            browser.post("/login", data={"email": "new@onetime.test", "password": PASSWORD}).status_code
            == 401
        )
        assert (
            browser.post("/login", data={"email": "new@onetime.test", "password": new_password}).status_code
            == 303
        )
        # No longer held at the password page: next, API Security users set up a second factor.
        assert browser.get("/security").headers["location"] == "/account/mfa"
