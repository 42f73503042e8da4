"""Where a running `twofold serve` says where it is: its data directory, its ports and its CA.

`twofold serve` writes one small file per process into the user's runtime directory
(``$TWOFOLD_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/twofold``, else ``~/.cache/twofold/run``)
and removes it when it stops; a file whose process is gone is ignored and removed. Commands
run from another directory read it: `twofold demo` finds the serve it talks to, `twofold
init` prints hints with the right ports and CA, and the admin commands say which data
directory to pass. Nothing secret is written: a database URL that carries a password is left
out (the reader is told to pass ``--db``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNTIME_ENV = "TWOFOLD_RUNTIME_DIR"


def runtime_dir() -> Path:
    explicit = os.environ.get(RUNTIME_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "twofold"
    return Path.home() / ".cache" / "twofold" / "run"


@dataclass(frozen=True)
class RunningServe:
    pid: int
    data: Path  # absolute
    portal: str  # https://localhost:8000
    gateways: dict[str, str] = field(default_factory=dict)  # environment → base URL
    ca: Path | None = None  # absolute
    db: str | None = None  # the URL when it is not SQLite in ``data`` and holds no password
    db_has_password: bool = False

    @property
    def sqlite_in_data(self) -> bool:
        return self.db is None and not self.db_has_password

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "data": str(self.data),
            "portal": self.portal,
            "gateways": self.gateways,
            "ca": str(self.ca) if self.ca else None,
            "db": self.db,
            "db_has_password": self.db_has_password,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunningServe:
        return cls(
            pid=int(raw["pid"]),
            data=Path(raw["data"]),
            portal=str(raw["portal"]),
            gateways={str(k): str(v) for k, v in dict(raw.get("gateways") or {}).items()},
            ca=Path(raw["ca"]) if raw.get("ca") else None,
            db=raw.get("db"),
            db_has_password=bool(raw.get("db_has_password")),
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _own_file(pid: int) -> Path:
    return runtime_dir() / f"serve-{pid}.json"


def announce(serve: RunningServe) -> Path | None:
    """Write this serve's file (mode 0600); None when the runtime directory is not writable
    (then nothing can find the serve, which is not worth failing the start for)."""
    path = _own_file(serve.pid)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(serve.to_dict(), handle)
        tmp.replace(path)
    except OSError:
        return None
    return path


def withdraw(pid: int) -> None:
    with contextlib.suppress(OSError):
        _own_file(pid).unlink()


def running_serves() -> list[RunningServe]:
    """The serves running now, newest file first."""
    found: list[tuple[float, RunningServe]] = []
    try:
        files = list(runtime_dir().glob("serve-*.json"))
    except OSError:
        return []
    for path in files:
        try:
            serve = RunningServe.from_dict(json.loads(path.read_text()))
            mtime = path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _alive(serve.pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found.append((mtime, serve))
    return [serve for _mtime, serve in sorted(found, key=lambda item: -item[0])]


def serve_for(data: Path) -> RunningServe | None:
    """The running serve whose data directory is ``data``, if any."""
    try:
        target = data.resolve()
    except OSError:
        return None
    return next((s for s in running_serves() if s.data == target), None)
