"""What every command shares: errors and exit codes, passphrases, reading input, writing
files with safe permissions, JSON output."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from twofold.crypto.keys import Passphrase
from twofold.errors import ClientError, KeyLoadError, TwofoldError, UsageError

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
    err.print(f"[bold red]error[/][dim]\\[{escape(error.code)}][/]: {escape(error.message)}", markup=True)
    sys.exit(exit_code)


DEBUG_ENV = "TWOFOLD_DEBUG"
INTERNAL_ERROR = "internal_error"


class Group(click.Group):
    """Turns TwofoldError into a one-line message and an exit code, never a traceback. An
    exception nobody meant (a bug) is said in one line too, as ``internal_error``; with
    TWOFOLD_DEBUG=1 its traceback is shown."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TwofoldError as error:
            fail(error)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            fail(
                TwofoldError(
                    f"unexpected {type(exc).__name__}{': ' + first if first else ''}. This is a bug in "
                    f"twofold: please report it (run again with {DEBUG_ENV}=1 to see where it happened)",
                    code=INTERNAL_ERROR,
                ),
                EXIT_FAILURE,
            )


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


def passphrase_source(file: str | None, env: str | None, label: str, prefix: str = "") -> Passphrase:
    """A passphrase callback: asked only if the key turns out to be encrypted. Order: file,
    named env var, TWOFOLD_KEY_PASSPHRASE, then a prompt if a terminal is attached; without
    any, the refusal names the options (``prefix`` as in :func:`passphrase_options`)."""

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
        raise KeyLoadError(
            f"the private key in {label or 'the key file'} is encrypted: give its passphrase with --{prefix}passphrase-file FILE, "
            f"in the variable {PASSPHRASE_ENV}, or in a variable of your choice named by "
            f"--{prefix}passphrase-env VAR (in a terminal, twofold asks for it)",
            code="key_passphrase_required",
        )

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
    mode = 0o600 if secret else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, flags, mode)
    except OSError as exc:
        raise cannot_write(target, exc) from None
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def cannot_write(path: Path, exc: OSError) -> UsageError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return UsageError(f"cannot write {path}: {exc.strerror or exc}{where}", code="cannot_write")


def make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc) from None


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


def table(headers: list[str], rows: list[list[str]], *, empty: str) -> None:
    """Columns with a header row, for people (``--json`` is for scripts); markup-free, so
    names holding brackets print as they are."""
    if not rows:
        err.print(empty)
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=False)).rstrip()

    out.print(line(headers), style="bold", markup=False, highlight=False)
    for row in rows:
        out.print(line(row), markup=False, highlight=False)


def self_command() -> str:
    """How to run twofold again from here: ``twofold`` when that is on PATH as this very
    program, else the path it was started by — ``.venv/bin/twofold`` on a fresh clone."""
    argv0 = Path(sys.argv[0])
    if argv0.name != "twofold" or not argv0.is_file():
        return "twofold"
    on_path = shutil.which("twofold")
    try:
        if on_path and Path(on_path).resolve() == argv0.resolve():
            return "twofold"
        return str(argv0.absolute().relative_to(Path.cwd()))
    except (OSError, ValueError):
        return str(argv0.absolute())
