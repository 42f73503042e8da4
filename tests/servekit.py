"""`twofold serve` as an operator runs it: the real command in its own process (its own
logging, limits and signals), on free ports, with a TOML settings file; its stderr and
stdout go to files that tests read (the real log output)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from gatewaykit import free_port, wait_until

TWOFOLD = str(Path(sys.executable).with_name("twofold"))


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    work: Path
    portal: int
    admin: int
    cat: int
    prod: int

    @property
    def data(self) -> Path:
        return self.work / "data"

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
) -> Iterator[ServeProcess]:
    """`twofold serve --config` in a new process group, stopped with SIGTERM afterwards."""
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
            [TWOFOLD, "serve", "--data", str(work / "data"), "--config", str(config), *args],
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    served = ServeProcess(process, work, **served_ports)
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
