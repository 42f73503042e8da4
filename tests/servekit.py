"""`twofold serve` as an operator runs it — a separate process on free loopback ports with its
own data directory — for the suites that drive it from outside: rotation under load, doctor.
Operator steps go to the registry database directly; organisation users use the portal API
with tokens and the `twofold` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from gatewaykit import free_port, wait_until
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry

T = TypeVar("T")
TWOFOLD = str(Path(sys.executable).with_name("twofold"))


@dataclass(frozen=True)
class Member:
    org: str
    email: str
    token: str
    project_id: int


@dataclass
class Served:
    work: Path
    data: Path
    portal_port: int
    admin_port: int
    ports: dict[str, int]
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def ca(self) -> Path:
        return self.data / "ca" / "ca.crt"

    @property
    def portal(self) -> str:
        return f"https://localhost:{self.portal_port}"

    def gateway(self, env: str = "cat") -> str:
        return f"https://localhost:{self.ports[env]}"

    def registry(self, work: Callable[[Registry], Awaitable[T]]) -> T:
        async def run() -> T:
            registry = await Registry.open(str(self.data / "twofold.db"), migrate=False)
            try:
                return await work(registry)
            finally:
                await registry.close()

        return asyncio.run(run())

    def api(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.portal,
            verify=ssl.create_default_context(cafile=str(self.ca)),
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
def serving(work: Path, *, workers: int = 1, admin_port: int | None = None) -> Iterator[Served]:
    """`twofold serve` until the block ends; ready once every process's /readyz says so (the
    extra workers' admin listeners are on the next ports)."""
    data = work / "data"
    portal, admin = free_port(), admin_port or free_port()
    ports = {"cat": free_port(), "prod": free_port()}
    config = work / "twofold.toml"
    config.write_text(
        f"workers = {workers}\nportal_port = {portal}\nadmin_port = {admin}\n[ports]\n"
        + "".join(f"{env} = {port}\n" for env, port in ports.items())
    )
    log = work / "serve.log"
    process = subprocess.Popen(
        [TWOFOLD, "serve", "--data", str(data), "--config", str(config), "--no-access-log"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    served = Served(work, data, portal, admin, ports, process, log)
    try:

        def ready(port: int) -> bool:
            if process.poll() is not None:
                raise AssertionError(f"twofold serve exited ({process.returncode}):\n{log.read_text()}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(lambda: all(ready(admin + i) for i in range(workers)), 60, 0.2)
        yield served
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
