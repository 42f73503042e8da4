"""What every command shares: errors and exit codes, passphrases, reading input, writing
files with safe permissions, JSON output."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from twofold.crypto.keys import Passphrase
from twofold.errors import ClientError, TwofoldError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes, documented in `twofold --help`.
EXIT_FAILURE = 1  # refused or failed: bad input, signature does not verify, …
EXIT_USAGE = 2  # the command line is wrong (click's own code too)
EXIT_CONNECT = 3  # TLS handshake or connection failure
EXIT_HTTP = 4  # the server answered with HTTP status >= 400

PASSPHRASE_ENV = "TWOFOLD_KEY_PASSPHRASE"

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def exit_code_for(error: TwofoldError) -> int:
    """Usage (and a missing file) 2; a TLS or connection failure 3; anything else 1. A
    ClientError is not always a connection failure: a key that does not match its
    certificate is bad input."""
    if isinstance(error, UsageError) or error.code in ("usage", "file_not_found"):
        return EXIT_USAGE
    if isinstance(error, ClientError) and (
        error.code.startswith(("tls_", "connect_")) or error.code in ("timeout", ClientError.code)
    ):
        return EXIT_CONNECT
    return EXIT_FAILURE


def fail(error: TwofoldError, exit_code: int | None = None) -> NoReturn:
    if exit_code is None:
        exit_code = exit_code_for(error)
    err.print(f"[bold red]error[/][dim]\\[{error.code}][/]: {escape(error.message)}", markup=True)
    sys.exit(exit_code)


class Group(click.Group):
    """Turns TwofoldError into a one-line message and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TwofoldError as error:
            fail(error)


def examples(*lines: str) -> str:
    """Help text ends with examples, as the `step` CLI does."""
    body = "\n".join(f"  $ {line}" for line in lines)
    return f"\n\n\b\nExamples:\n{body}"


# --- passphrases -------------------------------------------------------------------------


def passphrase_options(prefix: str = "", what: str = "the key") -> Callable[[F], F]:
    """--passphrase-file / --passphrase-env for reading an encrypted key."""
    file_opt = f"--{prefix}passphrase-file"
    env_opt = f"--{prefix}passphrase-env"

    def decorate(fn: F) -> F:
        fn = click.option(
            env_opt,
            metavar="VAR",
            help=f"Environment variable holding the passphrase of {what} (default {PASSPHRASE_ENV}).",
        )(fn)
        fn = click.option(
            file_opt,
            type=click.Path(exists=True, dir_okay=False),
            help=f"File holding the passphrase of {what} (first line).",
        )(fn)
        return fn

    return decorate


def read_passphrase_file(path: str) -> bytes:
    data = Path(path).read_bytes()
    line = data.splitlines()[0] if data else b""
    if not line:
        raise UsageError(f"the passphrase file {path} is empty")
    return line


def passphrase_source(file: str | None, env: str | None, label: str) -> Passphrase:
    """A passphrase callback: asked only if the key turns out to be encrypted. Order: file,
    named env var, TWOFOLD_KEY_PASSPHRASE, then a prompt if a terminal is attached."""

    def ask() -> bytes | None:
        if file:
            return read_passphrase_file(file)
        for name in (env, PASSPHRASE_ENV):
            if name and os.environ.get(name):
                return os.environ[name].encode()
        if env:
            raise UsageError(f"the environment variable {env} is not set")
        if sys.stdin.isatty():
            return click.prompt(f"Passphrase for {label}", hide_input=True, err=True).encode()
        return None

    return ask


def new_passphrase(file: str | None) -> bytes | None:
    return read_passphrase_file(file) if file else None


# --- reading and writing -----------------------------------------------------------------


def read_input(source: str | None) -> bytes:
    """A file's bytes, or stdin for '-' or None."""
    if source in (None, "-"):
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{source} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{source} is a directory") from None


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, not a file") from None


def write_file(path: str | Path, data: bytes, *, secret: bool = False, force: bool = False) -> None:
    """Write a new file: 0600 for secrets, 0644 otherwise; '-' is stdout. An existing file
    is kept unless ``force`` (losing a private key by accident is not undoable)."""
    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    target = Path(path)
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))
