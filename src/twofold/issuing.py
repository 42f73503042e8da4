"""Environments' issuing CAs on disk: the keys the portal signs CSRs with.

A key lives in the data directory (``<data>/issuing/<env>/ca.key``, 0600, beside its
``ca.crt``) or in files named in the settings (``[issuing_ca.prod] key = …, cert = …``). The
registry names *which* CA issues for an environment (its certificate only); the key never
enters the registry, the portal's pages or API, or a log line. `twofold serve` creates a
local issuing CA for Production on first start when Production trusts no CA yet.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA, check_issuing_ca
from twofold.errors import TwofoldError, UsageError
from twofold.registry.auth import SYSTEM
from twofold.registry.service import Registry

LOCAL_ISSUING_ENV = "prod"


@dataclass(frozen=True)
class IssuingFiles:
    key: Path
    cert: Path
    passphrase_file: Path | None = None


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(path.name + ".part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


class IssuingCAs:
    """Where each environment's issuing CA is, loaded on demand (again when its files change)."""

    def __init__(self, data: Path, configured: Mapping[str, IssuingFiles] | None = None) -> None:
        self.data = data
        self.configured = dict(configured or {})
        self._cache: dict[str, tuple[tuple[int, ...], LocalCA]] = {}

    def files(self, env_id: str) -> IssuingFiles:
        if env_id in self.configured:
            return self.configured[env_id]
        directory = self.data / "issuing" / env_id
        return IssuingFiles(directory / "ca.key", directory / "ca.crt")

    def present(self, env_id: str) -> bool:
        files = self.files(env_id)
        return files.key.exists() and files.cert.exists()

    def load(self, env_id: str) -> LocalCA | None:
        """The environment's CA from its files, None when there are none."""
        files = self.files(env_id)
        try:
            stamp = tuple(
                int(v) for p in (files.key, files.cert) for v in (p.stat().st_mtime_ns, p.stat().st_size)
            )
        except FileNotFoundError:
            return None
        cached = self._cache.get(env_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        passphrase = (
            files.passphrase_file.read_bytes().splitlines()[0] if files.passphrase_file is not None else None
        )
        key = keys.load_private_key(files.key.read_bytes(), passphrase, name=str(files.key))
        certificate = certs.load_certificate(files.cert.read_bytes(), name=str(files.cert))
        check_issuing_ca(key, certificate)
        ca = LocalCA(key=key, certificate=certificate)
        self._cache[env_id] = (stamp, ca)
        return ca

    def get(self, env_id: str, expected_pem: str | None) -> LocalCA | None:
        """The CA that may issue for ``env_id``: only the one the registry names."""
        if not expected_pem:
            return None
        try:
            ca = self.load(env_id)
        except (TwofoldError, OSError):
            return None
        if ca is None or certs.certificate_pem(ca.certificate).decode() != expected_pem:
            return None
        return ca

    def install(self, env_id: str, ca: LocalCA) -> IssuingFiles:
        """Write a CA's key (0600) and certificate into the data directory."""
        check_issuing_ca(ca.key, ca.certificate)
        files = self.files(env_id)
        if env_id in self.configured:
            raise UsageError(
                f"the issuing CA of {env_id} is named in the settings ({files.key}); change it there"
            )
        _write(files.key, keys.private_key_bytes(ca.key), 0o600)
        _write(files.cert, certs.certificate_pem(ca.certificate), 0o644)
        self._cache.pop(env_id, None)
        return files


def load_for_install(key_file: str, cert_file: str, passphrase: keys.Passphrase = None) -> LocalCA:
    """A CA key and certificate given by an operator, checked to work as an issuing CA."""
    try:
        key_data, cert_data = Path(key_file).read_bytes(), Path(cert_file).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None
    key = keys.load_private_key(key_data, passphrase, name=key_file)
    certificate = certs.load_certificate(cert_data, name=cert_file)
    check_issuing_ca(key, certificate)
    return LocalCA(key=key, certificate=certificate)


async def sync_issuing_cas(
    registry: Registry, issuers: IssuingCAs, announce: Callable[[str], None], *, create_local: bool = True
) -> None:
    """At start: name in the registry the CAs this node holds for environments that have
    none yet, and make a local issuing CA for Production when it trusts no CA at all."""
    for env in await registry.list_environments():
        env_id = env["id"]
        if issuers.present(env_id):
            ca = issuers.load(env_id)
            assert ca is not None
            pem = certs.certificate_pem(ca.certificate).decode()
            current = await registry.issuing_ca_pem(env_id)
            if current is None:
                await registry.save_environment(SYSTEM, env_id, issuing_ca_pem=pem)
                announce(
                    f"{env['name']} ({env_id}) issues certificates from CSRs with {issuers.files(env_id).cert}"
                )
            elif current != pem:
                announce(
                    f"warning: {issuers.files(env_id).cert} is not the issuing CA the registry names for "
                    f"{env_id}; this node cannot issue there (twofold admin env set {env_id} --issuing-ca-… "
                    "installs the right one)"
                )
        elif (
            env_id == LOCAL_ISSUING_ENV
            and create_local
            and not env["issues_certificates"]
            and not env["has_ca"]
        ):
            ca = LocalCA(f"twofold {env['name']} issuing CA")
            files = issuers.install(env_id, ca)
            await registry.save_environment(
                SYSTEM, env_id, issuing_ca_pem=certs.certificate_pem(ca.certificate).decode()
            )
            announce(
                f"created a local issuing CA for {env['name']}: {files.cert} (CSRs submitted on the "
                "Security page are issued by it)"
            )
