"""Helpers for the client toolkit suites (CLI and Python client): credentials on disk, a
local mTLS endpoint (EchoServer) that pins the client certificate and verifies JWS bodies,
and ways to run the `twofold` command in-process (CliRunner) or as a real subprocess.

Keys are generated with twofold's crypto layer (RSA where RS256 is the point, EC where the
type does not matter); the suites check the files with the real `openssl` and `curl`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner, Result
from cryptography import x509

from twofold.cli import main
from twofold.cli._common import PASSPHRASE_ENV
from twofold.crypto import certs, keys
from twofold.crypto.ca import LocalCA
from twofold.crypto.keys import PrivateKey
from twofold.devserver import EchoServer

TWOFOLD = str(Path(sys.executable).with_name("twofold"))
SUBJECT = "/C=US/ST=NY/L=New York/O=Acme/OU=Treasury/CN=acme-cat"
SUBJECT_RFC4514 = "CN=acme-cat,OU=Treasury,O=Acme,L=New York,ST=NY,C=US"
PASSPHRASE = "correct horse battery staple"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """Text without ANSI styling (rich adds it when FORCE_COLOR or a terminal is around)."""
    return _ANSI.sub("", text)


# --- running the command ----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cli(*args: object, input: str | bytes | None = None, env: Mapping[str, str | None] | None = None) -> Run:
    """`twofold ARGS` in-process. Unexpected Python exceptions propagate (a traceback is a bug).
    TWOFOLD_KEY_PASSPHRASE is unset unless ``env`` sets it, so the caller's shell cannot leak in."""
    environment: dict[str, str | None] = {PASSPHRASE_ENV: None, **(env or {})}
    result: Result = CliRunner().invoke(
        main, [str(a) for a in args], input=input, env=environment, catch_exceptions=False
    )
    return Run(result.exit_code, plain(result.stdout), plain(result.stderr), result.stdout_bytes)


def twofold_subprocess(
    *args: object, input: bytes | None = None, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """`twofold ARGS` as a real process, as a user types it (without TWOFOLD_KEY_PASSPHRASE
    or forced colours from the caller's environment unless ``env`` sets them)."""
    dropped = {PASSPHRASE_ENV, "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}
    environment = {k: v for k, v in os.environ.items() if k not in dropped}
    environment.update(env or {})
    return subprocess.run(
        [TWOFOLD, *map(str, args)],
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
        env=environment,
    )


def run_tool(
    *argv: object, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run openssl / curl; with check, a failure shows the tool's own stderr."""
    done = subprocess.run([str(a) for a in argv], input=input, capture_output=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stderr.decode(errors='replace')}"
        )
    return done


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- credentials on disk ----------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A private key and its self-signed certificate, in memory and as PEM files."""

    key: PrivateKey
    certificate: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def fingerprint(self) -> str:
        return certs.fingerprint_sha256(self.certificate)


def make_pair(
    directory: Path,
    name: str,
    *,
    cn: str,
    kind: str = "rsa",
    curve: str = "P-256",
    usage: certs.Usage = "client",
    subject: str | None = None,
) -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    private = keys.generate_private_key(kind, curve=curve)
    certificate = certs.self_signed_certificate(private, subject or f"/O=Acme/CN={cn}", usage=usage)
    key_path = directory / f"{name}.key"
    cert_path = directory / f"{name}.crt"
    key_path.write_bytes(keys.private_key_bytes(private))
    key_path.chmod(0o600)
    cert_path.write_bytes(certs.certificate_pem(certificate))
    return Pair(private, certificate, key_path, cert_path)


@dataclass(frozen=True)
class Kit:
    """Everything a client suite needs against one running EchoServer.

    * ``mtls`` (RSA) is pinned by the server; ``sign`` (RSA) is its signature certificate;
    * ``other_sign`` (RSA) is a signing key the server does not know;
    * ``stranger`` (EC) is a client certificate the server does not trust;
    * ``ca_pem`` is the CA that issued the server's certificate; ``other_ca_pem`` is not.
    """

    directory: Path
    server: EchoServer
    mtls: Pair
    sign: Pair
    other_sign: Pair
    stranger: Pair
    ca_pem: Path
    other_ca_pem: Path

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def running_kit(directory: Path) -> Iterator[Kit]:
    mtls = make_pair(directory, "mtls", cn="acme-cat", subject=SUBJECT)
    sign = make_pair(directory, "sign", cn="acme-cat-sign", usage="signature")
    other_sign = make_pair(directory, "other-sign", cn="mallory-sign", usage="signature")
    stranger = make_pair(directory, "stranger", cn="stranger", kind="ec")
    server = EchoServer(trusted=[mtls.certificate], signature_certs=[sign.certificate])
    ca_pem = directory / "ca.pem"
    ca_pem.write_bytes(server.ca_pem)
    other_ca_pem = directory / "other-ca.pem"
    other_ca_pem.write_bytes(certs.certificate_pem(LocalCA("some other CA").certificate))
    with server:
        yield Kit(directory, server, mtls, sign, other_sign, stranger, ca_pem, other_ca_pem)
