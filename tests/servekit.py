"""`twofold serve` as a person starts it — the real command, in a directory of its own, on free
loopback ports (a twofold.toml names them), with its own runtime directory so that it is the
only serve the commands under test can find — and the `twofold` command run beside it as a
person types it: a subprocess in a working directory, with the venv's bin on PATH."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from click.testing import CliRunner

from clientkit import plain
from gatewaykit import free_port, wait_until
from twofold.cli import main

BIN = Path(sys.executable).parent
TWOFOLD = str(BIN / "twofold")
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
class Served:
    root: Path  # the serve's working directory: its data directory is root/data
    portal_port: int
    cat_port: int
    prod_port: int
    admin_port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    one_time_password: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ca(self) -> Path:
        return self.data / "ca" / "ca.crt"

    @property
    def portal(self) -> str:
        return f"https://localhost:{self.portal_port}"

    @property
    def gateway(self) -> str:
        return f"https://localhost:{self.cat_port}"

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

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def user_env(aside: Path) -> dict[str, str]:
    """The environment of a person's shell: the venv's bin first on PATH, nothing of twofold's
    own variables from the caller, a runtime directory of this test's own (in ``aside``)."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TWOFOLD_RUNTIME_DIR"] = str(aside / ".runtime")
    env["NO_COLOR"] = "1"
    return env


def start_serve(root: Path, aside: Path | None = None) -> Served:
    """`twofold serve` in ``root`` (its data directory: ./data), ready; its free ports in a
    twofold.toml, its log and runtime directory in ``aside`` (default: ``root``)."""
    aside = aside or root
    root.mkdir(parents=True, exist_ok=True)
    aside.mkdir(parents=True, exist_ok=True)
    portal, cat, prod, admin = free_port(), free_port(), free_port(), free_port()
    config = aside / "twofold.toml"
    config.write_text(f"portal_port = {portal}\nadmin_port = {admin}\n[ports]\ncat = {cat}\nprod = {prod}\n")
    env = user_env(aside)
    log = aside / "serve.log"
    process = subprocess.Popen(
        [TWOFOLD, "serve", "--config", str(config), "--no-access-log"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    served = Served(root, portal, cat, prod, admin, env, process, log)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"twofold serve exited ({process.returncode}):\n{log.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 90, 0.2)
        wait_until(lambda: "twofold is running" in log.read_text(), 30, 0.1)
    except BaseException:
        served.stop()
        raise
    found = re.search(r"one-time password: (\S+)", plain(log.read_text()))
    served.one_time_password = found.group(1) if found else ""
    return served
