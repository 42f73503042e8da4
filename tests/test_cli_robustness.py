"""Every `twofold` command, off the happy path: with inputs missing and with bad ones, it
exits non-zero with one line saying what is wrong — never a Python traceback, never an
``internal_error`` (the catch-all that would hide a bug). The commands are enumerated from
the click tree, so a new command is covered the day it is added; the bad values come from
each parameter's type and name.

Also: no command but `twofold serve` creates a registry, and each says where it looked."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from clientkit import TWOFOLD, free_port, plain
from twofold.cli import main
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.registry.service import Registry

# Commands whose bare invocation is a legitimate long-running job, not a missing input.
RUNS_UNTIL_STOPPED = {("serve",)}
# Commands run as subprocesses (they could start listening if a bad value slipped through).
AS_SUBPROCESS = {("serve",)}
CLEAN_ENV = (
    "TWOFOLD_DATA",
    "TWOFOLD_DB",
    "TWOFOLD_TOKEN",
    "TWOFOLD_PORTAL",
    "TWOFOLD_CACERT",
    "TWOFOLD_KEY_PASSPHRASE",
    "TWOFOLD_DEBUG",
)


def leaf_commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(leaf_commands(main))


@dataclass
class Material:
    """Files the bad and the good values point at."""

    root: Path
    closed_port: int

    def path(self, name: str) -> str:
        return str(self.root / name)

    def fresh(self, name: str) -> str:
        """A path that does not exist yet, new for each use (outputs)."""
        for n in itertools.count():
            candidate = self.root / "out" / f"{n}-{name}"
            if not candidate.exists():
                candidate.parent.mkdir(exist_ok=True)
                return str(candidate)
        raise AssertionError


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory, sqlite_registry_template: Path) -> Material:
    root = tmp_path_factory.mktemp("material")
    key = keys.generate_private_key("ec")
    (root / "good.key").write_bytes(keys.private_key_bytes(key))
    (root / "good.crt").write_bytes(certs.certificate_pem(certs.self_signed_certificate(key, "/CN=good")))
    (root / "payload.json").write_text('{"a": 1}')
    (root / "empty").write_bytes(b"")
    (root / "garbage").write_bytes(b"\x00\x01 not anything twofold reads \xff" * 20)
    (root / "a-dir").mkdir()
    (root / "bad.toml").write_text("portal_port = [1, 2\n")
    (root / "unknown.toml").write_text("no_such_setting = 1\n")
    (root / "wrong-types.toml").write_text('portal_port = "eighty"\n[ports]\ncat = "x"\n')
    (root / "bundle.p12").write_bytes(
        b"\x30\x82\x01\x00\x02\x01\x03\x30\x80\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x01" + bytes(300)
    )
    (root / "token.jws").write_text("eyJhbGciOiJSUzI1NiJ9.e30.AAAA")
    (root / "good.toml").write_text(
        f"portal_port = {free_port()}\nadmin_port = {free_port()}\n[ports]\ncat = {free_port()}\nprod = {free_port()}\n"
    )
    data = root / "registry"  # a serve's data directory, with its registry (and no serve)
    data.mkdir()
    shutil.copyfile(sqlite_registry_template, data / "twofold.db")

    async def defaults() -> None:
        registry = await Registry.open(str(data / "twofold.db"))
        try:
            await registry.ensure_defaults()
        finally:
            await registry.close()

    asyncio.run(defaults())
    return Material(root, free_port())


def kind(path: tuple[str, ...], param: click.Parameter) -> str:
    """What a parameter takes, from its type and name."""
    name = param.name or ""
    if isinstance(param.type, click.Choice):
        return "choice"
    if isinstance(param.type, click.types.IntParamType):
        return "int"
    if isinstance(param.type, click.types.FloatParamType):
        return "float"
    if path[0] == "call" and name == "data":
        return "body"
    table = {
        "url": "url",
        "portal_url": "url",
        "data": "data_dir",
        "db": "db_url",
        "out_path": "out",
        "out_dir": "out_dir",
        "output": "out",
        "config_file": "config",
        "password_file": "secret_file",
        "cert": "cert",
        "cert_paths": "cert",
        "sign_cert": "cert",
        "x5t_cert": "cert",
        "x5t_alias": "cert",
        "ca_file": "cert",
        "cacert": "cert",
        "key": "key",
        "key_path": "key",
        "key_paths": "key",
        "sign_key": "key",
        "email": "email",
        "slug": "slug",
        "org_slug": "slug",
        "env_id": "slug",
        "product_id": "slug",
        "products": "slug",
        "subject": "subject",
        "san": "san",
        "header_values": "header",
        "certificate": "cert_ref",
        "expect_head": "hex",
        "host": "host",
        "token": "token",
        "roles": "choice",
    }
    if name.endswith("passphrase_file"):
        return "secret_file"
    if name == "file":
        return {"cert": "cert", "jws": "payload" if path[-1] == "sign" else "input"}.get(path[-2], "cert")
    return table.get(name, "text")


def bad_values(path: tuple[str, ...], kind_: str, m: Material) -> list[str]:
    closed = f"https://127.0.0.1:{m.closed_port}"
    missing, directory, empty, garbage = (
        m.path("missing"),
        m.path("a-dir"),
        m.path("empty"),
        m.path("garbage"),
    )
    if path == ("serve",):  # serve creates what is missing: a directory, an (empty) database
        if kind_ == "int":  # each case is a Python start: one value (the range is twofold's own)
            return ["99999999"]
        if kind_ == "data_dir":
            return [garbage]
        if kind_ == "db_url":
            return [f"postgresql://nobody@127.0.0.1:{m.closed_port}/x", directory, garbage, "mysql://x/y"]
    return {
        "choice": ["bogus-choice"],
        "int": ["not-a-number", "-5", "99999999"],
        "float": ["not-a-number", "-1"],
        "url": ["not a url", f"{closed}/x", "ftp://example.com/x"],
        "data_dir": [missing, garbage],
        "db_url": [f"postgresql://nobody@127.0.0.1:{m.closed_port}/x", missing, empty, "mysql://x/y"],
        "out": [m.path("garbage/under-a-file"), m.path("good.key")],
        "out_dir": [m.path("garbage/under-a-file")],
        "config": [
            missing,
            m.path("bad.toml"),
            m.path("unknown.toml"),
            m.path("wrong-types.toml"),
            directory,
        ],
        "secret_file": [missing, directory],
        "cert": [missing, directory, empty, garbage, m.path("good.key"), m.path("bundle.p12")],
        "key": [missing, directory, empty, garbage, m.path("good.crt")],
        "input": [missing, directory, empty, garbage],
        "payload": [missing, directory],
        "body": [f"@{missing}", f"@{directory}"],
        "email": ["not-an-email"],
        "slug": ["Not A Slug!"],
        "subject": ["not a subject", "/XX=unknown-attribute"],
        "san": ["bogus:value"],
        "header": ["no colon here"],
        "cert_ref": ["zz", "abc", directory],
        "hex": ["zz-not-the-head"],
        "host": ["no-such-host.invalid"],
    }.get(kind_, [])


def good_value(kind_: str, param: click.Parameter, m: Material) -> str:
    if isinstance(param.type, click.Choice):
        return str(param.type.choices[0])
    if isinstance(param.type, click.types.IntRange):
        return str(param.type.min if param.type.min is not None else 1)
    return {
        "int": "1",
        "float": "5",
        "url": f"https://127.0.0.1:{m.closed_port}/x",
        "data_dir": m.path("registry"),
        "out": m.fresh("out.pem"),
        "out_dir": m.fresh("dir"),
        "cert": m.path("good.crt"),
        "key": m.path("good.key"),
        "input": m.path("token.jws"),
        "payload": m.path("payload.json"),
        "body": "{}",
        "email": "nobody@example.com",
        "slug": "acme",
        "subject": "/CN=x",
        "header": "X-A: b",
        "cert_ref": "0" * 64,
        "hex": "0" * 64,
        "token": "tf_not-a-real-token",
        "config": m.path("good.toml"),
    }.get(kind_, "x")


def argv(
    path: tuple[str, ...], command: click.Command, m: Material, vary: click.Parameter | None, value: str
) -> list[str]:
    """The command with its required parameters filled with good values (and --data/--config
    pointing at the material), and ``vary`` set to ``value``."""
    args: list[str] = list(path)
    for param in command.params:
        k = kind(path, param)
        if param is vary:
            chosen = value
        elif param.required or (k in ("data_dir", "config") and path[0] in ("admin", "serve")):
            if path == ("serve",) and k == "data_dir":
                chosen = m.fresh("serve-data")
            else:
                chosen = good_value(k, param, m)
        else:
            continue
        if isinstance(param, click.Argument):
            args.append(chosen)
        else:
            args += [param.opts[0], chosen]
    return args


def cases(m: Material) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    for path, command in COMMANDS:
        if path not in RUNS_UNTIL_STOPPED:
            yield path, list(path)  # missing inputs
        for param in command.params:
            if getattr(param, "is_flag", False) or (
                getattr(param, "hidden", False) and param.name == "x5t_alias"
            ):
                continue
            for value in bad_values(path, kind(path, param), m):
                yield path, argv(path, command, m, param, value)


def run(path: tuple[str, ...], args: list[str], env: dict[str, str]) -> tuple[int, str]:
    if path in AS_SUBPROCESS:
        try:
            done = subprocess.run(
                [TWOFOLD, *args], capture_output=True, text=True, timeout=30, env=env, check=False
            )
        except subprocess.TimeoutExpired:
            return 0, f"still running after 30 s: {args}"
        return done.returncode, plain(done.stdout + done.stderr)
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=True, input="")
    output = plain(result.stdout + result.stderr)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += f"\nTraceback: {type(result.exception).__name__}: {result.exception}"
    return result.exit_code, output


def test_every_command_refuses_missing_and_bad_inputs_in_one_line(
    material: Material, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "elsewhere"  # a directory with no serve's data in it
    work.mkdir()
    monkeypatch.chdir(work)
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env["TWOFOLD_RUNTIME_DIR"] = str(tmp_path / "runtime")  # no serve announced
    env["NO_COLOR"] = "1"
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWOFOLD_RUNTIME_DIR", env["TWOFOLD_RUNTIME_DIR"])
    problems: list[str] = []
    every = list(cases(material))
    # The subprocesses run a few at a time (each is a Python start); the rest in this process.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        apart = {
            i: pool.submit(run, path, args, env)
            for i, (path, args) in enumerate(every)
            if path in AS_SUBPROCESS
        }
        results = {i: run(path, args, env) for i, (path, args) in enumerate(every) if i not in apart}
        results.update({i: future.result() for i, future in apart.items()})
    count = len(every)
    for i, (_path, args) in enumerate(every):
        code, output = results[i]
        shown = " ".join(args)
        if "Traceback" in output or 'File "' in output:
            problems.append(f"traceback from `twofold {shown}`:\n{output[-1500:]}")
        elif "internal_error" in output:
            problems.append(f"internal error (a bug) from `twofold {shown}`: {output.strip()[-600:]}")
        elif code == 0:
            problems.append(f"`twofold {shown}` exited 0:\n{output.strip()[-400:]}")
        elif not output.strip():
            problems.append(f"`twofold {shown}` exited {code} without a word")
    assert count > 3 * len(COMMANDS)
    assert not problems, f"{len(problems)} of {count} invocations:\n\n" + "\n\n".join(problems)
    # Nothing in the working directory: no command created a registry (or anything) here.
    assert sorted(p.name for p in work.iterdir()) == [], "commands wrote into the working directory"


def test_the_tree_is_what_the_test_enumerates() -> None:
    """A positive control: the enumeration reaches nested groups (portal project product …)."""
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {
        "admin org list",
        "portal project product add",
        "portal cert rm",
        "serve",
        "demo",
        "call",
    } <= paths
    assert {p for p, _ in COMMANDS} >= RUNS_UNTIL_STOPPED


def test_admin_commands_never_create_a_registry_and_say_where_they_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {k: None for k in CLEAN_ENV} | {"TWOFOLD_RUNTIME_DIR": str(tmp_path / "runtime"), "NO_COLOR": "1"}
    runner = CliRunner()
    listed = runner.invoke(main, ["admin", "org", "list"], env=env)
    added = runner.invoke(main, ["admin", "org", "add", "acme"], env=env)
    for result in (listed, added):
        assert result.exit_code == 2, result.output
        line = plain(result.stderr).strip()
        assert line.startswith("error[registry_not_found]: no twofold registry in the data directory "), line
        assert str(tmp_path / "data") in line
        for way in ("--data", "TWOFOLD_DATA", "--db", "TWOFOLD_DB", "twofold serve"):
            assert way in line, (way, line)
        assert len(line.splitlines()) == 1
    # Nor does installing an issuing CA write into a data directory that holds no registry.
    ca = LocalCA("stand-in issuing CA")
    (tmp_path / "ca.key").write_bytes(keys.private_key_bytes(ca.key))
    (tmp_path / "ca.crt").write_bytes(certs.certificate_pem(ca.certificate))
    issuing = runner.invoke(
        main,
        ["admin", "env", "set", "prod", "--issuing-ca-key", "ca.key", "--issuing-ca-cert", "ca.crt"],
        env=env,
    )
    assert issuing.exit_code == 2, issuing.output
    assert "registry_not_found" in plain(issuing.stderr)
    assert not (tmp_path / "data").exists()
    # An empty database file (what older versions left behind) is not taken for a registry.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "twofold.db").write_bytes(b"")
    result = runner.invoke(main, ["admin", "org", "list"], env=env)
    assert result.exit_code == 2
    assert "is an empty database" in plain(result.stderr)
    assert (tmp_path / "data" / "twofold.db").stat().st_size == 0  # and it stays untouched
    # From TWOFOLD_DATA: said so.
    result = runner.invoke(
        main, ["admin", "user", "list"], env={**env, "TWOFOLD_DATA": str(tmp_path / "nope")}
    )
    assert "(from TWOFOLD_DATA)" in plain(result.stderr)


def test_demo_without_a_running_serve_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {k: None for k in CLEAN_ENV} | {"TWOFOLD_RUNTIME_DIR": str(tmp_path / "runtime"), "NO_COLOR": "1"}
    result = CliRunner().invoke(main, ["demo"], env=env)
    assert result.exit_code == 2
    line = plain(result.stderr).strip()
    assert line.startswith("error[serve_not_running]: no running twofold serve found"), line
    assert "--start" in line
    assert "serve" in line
    assert list(tmp_path.iterdir()) == [tmp_path / "runtime"] or list(tmp_path.iterdir()) == []


def test_serve_on_a_port_in_use_says_which_and_what_to_do(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "twofold.toml"
        config.write_text(
            f"portal_port = {port}\nadmin_port = {free_port()}\n[ports]\ncat = {free_port()}\nprod = {free_port()}\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV} | {
            "TWOFOLD_RUNTIME_DIR": str(tmp_path / "runtime"),
            "NO_COLOR": "1",
        }
        done = subprocess.run(
            [TWOFOLD, "serve", "--data", str(tmp_path / "data"), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = plain(done.stderr).strip().splitlines()[-1]
    assert last.startswith(
        f"error[port_unavailable]: cannot listen on 127.0.0.1:{port} for the portal: the port is in use"
    )
    assert "[ports]" in last  # printed as written, not eaten as markup


def test_an_encrypted_signing_key_without_its_passphrase_says_how_to_give_it(
    material: Material, tmp_path: Path
) -> None:
    encrypted = tmp_path / "sign.key"
    encrypted.write_bytes(keys.private_key_bytes(keys.generate_private_key("ec"), passphrase=b"a passphrase"))
    result = CliRunner().invoke(
        main,
        ["call", f"https://127.0.0.1:{material.closed_port}/x", "-d", "{}", "--cert", material.path("good.crt"),
         "--key", material.path("good.key"), "--sign-key", str(encrypted)],
        env={k: None for k in CLEAN_ENV},
    )  # fmt: skip
    assert result.exit_code == 1
    line = plain(result.stderr).strip()
    assert line.startswith(f"error[key_passphrase_required]: the private key in {encrypted} is encrypted"), (
        line
    )
    for way in ("--sign-passphrase-file FILE", "TWOFOLD_KEY_PASSPHRASE", "--sign-passphrase-env VAR"):
        assert way in line, line
