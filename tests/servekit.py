"""`twofold serve` as an operator runs it: the real command in its own process (its own
logging, limits and signals), on free ports, with a TOML settings file; its stderr and
stdout go to files that tests read (the real log output). It announces itself (for `twofold
demo` and the hints) in a runtime directory of the test's own, never the user's.

And a person's shell beside it (:class:`Served`): the serve's working directory holding its
./data, the venv's bin on PATH, and the `twofold` command run as typed there."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from click.testing import CliRunner

from gatewaykit import free_port, wait_until
from twofold.cli import main

TWOFOLD = str(Path(sys.executable).with_name("twofold"))
BIN = Path(sys.executable).parent
DROPPED = (
    "TWOFOLD_DATA",
    "TWOFOLD_DB",
    "TWOFOLD_TOKEN",
    "TWOFOLD_PORTAL",
    "TWOFOLD_CACERT",
    "TWOFOLD_KEY_PASSPHRASE",
    "TWOFOLD_DEBUG",
    "FORCE_COLOR",
)


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    work: Path
    portal: int
    admin: int
    cat: int
    prod: int
    data_dir: Path | None = None

    @property
    def data(self) -> Path:
        return self.data_dir or self.work / "data"

    @property
    def ca(self) -> Path:
        return self.data / "ca" / "ca.crt"

    @property
    def stderr(self) -> Path:
        return self.work / "serve.stderr"

    @property
    def stdout(self) -> Path:
        return self.work / "serve.stdout"

    def log(self) -> str:
        """Everything serve has written so far, stderr and stdout."""
        return self.stderr.read_text(errors="replace") + self.stdout.read_text(errors="replace")

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def tls(self, port: int | None = None, timeout: float = 10) -> ssl.SSLSocket:
        """A TLS connection to the portal (or ``port``), verified against serve's local CA."""
        raw = socket.create_connection(("127.0.0.1", port or self.portal), timeout=timeout)
        return self.client_context().wrap_socket(raw, server_hostname="localhost")

    def alive(self) -> bool:
        return self.process.poll() is None


def _portal_up(served: ServeProcess) -> bool:
    if not served.alive():
        raise AssertionError(f"twofold serve exited ({served.process.returncode}):\n{served.log()[-3000:]}")
    if not served.ca.exists():
        return False
    try:
        with httpx.Client(verify=served.client_context(), timeout=2) as client:
            return client.get(f"https://localhost:{served.portal}/login").status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def serve_process(
    work: Path,
    settings: str = "",
    *,
    args: tuple[str, ...] = ("--no-access-log",),
    preexec_fn: Callable[[], None] | None = None,
    admin: int | None = None,
    data: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[ServeProcess]:
    """`twofold serve --config` in a new process group, stopped with SIGTERM afterwards. Its
    settings, logs and runtime directory are in ``work``; its data in ``data`` (default
    work/data); it runs in ``cwd`` with ``env`` (default: this process's, announcing the serve
    in work/.runtime)."""
    work.mkdir(parents=True, exist_ok=True)
    served_ports = {
        "portal": free_port(),
        "admin": admin or free_port(),
        "cat": free_port(),
        "prod": free_port(),
    }
    config = work / "twofold.toml"
    config.write_text(
        f"portal_port = {served_ports['portal']}\nadmin_port = {served_ports['admin']}\n{settings}\n"
        f"[ports]\ncat = {served_ports['cat']}\nprod = {served_ports['prod']}\n"
    )
    with (work / "serve.stderr").open("wb") as stderr, (work / "serve.stdout").open("wb") as stdout:
        process = subprocess.Popen(
            [TWOFOLD, "serve", "--data", str(data or work / "data"), "--config", str(config), *args],
            cwd=cwd,
            env=dict(env)
            if env is not None
            else {**os.environ, "TWOFOLD_RUNTIME_DIR": str(work / ".runtime")},
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    served = ServeProcess(process, work, **served_ports, data_dir=data)
    try:
        wait_until(lambda: _portal_up(served), 60, 0.2)
        yield served
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


# --- a person's shell beside the serve -------------------------------------------------------


def user_env(aside: Path) -> dict[str, str]:
    """The environment of a person's shell: the venv's bin first on PATH, nothing of twofold's
    own variables from the caller, a runtime directory of this test's own (in ``aside``)."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TWOFOLD_RUNTIME_DIR"] = str(aside / ".runtime")
    env["NO_COLOR"] = "1"
    return env


@dataclass
class Served:
    """A serve whose working directory is ``root`` (its data: root/data), and the shell of a
    person working beside it."""

    root: Path
    process: ServeProcess
    env: dict[str, str]
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ca(self) -> Path:
        return self.data / "ca" / "ca.crt"

    @property
    def portal_port(self) -> int:
        return self.process.portal

    @property
    def cat_port(self) -> int:
        return self.process.cat

    @property
    def prod_port(self) -> int:
        return self.process.prod

    @property
    def admin_port(self) -> int:
        return self.process.admin

    @property
    def portal(self) -> str:
        return f"https://localhost:{self.portal_port}"

    @property
    def gateway(self) -> str:
        return f"https://localhost:{self.cat_port}"

    def log(self) -> str:
        return self.process.log()

    def twofold(
        self, *args: object, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`twofold ARGS` typed in ``cwd`` (default: the serve's directory) — run in this
        process (a Python start per command would cost more than most commands), with the
        working directory and environment a shell would give it. An exception that escapes
        (a traceback, for a user) fails the test."""
        argv = [str(a) for a in args]
        environment = {**self.env, **(env or {})}
        overrides: dict[str, str | None] = {k: None for k in os.environ if k not in environment}
        overrides.update(environment)
        before = Path.cwd()
        os.chdir(cwd or self.root)
        try:
            result = CliRunner().invoke(main, argv, env=overrides, catch_exceptions=True)
        finally:
            os.chdir(before)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(
                f"`twofold {' '.join(argv)}` raised {result.exception!r}"
            ) from result.exception
        return subprocess.CompletedProcess(["twofold", *argv], result.exit_code, result.stdout, result.stderr)


@contextlib.contextmanager
def serve_beside(root: Path, aside: Path) -> Iterator[Served]:
    """`twofold serve` run in ``root`` with its data in ./data, as `make run` runs it there;
    its settings, logs and runtime directory in ``aside`` (so that ``root`` holds only what a
    person's walkthrough writes)."""
    root.mkdir(parents=True, exist_ok=True)
    env = user_env(aside)
    with serve_process(aside, data=root / "data", cwd=root, env=env) as process:
        yield Served(root, process, env)
