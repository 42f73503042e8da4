"""`twofold serve --edge` behind the real nginx and HAProxy from Debian, each run with the
configuration `twofold edge config` prints: mTLS at the edge, the client certificate in the
edge's header, the same pipeline behind it (a registered certificate passes, an unregistered
one or none gets twofold's JSON 401, a removal is refused on an open keep-alive connection
within a second), and the header honoured only from the edge — a spoofed one from any other
peer is refused and reaches no upstream."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

import twofold
from conftest import require_binary
from gatewaykit import PROPAGATION, Pair, ec_pair, free_port, rsa_pair, wait_until
from servekit import TWOFOLD, Member, Served, serving, stop_group
from twofold.crypto import certs


@dataclass
class Edge:
    served: Served
    member: Member
    clients: Path  # acme's credentials: mtls.crt/key (EC), sign.crt/key (RSA)
    port: int  # where the edge listens for environment cat
    work: Path

    def client(self, name: str = "mtls", **kwargs: object) -> twofold.Client:
        cert = (self.clients / f"{name}.crt") if name else None
        key = (self.clients / f"{name}.key") if name else None
        return twofold.Client(
            f"https://localhost:{self.port}",
            cert=cert,
            key=key,
            verify=str(self.served.ca),
            timeout=10,
            **kwargs,
        )

    @property
    def fingerprint(self) -> str:
        return certs.fingerprint_sha256(certs.load_certificate((self.clients / "mtls.crt").read_bytes()))


def edge_config(served: Served, name: str, *args: str) -> str:
    done = subprocess.run(
        [
            TWOFOLD,
            "edge",
            "config",
            name,
            "--config",
            str(served.proc.work / "twofold.toml"),
            "--data",
            str(served.data),
            "--listen",
            "127.0.0.1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextlib.contextmanager
def running(command: list[str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{command[0]} exited ({process.returncode}):\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(up, 20, 0.05)
        yield process
    finally:
        stop_group(process, 10)


def register(served: Served, member: Member, use: str, pair: Pair, env: str = "cat") -> None:
    """Through the portal's API, as the organisation's API Security user does."""
    with served.api(member.token) as api:
        added = api.post(
            "/api/v1/certificates", json={"environment": env, "use": use, "certificate": pair.pem}
        )
    assert added.status_code == 201, added.text


def _site(served: Served, work: Path) -> tuple[Member, Path]:
    member = served.member("acme", {"cat": ["balance", "echo"]})
    clients = work / "acme"
    register(served, member, "mtls", ec_pair(clients, "mtls", "acme-cat"))
    register(served, member, "signature", rsa_pair(clients, "sign", "acme-cat-sign"))
    served.sync()
    return member, clients


@pytest.fixture(scope="module")
def nginx_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    nginx = require_binary("nginx")
    work = tmp_path_factory.mktemp("edge-nginx")
    with serving(work, 'edge = "nginx"') as served:
        member, clients = _site(served, work)
        run = work / "nginx"
        run.mkdir()
        conf = run / "nginx.conf"
        conf.write_text(edge_config(served, "nginx", "--run-dir", str(run), "--user", "root"))
        command = [nginx, "-p", str(run), "-c", str(conf), "-e", str(run / "error.log"), "-g", "daemon off;"]
        with running(command, run / "stdout.log", served.ports["cat"]):
            yield Edge(served, member, clients, served.ports["cat"], work)


@pytest.fixture(scope="module")
def haproxy_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """twofold on ports for HAProxy (``edge_proxies``): the header is honoured from 127.0.0.1."""
    haproxy = require_binary("haproxy")
    work = tmp_path_factory.mktemp("edge-haproxy")
    with serving(work, 'edge = "haproxy"\nedge_proxies = ["127.0.0.1"]') as served:
        member, clients = _site(served, work)
        run = work / "haproxy"
        run.mkdir()
        pem = run / "twofold.pem"
        tls = served.data / "tls"
        pem.write_bytes((tls / "server.crt").read_bytes() + (tls / "server.key").read_bytes())
        public = free_port()
        conf = run / "haproxy.cfg"
        conf.write_text(
            edge_config(
                served,
                "haproxy",
                "--run-dir",
                str(run),
                "--pem",
                str(pem),
                "--port",
                f"cat={public}",
                "--port",
                f"prod={free_port()}",
            )
        )
        check = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        with running([haproxy, "-db", "-f", str(conf)], run / "haproxy.log", public):
            yield Edge(served, member, clients, public, work)


EDGES = ["nginx_edge", "haproxy_edge"]


def _error(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return str(response.json()["error"]["code"])


@pytest.mark.parametrize("which", EDGES)
def test_a_registered_certificate_passes_the_edge_and_its_signed_body_is_verified(
    which: str, request: pytest.FixtureRequest
) -> None:
    edge: Edge = request.getfixturevalue(which)
    with edge.client() as client:
        balance = client.get("/accessapi/balance")
        assert balance.status_code == 200, balance.text
    sign = edge.clients / "sign.key"
    with edge.client(signing_key=sign, signing_cert=edge.clients / "sign.crt") as client:
        echoed = client.post("/echo", json={"amount": "12.50"})
        assert echoed.status_code == 200, echoed.text
    seen = echoed.json()
    assert seen["body"] == {"amount": "12.50"}  # the verified payload
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["x-twofold-organisation"] == "acme"
    assert headers["x-twofold-client-cert-sha256"] == edge.fingerprint
    assert "x-twofold-signature-cert-sha256" in headers
    assert headers["x-forwarded-for"] == "127.0.0.1"  # the client's address, as the edge saw it
    assert not headers.keys() & {"x-ssl-client-cert", "client-cert", "x-forwarded-client-cert"}
    assert "Traceback" not in edge.served.proc.log()


@pytest.mark.parametrize("which", EDGES)
def test_curl_through_the_edge_as_bank_docs_show(
    which: str, request: pytest.FixtureRequest, curl: str
) -> None:
    edge: Edge = request.getfixturevalue(which)
    done = subprocess.run(
        [
            curl,
            "-sS",
            "--cacert",
            str(edge.served.ca),
            "--cert",
            str(edge.clients / "mtls.crt"),
            "--key",
            str(edge.clients / "mtls.key"),
            f"https://localhost:{edge.port}/accessapi/balance",
            "-w",
            "\n%{http_code}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", done.stdout + done.stderr
    assert json.loads(body)["accountBalances"][0]["accountId"] == "ACME-000123456789"


@pytest.mark.parametrize("which", EDGES)
def test_no_or_an_unregistered_certificate_gets_twofolds_json_401_not_a_tls_reset(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    edge: Edge = request.getfixturevalue(which)
    with edge.client(name="") as client:
        none = client.get("/accessapi/balance")
    assert (none.status_code, _error(none)) == (401, "client_certificate_required")
    assert "forwarded no client certificate" in none.json()["error"]["message"]
    pair = ec_pair(tmp_path, "mtls", "stranger")
    stranger = twofold.Client(
        f"https://localhost:{edge.port}",
        cert=pair.cert_path,
        key=pair.key_path,
        verify=str(edge.served.ca),
        timeout=10,
    )
    with stranger:
        refused = stranger.get("/accessapi/balance")
    assert (refused.status_code, _error(refused)) == (401, "certificate_not_registered")


@pytest.mark.parametrize("which", EDGES)
def test_a_certificate_header_sent_by_the_client_is_replaced_by_the_edge(
    which: str, request: pytest.FixtureRequest
) -> None:
    """A client without a certificate claims acme's in every header spelling: the edge sets
    its own (empty), so twofold sees no certificate."""
    edge: Edge = request.getfixturevalue(which)
    der = certs.certificate_der(certs.load_certificate((edge.clients / "mtls.crt").read_bytes()))
    pem = (edge.clients / "mtls.crt").read_text()
    spoofed = {
        "X-SSL-Client-Cert": urllib.parse.quote(pem),
        "Client-Cert": f":{base64.b64encode(der).decode()}:",
        "X-Forwarded-Client-Cert": f'Hash={edge.fingerprint};Cert="{urllib.parse.quote(pem)}"',
    }
    with edge.client(name="") as client:
        refused = client.get("/accessapi/balance", headers=spoofed)
    assert (refused.status_code, _error(refused)) == (401, "client_certificate_required")


@pytest.mark.parametrize("which", EDGES)
def test_a_removed_certificate_is_refused_on_an_open_keep_alive_connection_within_a_second(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    edge: Edge = request.getfixturevalue(which)
    served = edge.served
    pair = ec_pair(tmp_path, "mtls", f"acme-{which.split('_')[0]}-removed")
    register(served, edge.member, "mtls", pair)
    served.sync()
    client = twofold.Client(
        f"https://localhost:{edge.port}",
        cert=pair.cert_path,
        key=pair.key_path,
        verify=str(served.ca),
        timeout=10,
    )
    with client:
        assert client.get("/accessapi/balance").status_code == 200
        with served.api(edge.member.token) as api:
            removed = api.delete(f"/api/v1/certificates/{pair.fingerprint}", params={"env": "cat"})
            assert removed.status_code == 200, removed.text
        started = time.monotonic()
        wait_until(lambda: client.get("/accessapi/balance").status_code == 401, PROPAGATION * 2)
        assert time.monotonic() - started <= PROPAGATION
        refused = client.get("/accessapi/balance")
        assert _error(refused) == "certificate_not_registered"


# --- the header honoured from the edge only ----------------------------------------------------


def _raw_get(port: int, source: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(
            f"GET /accessapi/balance HTTP/1.1\r\nHost: localhost\r\n{lines}Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_spoofed_certificate_header_from_a_peer_that_is_not_the_edge_is_refused(haproxy_edge: Edge) -> None:
    """twofold listens on a port for HAProxy at 127.0.0.1; a peer at 127.0.0.2 — anyone who can
    reach that port — sends acme's registered certificate in the very header HAProxy uses:
    it is ignored, the request refused, nothing forwarded. The same header from 127.0.0.1 is
    honoured (the only difference is the peer's address)."""
    edge = haproxy_edge
    der = certs.certificate_der(certs.load_certificate((edge.clients / "mtls.crt").read_bytes()))
    header = {"Client-Cert": f":{base64.b64encode(der).decode()}:"}
    twofold_port = edge.served.ports["cat"]
    status, body = _raw_get(twofold_port, "127.0.0.2", header)
    assert status == 401
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == "client_certificate_required"
    assert "127.0.0.2 is not a configured TLS edge" in str(error["message"])
    status, body = _raw_get(twofold_port, "127.0.0.1", header)
    assert status == 200, body


def test_the_edge_sockets_let_only_their_owner_and_group_connect(nginx_edge: Edge) -> None:
    sockets = sorted((nginx_edge.served.data / "edge").glob("*.sock"))
    assert [s.name for s in sockets] == ["cat-0.sock", "prod-0.sock"]
    for path in sockets:
        assert path.stat().st_mode & 0o777 == 0o660
    assert (nginx_edge.served.data / "edge").stat().st_mode & 0o777 == 0o750


def test_edge_config_prints_envoy_for_this_node_and_says_what_is_missing(
    nginx_edge: Edge, haproxy_edge: Edge
) -> None:
    envoy = yaml.safe_load(edge_config(nginx_edge.served, "envoy"))
    [cluster, _prod] = envoy["static_resources"]["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["pipe"]["path"] == str(nginx_edge.served.data / "edge" / "cat-0.sock")
    assert "twofold must run with --edge envoy" in edge_config(nginx_edge.served, "envoy")
    # twofold on ports for HAProxy: the edge needs ports of its own, and is told so.
    served = haproxy_edge.served
    done = subprocess.run(
        [
            TWOFOLD,
            "edge",
            "config",
            "nginx",
            "--config",
            str(served.proc.work / "twofold.toml"),
            "--data",
            str(served.data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout
    assert "give the edge's own port, e.g. --port cat=" in done.stderr
    assert "Traceback" not in done.stderr
