"""`twofold serve` as an operator runs it: the real command in its own process (its own
logging, limits and signals), on free ports, with a TOML settings file; its stderr and
stdout go to files that tests read (the real log output).

:func:`serving` adds what the suites that drive it from outside need (rotation under load,
doctor): operator steps straight on the registry database, organisation users with API
tokens through the portal API and the `twofold` CLI.

Every serve started here announces itself (for `twofold demo` and the hints) in a runtime
directory of its own, never the user's. :func:`serve_beside` adds a person's shell beside a
serve (:class:`Shell`): the serve's working directory holding its ./data, the venv's bin on
PATH, and the `twofold` command run as typed there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
from click.testing import CliRunner

from gatewaykit import free_port, wait_until
from twofold.cli import main
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry

T = TypeVar("T")
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
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM to the process group a test started (``start_new_session``), SIGKILL after ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


# --- driving a running serve from outside ------------------------------------------------------


@dataclass(frozen=True)
class Member:
    org: str
    email: str
    token: str
    project_id: int


@dataclass
class Served:
    proc: ServeProcess
    db: str | None = None  # the registry's URL when not SQLite in the data directory

    @property
    def data(self) -> Path:
        return self.proc.data

    @property
    def ca(self) -> Path:
        return self.proc.ca

    @property
    def admin_port(self) -> int:
        return self.proc.admin

    @property
    def ports(self) -> dict[str, int]:
        return {"cat": self.proc.cat, "prod": self.proc.prod}

    @property
    def portal(self) -> str:
        return f"https://localhost:{self.proc.portal}"

    def gateway(self, env: str = "cat") -> str:
        return f"https://localhost:{self.ports[env]}"

    def registry(self, work: Callable[[Registry], Awaitable[T]]) -> T:
        async def run() -> T:
            registry = await Registry.open(self.db or str(self.data / "twofold.db"), migrate=False)
            try:
                return await work(registry)
            finally:
                await registry.close()

        return asyncio.run(run())

    def api(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.portal,
            verify=self.proc.client_context(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )

    def member(self, slug: str, products: dict[str, list[str]]) -> Member:
        """An organisation with an API Security + Developer user, a token, and a project with
        ``products`` per environment."""
        email = f"security@{slug}.example"

        async def seed(registry: Registry) -> str:
            await registry.add_org(SYSTEM, slug, f"{slug.title()} Ltd")
            await registry.add_user(
                SYSTEM, email, org=slug, roles=["api_security", "developer"], password=None
            )
            return await registry.create_token(SYSTEM, "tests", for_email=email)

        token = self.registry(seed)
        with self.api(token) as api:
            project = api.post("/api/v1/projects", json={"name": f"{slug} treasury"})
            assert project.status_code == 201, project.text
            project_id = int(project.json()["id"])
            for env, names in products.items():
                for name in names:
                    added = api.put(f"/api/v1/projects/{project_id}/products/{env}/{name}")
                    assert added.status_code == 200, added.text
        return Member(slug, email, token, project_id)

    def cli(
        self, member: Member | None, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TWOFOLD_PORTAL": self.portal, "TWOFOLD_CACERT": str(self.ca)}
        env.pop("TWOFOLD_TOKEN", None)
        if member is not None:
            env["TWOFOLD_TOKEN"] = member.token
        return subprocess.run([TWOFOLD, *args], capture_output=True, text=True, env=env, timeout=timeout)

    def credentials(self, member: Member, directory: Path, cn: str, env: str = "cat") -> None:
        """`twofold init` (RSA keys, self-signed) into ``directory``; both certificates registered
        by the CLI, and the gateway told."""
        done = self.cli(None, "init", "--cn", cn, "--out", str(directory))
        assert done.returncode == 0, done.stderr
        for use, name in (("mtls", "mtls"), ("signature", "sign")):
            done = self.cli(
                member, "portal", "cert", "add", "--env", env, "--use", use, str(directory / f"{name}.crt")
            )
            assert done.returncode == 0, done.stderr
        self.sync()

    def seen_version(self) -> int:
        return int(
            httpx.get(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=5).json()["registry_version"]
        )

    def sync(self, deadline: float = 5.0) -> None:
        """Until the gateway's snapshot has every registry change made so far."""
        want = self.registry(lambda r: r.version())
        wait_until(lambda: self.seen_version() >= want, deadline)


@contextlib.contextmanager
def serving(work: Path, settings: str = "", *, db: str | None = None) -> Iterator[Served]:
    """:func:`serve_process` (access log off) with more TOML ``settings`` (and the registry at
    ``db``), ready once its gateway's /readyz says so."""
    if db is not None:
        settings = f'db = "{db}"\n{settings}'
    with serve_process(work, settings) as proc:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{proc.admin}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 30, 0.1)
        yield Served(proc, db)


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
class Shell:
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
def serve_beside(root: Path, aside: Path) -> Iterator[Shell]:
    """`twofold serve` run in ``root`` with its data in ./data, as `make run` runs it there;
    its settings, logs and runtime directory in ``aside`` (so that ``root`` holds only what a
    person's walkthrough writes)."""
    root.mkdir(parents=True, exist_ok=True)
    env = user_env(aside)
    with serve_process(aside, data=root / "data", cwd=root, env=env) as process:
        yield Shell(root, process, env)
