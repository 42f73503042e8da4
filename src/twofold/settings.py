"""`twofold serve`'s settings: defaults ← twofold.toml ← command-line options, each checked at
start so that a setting that cannot work stops `serve` before it listens."""

from __future__ import annotations

import datetime as dt
import grp
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from twofold.errors import UsageError
from twofold.gateway.edge import EDGES, parse_proxies
from twofold.issuing import IssuingFiles
from twofold.listener import ConnectionLimits
from twofold.mail import DEFAULT_SENDER, MailSettings, read_password


@dataclass(frozen=True)
class ServeConfig:
    data: Path = Path("data")
    db: str | None = None  # default: SQLite file in the data directory
    host: str = "127.0.0.1"  # where the portal and gateways listen
    portal_port: int = 8000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9100
    workers: int = 1
    max_body: int = 1024 * 1024
    upstream_timeout: float = 30.0
    access_log: bool = True
    ports: dict[str, int] = field(default_factory=dict)  # environment → port, overrides the registry
    # Every listener (portal, gateways): see twofold.listener.ConnectionLimits.
    header_timeout: float = ConnectionLimits.header_timeout
    body_timeout: float = ConnectionLimits.body_timeout
    idle_timeout: float = ConnectionLimits.idle_timeout
    max_connections: int = ConnectionLimits.max_connections  # per listener
    # Gateways keep serving from their last registry snapshot this long while the database
    # cannot be reached, then refuse (503 registry_unavailable) until it is back.
    registry_grace: float = 300.0
    # Replay ids are flushed to disk before the request is forwarded; false: visible to every
    # node at once all the same, but a database crash may forget the last moment's ids.
    replay_durable: bool = True
    # The gateway's key for signed responses (products with sign_responses), made on first
    # start: default <data>/gateway/response-signing.key. Every node's key is published in the
    # registry and listed in the portal's JWKS.
    response_signing_key: str | None = None
    response_signing_alg: str = "ES256"  # ES256 (EC P-256), PS256 or RS256 (RSA)

    # Behind a TLS edge (nginx | haproxy | envoy): the gateways take plain HTTP from it, on unix
    # sockets in edge_socket_dir (default <data>/edge) — or, with edge_proxies, on the
    # environments' ports, honouring the certificate header from those addresses only.
    edge: str | None = None
    edge_proxies: list[str] = field(default_factory=list)
    edge_socket_dir: str | None = None
    edge_socket_group: str | None = None  # the edge's group, allowed to connect (sockets are 0660)

    def __post_init__(self) -> None:
        if self.edge is not None and self.edge not in EDGES:
            raise UsageError(f"edge must be one of {', '.join(EDGES)}, not {self.edge!r}")
        if self.edge_proxies and self.edge is None:
            raise UsageError('edge_proxies is for a TLS edge: set edge = "nginx" (or haproxy, envoy) too')
        try:
            parse_proxies(list(self.edge_proxies))
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        if self.edge_socket_group is not None:
            try:
                grp.getgrnam(self.edge_socket_group)
            except KeyError:
                raise UsageError(f"edge_socket_group: there is no group {self.edge_socket_group!r}") from None
        for name in ("header_timeout", "body_timeout", "idle_timeout", "max_connections", "registry_grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UsageError(f"{name} must be a positive number, not {value!r}")
        if not isinstance(self.max_connections, int):
            raise UsageError(f"max_connections must be a whole number, not {self.max_connections!r}")

    @property
    def limits(self) -> ConnectionLimits:
        """The connection limits as configured (``fitted`` to the open-files limit at start)."""
        return ConnectionLimits(
            header_timeout=float(self.header_timeout),
            body_timeout=float(self.body_timeout),
            idle_timeout=float(self.idle_timeout),
            max_connections=self.max_connections,
        )

    portal_url: str | None = (
        None  # how people reach the portal (links in mail); default https://localhost:PORT
    )
    smtp: str | None = None  # "host:port"; none: mail is written to <data>/outbox/
    smtp_security: str = "starttls"  # starttls | ssl | none (loopback only)
    smtp_username: str | None = None
    smtp_password_file: str | None = None  # else TWOFOLD_SMTP_PASSWORD
    smtp_cafile: str | None = None  # CA bundle for the SMTP server (default: the system's)
    mail_from: str = DEFAULT_SENDER
    link_lifetime_hours: float = 72.0  # how long invitation and password-reset links work
    # Issuing CAs named here instead of <data>/issuing/<env>/: {"prod": {"key": …, "cert": …}}
    # (and "passphrase_file" for an encrypted key).
    issuing_ca: dict[str, dict[str, str]] = field(default_factory=dict)
    local_issuing_ca: bool = True  # create one for Production on first start if it trusts no CA
    notice_interval: float = 300.0  # seconds between looks for due expiry notices

    @property
    def db_url(self) -> str:
        return self.db or str(self.data / "twofold.db")

    @property
    def response_key_path(self) -> Path:
        return Path(self.response_signing_key or self.data / "gateway" / "response-signing.key")

    @property
    def edge_sockets(self) -> Path | None:
        """Where the gateways listen for the edge (None: not behind an edge, or on ports)."""
        if self.edge is None or self.edge_proxies:
            return None
        return Path(self.edge_socket_dir) if self.edge_socket_dir else self.data / "edge"

    def gateway_port(self, env: dict[str, Any]) -> int | None:
        return self.ports.get(env["id"], env["gateway_port"]) or None

    @property
    def public_url(self) -> str:
        return (self.portal_url or f"https://localhost:{self.portal_port}").rstrip("/")

    @property
    def link_lifetime(self) -> dt.timedelta:
        if not 0 < self.link_lifetime_hours <= 24 * 30:
            raise UsageError("link_lifetime_hours must be more than 0 and at most 720 (30 days)")
        return dt.timedelta(hours=self.link_lifetime_hours)

    def mail_settings(self) -> MailSettings:
        """Checked now, so that a setting that cannot work stops `serve` at start."""
        return MailSettings(
            smtp=self.smtp,
            security=self.smtp_security,
            username=self.smtp_username,
            password=read_password(self.smtp_password_file) if self.smtp_username else None,
            sender=self.mail_from,
            cafile=self.smtp_cafile,
        ).check()

    def issuing_files(self) -> dict[str, IssuingFiles]:
        files = {}
        allowed = {"key", "cert", "passphrase_file"}
        for env_id, entry in self.issuing_ca.items():
            if not isinstance(entry, dict) or not {"key", "cert"} <= set(entry) or set(entry) - allowed:
                raise UsageError(
                    f'[issuing_ca.{env_id}] needs key = "…" and cert = "…" (and optionally '
                    'passphrase_file = "…")'
                )
            passphrase = entry.get("passphrase_file")
            files[env_id] = IssuingFiles(
                Path(entry["key"]), Path(entry["cert"]), Path(passphrase) if passphrase else None
            )
        return files

    @classmethod
    def load(cls, path: str | None, **overrides: Any) -> ServeConfig:
        """Defaults ← twofold.toml ← command-line options."""
        values: dict[str, Any] = {}
        if path:
            try:
                raw = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise UsageError(f"the configuration file {path} does not exist") from None
            except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
                raise UsageError(f"the configuration file {path} cannot be read: {exc}") from None
            except tomllib.TOMLDecodeError as exc:
                raise UsageError(f"{path} is not valid TOML: {exc}") from None
            known = {f.name for f in fields(cls)}
            unknown = set(raw) - known
            if unknown:
                raise UsageError(
                    f"{path}: unknown settings {', '.join(sorted(unknown))}; known: "
                    f"{', '.join(sorted(known))}"
                )
            _check_settings(path, raw)
            values.update(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data" in values:
            values["data"] = Path(values["data"])
        return replace(cls(), **values)


_PORT = (1, 65535)
_SETTINGS: dict[str, tuple[type | tuple[type, ...], tuple[float, float] | None]] = {
    "data": (str, None),
    "db": (str, None),
    "host": (str, None),
    "admin_host": (str, None),
    "portal_port": (int, _PORT),
    "admin_port": (int, _PORT),
    "workers": (int, (1, 64)),
    "max_body": (int, (1, 1 << 30)),
    "upstream_timeout": ((int, float), (0.001, 3600)),
    "access_log": (bool, None),
    # the connection limits: __post_init__ checks they are positive
    "header_timeout": ((int, float), None),
    "body_timeout": ((int, float), None),
    "idle_timeout": ((int, float), None),
    "max_connections": (int, None),
    "issuing_ca": (dict, None),
    "local_issuing_ca": (bool, None),
    "notice_interval": ((int, float), (0.001, 30 * 86400)),
    "registry_grace": ((int, float), (0.001, 30 * 86400)),
    "replay_durable": (bool, None),
    "link_lifetime_hours": ((int, float), (0.01, 24 * 30)),
    "edge_proxies": (list, None),  # __post_init__ checks each address or network
}


def _check_settings(path: str, raw: dict[str, Any]) -> None:
    """Each setting of a TOML file has the type (and range) of its command-line option."""
    for name, value in raw.items():
        if name == "ports":
            if not isinstance(value, dict) or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= _PORT[1]  # 0: no gateway
                for p in value.values()
            ):
                raise UsageError(
                    f"{path}: [ports] maps environments to port numbers (0: no gateway), e.g. cat = 8443"
                )
            continue
        kind, bounds = _SETTINGS.get(name, (str, None))  # the rest are strings (mail, URLs, files)
        wrong = not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)
        if not wrong and bounds is not None and not bounds[0] <= value <= bounds[1]:
            wrong = True
        if wrong:
            names: dict[object, str] = {
                str: "a string",
                int: "a whole number",
                bool: "true or false",
                dict: "a table",
                list: "a list of strings",
            }
            expected = names.get(kind, "a number")
            limits = f" from {bounds[0]:g} to {bounds[1]:g}" if bounds else ""
            raise UsageError(f"{path}: {name} must be {expected}{limits}, not {value!r}")
