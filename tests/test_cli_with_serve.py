"""The `twofold` commands a newcomer runs beside a `twofold serve` — the real serve and the
real command as subprocesses, in working directories of their own: the demo from another
directory, projects from the CLI, private keys that never leave the machine, removing a
certificate by a fingerprint prefix or its file, TWOFOLD_CACERT everywhere, the hints `init`
prints (copied and run as they are), `call -o`, and the one-line messages on the way."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clientkit import plain
from servekit import Shell, serve_beside
from twofold.cli.portal import Portal, resolve_fingerprint
from twofold.crypto import certs, keys
from twofold.errors import TwofoldError

# One serve for the module: its tests go to one xdist worker (`make test` runs --dist loadgroup).
pytestmark = pytest.mark.xdist_group("cli-with-serve")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    base = tmp_path_factory.mktemp("serve")
    with serve_beside(base / "root", base / "aside") as served:
        ok(served.twofold("admin", "org", "add", "acme"))
        ok(served.twofold("admin", "user", "add", "--org", "acme", "--email", "sec@acme.test",
                          "--role", "api_security", "--role", "developer"))  # fmt: skip
        served.extra["token"] = ok(
            served.twofold("admin", "token", "new", "--email", "sec@acme.test")
        ).stdout.strip()
        yield served


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


def one_line_error(done: subprocess.CompletedProcess[str], code: str) -> str:
    assert done.returncode != 0, done.stdout
    lines = [line for line in plain(done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error[{code}]: "), lines[0]
    return lines[0]


def portal_env(served: Shell) -> dict[str, str]:
    return {
        "TWOFOLD_PORTAL": served.portal,
        "TWOFOLD_CACERT": str(served.ca),
        "TWOFOLD_TOKEN": served.extra["token"],
    }


@pytest.fixture(scope="module")
def creds(served: Shell, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acme's credentials from `twofold init`, in a client's own directory far from the serve's,
    registered, with balance and payments in a project."""
    client = tmp_path_factory.mktemp("client")
    env = portal_env(served)
    ok(served.twofold("init", "--cn", "acme-cat", cwd=client))
    for use, name in (("mtls", "mtls"), ("signature", "sign")):
        ok(
            served.twofold(
                "portal",
                "cert",
                "add",
                "--env",
                "cat",
                "--use",
                use,
                f"acme-cat/{name}.crt",
                cwd=client,
                env=env,
            )
        )
    ok(served.twofold("portal", "project", "add", "treasury", env=env))
    ok(
        served.twofold(
            "portal", "project", "product", "add", "treasury", "--env", "cat", "balance", "payments", env=env
        )
    )
    return client


def new_org(served: Shell, slug: str) -> dict[str, str]:
    """An organisation with an API Security + Developer user; the portal variables for it."""
    ok(served.twofold("admin", "org", "add", slug))
    ok(served.twofold("admin", "user", "add", "--org", slug, "--email", f"sec@{slug}.test",
                      "--role", "api_security", "--role", "developer"))  # fmt: skip
    token = ok(served.twofold("admin", "token", "new", "--email", f"sec@{slug}.test")).stdout.strip()
    return {**portal_env(served), "TWOFOLD_TOKEN": token}


def test_demo_from_another_directory_finds_the_running_serve_and_cleans_up(
    served: Shell, tmp_path: Path
) -> None:
    """Item 1: `twofold demo` run elsewhere used the serve's portal but opened ./data (a
    traceback); now it finds the serve — its data, ports and CA — by itself."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = json.loads(ok(served.twofold("admin", "org", "list", "--json")).stdout)
    done = ok(served.twofold("demo", "--cleanup", "--out", tmp_path / "demo", cwd=elsewhere))
    assert f"using the running serve with its data in {served.data}" in plain(done.stderr)
    out = plain(done.stdout)
    assert "HTTP 202" in out
    assert "Demo complete." in out
    # The payment file the demo tells one to send is there (item 11), with the id it sent.
    payment = tmp_path / "demo" / "payment.json"
    assert f"-d @{payment}" in out
    sent = json.loads(payment.read_text())["payments"]["paymentIdentifiers"]["endToEndId"]
    assert f"endToEndId={sent}" in out
    # --cleanup: the organisation it made is gone; nothing was written where it ran.
    assert "deleted the organisation" in out
    assert json.loads(ok(served.twofold("admin", "org", "list", "--json")).stdout) == before
    assert list(elsewhere.iterdir()) == []


def test_demo_keeps_by_default_and_says_what_it_left(served: Shell, tmp_path: Path) -> None:
    done = ok(served.twofold("demo", "--out", tmp_path / "demo", cwd=tmp_path))
    left = re.search(r"Left in the registry: the organisation (demo-[0-9a-f]+)", plain(done.stdout))
    assert left is not None, done.stdout
    org = left.group(1)
    hint = re.search(r"`(twofold admin org rm [^`]+)`", plain(done.stdout))
    assert hint is not None
    # The hint works as printed, from where the demo ran.
    ok(subprocess.run(shlex.split(hint.group(1)), cwd=tmp_path, env=served.env, capture_output=True, text=True,
                      timeout=60, check=False))  # fmt: skip
    slugs = {o["slug"] for o in json.loads(ok(served.twofold("admin", "org", "list", "--json")).stdout)}
    assert org not in slugs


def test_init_hints_name_the_serves_ports_and_ca_and_run_as_printed(served: Shell, tmp_path: Path) -> None:
    """Item 5: the "Next:" lines of `twofold init` omitted --cacert (tls_server_untrusted when
    copied) and named port 8443 whatever the serve used. Copied as printed — registering the
    certificates and adding the products first, which they also show — they work."""
    portal = new_org(served, "initech")
    hints = plain(ok(served.twofold("init", "--cn", "initech-cat", cwd=tmp_path)).stdout)
    lines = [line.strip() for line in hints.splitlines() if line.strip().startswith(("twofold ", "export "))]
    assert any(f"TWOFOLD_PORTAL={served.portal}" in line for line in lines), hints
    calls = [line for line in lines if line.startswith("twofold call ")]
    assert len(calls) == 2
    for line in calls:
        assert f"{served.gateway}/" in line
        assert f"--cacert {served.ca}" in line
    env = {**served.env, **portal}
    for line in lines:
        if line.startswith("twofold portal") or line.startswith("twofold call"):
            for _ in range(10):  # registry changes reach the gateway within a second
                done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=60, check=False)  # fmt: skip
                if done.returncode == 0 or not line.startswith("twofold call"):
                    break
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            if "payments" in line and line.startswith("twofold call"):
                assert '"paymentInitiationResponse"' in done.stdout


def test_call_takes_the_ca_from_twofold_cacert(served: Shell, creds: Path) -> None:
    """Item 5: the portal commands honoured TWOFOLD_CACERT, `twofold call` did not."""
    env = {"TWOFOLD_CACERT": str(served.ca)}
    args = (
        "call",
        f"{served.gateway}/accessapi/balance",
        "--cert",
        "acme-cat/mtls.crt",
        "--key",
        "acme-cat/mtls.key",
    )
    without = served.twofold(*args, cwd=creds)
    one_line_error(without, "tls_server_untrusted")
    ok(_until_ok(served, args, creds, env))
    # -k for one call still works with the variable set.
    assert "tls_" not in served.twofold(*args, "-k", cwd=creds, env=env).stderr


def test_projects_from_the_cli_open_the_gateway(served: Shell, tmp_path: Path) -> None:
    """Item 4: without a CLI for projects a CLI-only user got 403 product_not_in_project."""
    env = new_org(served, "globex")
    client = tmp_path
    ok(served.twofold("init", "--cn", "globex-cat", cwd=client))
    ok(
        served.twofold(
            "portal",
            "cert",
            "add",
            "--env",
            "cat",
            "--use",
            "mtls",
            "globex-cat/mtls.crt",
            cwd=client,
            env=env,
        )
    )
    balance = ("call", f"{served.gateway}/accessapi/balance", "--cert", "globex-cat/mtls.crt",
               "--key", "globex-cat/mtls.key")  # fmt: skip
    refused = _until(served, balance, client, env, lambda done: done.returncode == 4)
    assert "product_not_in_project" in refused.stderr
    products = ok(served.twofold("portal", "product", "list", env=env)).stdout
    assert products.splitlines()[0].split() == ["PRODUCT", "NAME", "PATH", "SIGNATURE"]
    assert "balance" in products
    assert "no projects yet" in served.twofold("portal", "project", "list", env=env).stderr
    ok(served.twofold("portal", "project", "add", "Treasury integration", env=env))
    added = ok(served.twofold("portal", "project", "product", "add", "treasury integration", "--env", "cat",
                              "balance", "payments", env=env))  # fmt: skip
    assert "it now has: cat: balance, payments" in added.stderr
    listed = ok(served.twofold("portal", "project", "list", env=env)).stdout.splitlines()
    assert listed[0].split() == ["PROJECT", "ID", "API", "PRODUCTS"]
    assert "Treasury integration" in listed[1]
    assert "cat: balance, payments" in listed[1]
    ok(_until_ok(served, balance, client, env))
    ok(
        served.twofold(
            "portal", "project", "product", "rm", "Treasury integration", "--env", "cat", "payments", env=env
        )
    )
    as_json = json.loads(ok(served.twofold("portal", "project", "list", "--json", env=env)).stdout)
    assert as_json[0]["products"] == [{"product": "balance", "environment": "cat"}]
    one_line_error(served.twofold("portal", "project", "product", "add", "Treasury integration", "--env", "cat",
                                  "no-such-product", env=env), "product_not_found")  # fmt: skip
    missing = one_line_error(served.twofold("portal", "project", "rm", "nope", env=env), "project_not_found")
    assert "'Treasury integration'" in missing  # it says which there are
    ok(served.twofold("portal", "project", "rm", "Treasury integration", env=env))
    assert "no projects yet" in served.twofold("portal", "project", "list", env=env).stderr


def _until(
    served: Shell,
    args: tuple[str, ...],
    cwd: Path,
    env: dict[str, str],
    done_when: Callable[[subprocess.CompletedProcess[str]], bool],
) -> subprocess.CompletedProcess[str]:
    """Registry changes reach the gateway within a second: ask again until then."""
    deadline = time.monotonic() + 5
    while True:
        done = served.twofold(*args, cwd=cwd, env=env)
        if done_when(done) or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


def _until_ok(
    served: Shell, args: tuple[str, ...], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return _until(served, args, cwd, env, lambda done: done.returncode == 0)


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A port where anything sent would arrive."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock


def test_a_file_holding_a_private_key_never_leaves_the_machine(
    served: Shell, creds: Path, listening: socket.socket, openssl: str
) -> None:
    """Item 2: `portal cert add` sent a .key, a certificate + key bundle or a .p12 to the server,
    which then had to say the key was exposed. The CLI has the file: it refuses at once."""
    (creds / "bundle.pem").write_bytes(
        (creds / "acme-cat/mtls.crt").read_bytes() + (creds / "acme-cat/mtls.key").read_bytes()
    )
    subprocess.run([openssl, "pkcs12", "-export", "-in", "acme-cat/mtls.crt", "-inkey", "acme-cat/mtls.key",
                    "-out", "client.p12", "-passout", "pass:secret-pass"], cwd=creds, check=True, capture_output=True)  # fmt: skip
    (creds / "client.der").write_bytes(keys.private_key_bytes(keys.generate_private_key("ec"), der=True))
    port = listening.getsockname()[1]
    env = {**portal_env(served), "TWOFOLD_PORTAL": f"https://127.0.0.1:{port}"}
    for name, says in (
        ("acme-cat/mtls.key", "register its certificate instead: acme-cat/mtls.crt"),
        ("bundle.pem", "openssl x509 -in bundle.pem -out cert.pem"),
        ("client.p12", "openssl pkcs12 -in client.p12 -clcerts -nokeys -out cert.pem"),
        ("client.der", "nothing was sent"),
    ):
        line = one_line_error(
            served.twofold(
                "portal", "cert", "add", "--env", "cat", "--use", "mtls", name, cwd=creds, env=env
            ),
            "private_key_not_sent",
        )
        assert "nothing was sent, the key stays private on this machine" in line
        assert says in line, line
        with pytest.raises(BlockingIOError):
            listening.accept()  # not one connection was made


def test_remove_a_certificate_by_a_prefix_or_by_its_file(served: Shell, tmp_path: Path) -> None:
    """Item 6: a prefix (as the portal shows) said "no active certificate"; the certificate
    file gave "not_found: no such page or endpoint"."""
    env = new_org(served, "umbrella")
    pairs = []
    for n in range(2):
        key = keys.generate_private_key("ec")
        cert = certs.self_signed_certificate(key, f"/CN=acme-rm-{n}")
        (tmp_path / f"rm{n}.crt").write_bytes(certs.certificate_pem(cert))
        ok(
            served.twofold(
                "portal", "cert", "add", "--env", "cat", "--use", "mtls", tmp_path / f"rm{n}.crt", env=env
            )
        )
        pairs.append(certs.fingerprint_sha256(cert))
    listed = ok(served.twofold("portal", "cert", "list", "--env", "cat", env=env)).stdout
    assert pairs[0] in listed  # the whole fingerprint, to copy
    done = ok(served.twofold("portal", "cert", "rm", "--env", "cat", pairs[0][:8] + "…", env=env))
    assert f"removed acme-rm-0 ({pairs[0]}) from cat" in plain(done.stderr)
    done = ok(served.twofold("portal", "cert", "rm", "--env", "cat", tmp_path / "rm1.crt", env=env))
    assert f"removed acme-rm-1 ({pairs[1]})" in plain(done.stderr)
    gone = one_line_error(served.twofold("portal", "cert", "rm", "--env", "cat", pairs[0][:12], env=env),
                          "certificate_not_found")  # fmt: skip
    assert "twofold portal cert list --env cat" in gone
    one_line_error(served.twofold("portal", "cert", "rm", "--env", "cat", "3672eb2", env=env), "usage")


class _Listed(Portal):
    """The portal's answer to GET /api/v1/certificates, for the prefix logic alone (two real
    fingerprints sharing 8 hex digits cannot be made)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__("https://portal.invalid", "tf_x", None)
        self.rows = rows

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        assert (method, path, kwargs) == ("GET", "/api/v1/certificates", {"params": {"env": "cat"}})
        return self.rows


def test_an_ambiguous_prefix_is_refused_with_the_candidates() -> None:
    rows = [
        {"fingerprint": "3672eb2a" + "0" * 56, "common_name": "a", "use_label": "MTLS"},
        {"fingerprint": "3672eb2a" + "1" * 56, "common_name": "b", "use_label": "Digital Signature"},
    ]
    with pytest.raises(TwofoldError) as refused:
        resolve_fingerprint(_Listed(rows), "cat", "3672EB2A")
    assert refused.value.code == "fingerprint_ambiguous"
    assert f"{rows[0]['fingerprint']} (a, MTLS)" in refused.value.message
    assert f"{rows[1]['fingerprint']} (b, Digital Signature)" in refused.value.message
    assert resolve_fingerprint(_Listed(rows), "cat", "3672eb2a1") == rows[1]["fingerprint"]
    assert resolve_fingerprint(_Listed(rows), "cat", "36:72:EB:2A:0") == rows[0]["fingerprint"]


def test_messages_say_how_to_give_what_is_missing(served: Shell, creds: Path) -> None:
    """Item 7: a missing --token named only the option; now TWOFOLD_TOKEN too."""
    line = one_line_error(served.twofold("portal", "cert", "list"), "token_missing")
    assert "--token" in line
    assert "TWOFOLD_TOKEN" in line
    assert "API tokens page" in line


def test_call_writes_the_body_to_a_file_and_accepts_x5t(served: Shell, creds: Path, tmp_path: Path) -> None:
    """Item 11: `call -o FILE`; the signing certificate is --sign-cert in `call` and `jws sign`
    (documented), --x5t accepted in both."""
    env = {"TWOFOLD_CACERT": str(served.ca)}
    args = (
        "call",
        f"{served.gateway}/accessapi/balance",
        "--cert",
        "acme-cat/mtls.crt",
        "--key",
        "acme-cat/mtls.key",
    )
    done = _until_ok(served, (*args, "-o", str(tmp_path / "balance.json")), creds, env)
    ok(done)
    assert done.stdout == ""
    assert json.loads((tmp_path / "balance.json").read_text())["organisation"] == "acme"
    payment = '{"payments": {"paymentIdentifiers": {"endToEndId": "E2E-X5T-1"}}}'
    signed = ok(served.twofold("call", f"{served.gateway}/tsapi/v1/payments", "-d", payment, "--cert", "acme-cat/mtls.crt",
                               "--key", "acme-cat/mtls.key", "--sign-key", "acme-cat/sign.key", "--x5t",
                               "acme-cat/sign.crt", "-v", cwd=creds, env=env))  # fmt: skip
    assert '"x5t#S256"' in signed.stderr
    help_text = ok(served.twofold("call", "--help")).stdout
    assert "--sign-cert" in help_text
    assert "--x5t" not in help_text
    assert "--x5t" not in ok(served.twofold("jws", "sign", "--help")).stdout


def test_admin_lists_have_a_header_row(served: Shell) -> None:
    """Item 11: `admin product list` printed rows without saying what the columns are."""
    rows = ok(served.twofold("admin", "product", "list")).stdout.splitlines()
    assert rows[0].split() == ["PRODUCT", "PATH", "SIGNATURE", "UPSTREAM", "PROTECTION"]
    assert {line.split()[0] for line in rows[1:]} == {"balance", "echo", "payments"}
