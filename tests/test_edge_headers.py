"""The TLS edges' certificate headers read one by one, as each edge writes them — and Envoy's
above all: Envoy cannot be installed from the package registries this project uses (Debian,
PyPI, npm), so its ``x-forwarded-client-cert`` is tested here in the forms Envoy's
documentation gives, and its configuration only as YAML of the right shape."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path

import pytest
import yaml

from twofold.crypto import certs, keys
from twofold.edge_config import Plan, Site, render
from twofold.gateway.edge import EDGES, HeaderError, edge_facts, envoy_certificate, parse_proxies, xfcc_fields
from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.pipeline import GatewayError, identify
from twofold.gateway.snapshot import Snapshot


@pytest.fixture(scope="module")
def cert() -> tuple[bytes, str, str]:
    key = keys.generate_private_key("ec", curve="P-256")
    certificate = certs.self_signed_certificate(key, "/O=Acme/CN=acme-edge")
    return (
        certs.certificate_der(certificate),
        certs.certificate_pem(certificate).decode(),
        certs.fingerprint_sha256(certificate),
    )


def head(*headers: tuple[str, str]) -> RequestHead:
    return RequestHead.parse_target("GET", "/accessapi/balance", "", list(headers))


def facts(edge: str, *headers: tuple[str, str], trusted: bool = True, peer: str = "unix") -> ConnectionFacts:
    return edge_facts(EDGES[edge], "cat", peer, trusted, head(*headers))


def test_nginx_escaped_pem(cert: tuple[bytes, str, str]) -> None:
    der, pem, fp = cert
    got = facts("nginx", ("X-SSL-Client-Cert", urllib.parse.quote(pem)), ("X-Forwarded-For", "203.0.113.9"))
    assert (got.certificate_der, got.fingerprint, got.via, got.client_address) == (
        der,
        fp,
        "nginx",
        "203.0.113.9",
    )
    assert got.problem is None
    empty = facts("nginx", ("X-SSL-Client-Cert", ""))  # nginx without a client certificate
    assert (empty.fingerprint, empty.problem) == (None, None)


def test_rfc9440_client_cert(cert: tuple[bytes, str, str]) -> None:
    der, _pem, fp = cert
    got = facts("haproxy", ("client-cert", f":{base64.b64encode(der).decode()}:"))
    assert (got.certificate_der, got.fingerprint) == (der, fp)
    for bad in (base64.b64encode(der).decode(), ":not base64!:", "::x"):
        refused = facts("haproxy", ("Client-Cert", bad))
        assert refused.problem is not None
        assert refused.problem[:2] == (
            "client_certificate_header_invalid",
            400,
        )


def test_envoy_xfcc_as_envoy_sends_it(cert: tuple[bytes, str, str]) -> None:
    der, pem, fp = cert
    quoted = urllib.parse.quote(pem, safe="")
    forms = [
        f'By=spiffe://bank.example/twofold;Hash={fp};Cert="{quoted}";Subject="O=Acme,CN=acme-edge";URI=',
        f"Hash={fp.upper()};Cert={quoted}",
        f'Cert="{quoted}"',
    ]
    for value in forms:
        got = facts("envoy", ("x-forwarded-client-cert", value), ("X-Forwarded-For", "198.51.100.1,10.0.0.2"))
        assert (got.certificate_der, got.fingerprint, got.problem) == (der, fp, None), value
        assert got.client_address == "10.0.0.2"  # Envoy appends the address it saw: the last one
    hash_only = facts("envoy", ("x-forwarded-client-cert", f"Hash={fp}"))
    assert (hash_only.certificate_der, hash_only.fingerprint) == (None, fp)


def test_envoy_xfcc_refusals(cert: tuple[bytes, str, str]) -> None:
    _der, pem, fp = cert
    quoted = urllib.parse.quote(pem, safe="")
    other = "0" * 64
    for value, why in [
        (f'Hash={other};Cert="{quoted}"', "is not the SHA-256"),
        (f"Hash={fp},Hash={fp}", "more than one element"),  # appended by a proxy chain
        ('Cert="unterminated', "not closed"),
        ("Hash=xyz", "not a hex SHA-256"),
        (f"Hash={fp};Hash={other}", "appears twice"),
    ]:
        with pytest.raises(HeaderError, match=why):
            envoy_certificate(value)
    assert xfcc_fields('By=a;Subject="CN=x\\"y;z"') == {"by": "a", "subject": 'CN=x"y;z'}


def test_the_header_from_a_peer_that_is_not_the_edge_is_ignored_and_the_request_refused(
    cert: tuple[bytes, str, str],
) -> None:
    der, _pem, _fp = cert
    snapshot = Snapshot(1, {}, {"cat": {}}, {}, {}, ())
    got = facts(
        "haproxy", ("Client-Cert", f":{base64.b64encode(der).decode()}:"), trusted=False, peer="192.0.2.7"
    )
    assert (got.certificate_der, got.fingerprint, got.client_address) == (None, None, "192.0.2.7")
    with pytest.raises(GatewayError) as refused:
        identify(snapshot, got)
    assert (refused.value.code, refused.value.status) == ("client_certificate_required", 401)
    assert "192.0.2.7 is not a configured TLS edge" in refused.value.message
    twice = facts("haproxy", ("Client-Cert", ":AA==:"), ("Client-Cert", ":AA==:"))
    assert twice.problem is not None
    assert twice.problem[0] == "client_certificate_header_invalid"


def test_proxies_are_addresses_or_networks() -> None:
    assert [str(n) for n in parse_proxies(["10.0.0.7", "10.1.0.0/16", "::1"])] == [
        "10.0.0.7/32",
        "10.1.0.0/16",
        "::1/128",
    ]
    with pytest.raises(ValueError, match="not an IP address"):
        parse_proxies(["edge.internal"])


def test_the_envoy_configuration_is_yaml_of_envoys_shape(tmp_path: Path) -> None:
    plan = Plan(
        "envoy",
        (Site("cat", 8443, (str(tmp_path / "cat-0.sock"), str(tmp_path / "cat-1.sock"))),),
        "0.0.0.0",
        tmp_path / "server.crt",
        tmp_path / "server.key",
        tmp_path / "ca.crt",
        tmp_path,
    )
    config = yaml.safe_load(render(plan))
    [listener] = config["static_resources"]["listeners"]
    chain = listener["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is False
    assert tls["disable_stateless_session_resumption"] is True
    assert tls["common_tls_context"]["validation_context"]["trust_chain_verification"] == "ACCEPT_UNTRUSTED"
    assert tls["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    manager = chain["filters"][0]["typed_config"]
    assert manager["forward_client_cert_details"] == "SANITIZE_SET"
    assert manager["set_current_client_cert_details"] == {"cert": True}
    [cluster] = config["static_resources"]["clusters"]
    pipes = [
        e["endpoint"]["address"]["pipe"]["path"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert pipes == [str(tmp_path / "cat-0.sock"), str(tmp_path / "cat-1.sock")]
