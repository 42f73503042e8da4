"""Outgoing mail: invitations, password resets, expiry notices.

Two transports behind one interface, :class:`Mailer`:

* :class:`SMTPMailer` — a real SMTP server (``smtp = "host:port"`` in the settings), with
  STARTTLS (default), implicit TLS (``smtp_security = "ssl"``) or, on loopback only, none;
  credentials from the settings (the password from a file or ``TWOFOLD_SMTP_PASSWORD``, never
  from the TOML file itself).
* :class:`OutboxMailer` — with no SMTP configured (the embedded default), each message is
  written to ``<data>/outbox/`` as an ``.eml`` file (0600: messages carry single-use links), so
  the whole flow works on one machine. Nothing is sent anywhere.

Messages are plain text (links must be copyable); the body is never logged — a log line
names the recipient, the subject and where the message went.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import ipaddress
import logging
import os
import secrets
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from twofold.errors import TwofoldError, UsageError

log = logging.getLogger("twofold.mail")
SECURITIES = ("starttls", "ssl", "none")
DEFAULT_SENDER = "twofold <no-reply@twofold.local>"


class MailError(TwofoldError):
    """A message could not be delivered to the SMTP server (or written to the outbox)."""

    code = "mail_failed"
    status = 503


@dataclass(frozen=True)
class MailSettings:
    """Where mail goes. ``smtp=None`` means the outbox directory."""

    smtp: str | None = None  # "host:port"
    security: str = "starttls"  # starttls | ssl | none (none only towards loopback)
    username: str | None = None
    password: str | None = None
    sender: str = DEFAULT_SENDER
    cafile: str | None = None  # CA bundle for the SMTP server's certificate (default: system)
    timeout: float = 10.0

    def address(self) -> tuple[str, int]:
        if not self.smtp:
            raise UsageError("no SMTP server is configured")
        host, sep, port = self.smtp.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"smtp = {self.smtp!r}: give it as host:port, e.g. mail.example.com:587")
        return host.strip("[]"), int(port)

    def check(self) -> MailSettings:
        """Refuse settings that cannot work or would send credentials in the clear."""
        if self.smtp is None:
            return self
        host, _port = self.address()
        if self.security not in SECURITIES:
            raise UsageError(f"smtp_security must be one of {', '.join(SECURITIES)}")
        if self.security == "none" and not _is_loopback(host):
            raise UsageError(
                f"smtp_security = 'none' sends mail in the clear; it is allowed only towards "
                f"loopback, not {host}: use 'starttls' or 'ssl'"
            )
        if self.username and self.password is None:
            raise UsageError(
                "smtp_username is set but no password: give smtp_password_file or TWOFOLD_SMTP_PASSWORD"
            )
        if "@" not in self.sender:
            raise UsageError(f"mail_from = {self.sender!r} is not an e-mail address")
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_message(sender: str, to: Sequence[str], subject: str, text: str) -> EmailMessage:
    for header in (subject, *to):
        if "\n" in header or "\r" in header:  # header injection
            raise UsageError("mail headers cannot contain line breaks")
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Date"] = email.utils.format_datetime(dt.datetime.now(dt.UTC))
    domain = sender.rpartition("@")[2].strip(">") or "twofold.local"
    message["Message-ID"] = email.utils.make_msgid(domain=domain)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    return message


class Mailer(Protocol):
    sender: str

    async def send(self, to: Sequence[str], subject: str, text: str) -> str:
        """Deliver one message; returns where it went (for the console and the tests)."""
        ...


class OutboxMailer:
    """Writes each message to a directory as an ``.eml`` file instead of sending it."""

    def __init__(self, directory: Path, sender: str = DEFAULT_SENDER) -> None:
        self.directory = directory
        self.sender = sender

    async def send(self, to: Sequence[str], subject: str, text: str) -> str:
        message = build_message(self.sender, to, subject, text)
        path = await asyncio.to_thread(self._write, message)
        log.info("mail to %s (%s) written to %s", ", ".join(to), subject, path)
        return str(path)

    def _write(self, message: EmailMessage) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%f")
        final = self.directory / f"{stamp}-{secrets.token_hex(4)}.eml"
        partial = final.with_suffix(".part")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(message.as_bytes())
            os.replace(partial, final)  # a reader never sees half a message
        except OSError as exc:
            raise MailError(f"could not write the message to {self.directory}: {exc.strerror}") from None
        return final


class SMTPMailer:
    """Sends through an SMTP server; ``smtplib`` runs in a thread, off the event loop."""

    def __init__(self, settings: MailSettings) -> None:
        self.settings = settings.check()
        self.sender = settings.sender

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.settings.cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def send(self, to: Sequence[str], subject: str, text: str) -> str:
        message = build_message(self.sender, to, subject, text)
        await asyncio.to_thread(self._deliver, message)
        log.info("mail to %s (%s) sent via %s", ", ".join(to), subject, self.settings.smtp)
        return f"smtp://{self.settings.smtp}"

    def _deliver(self, message: EmailMessage) -> None:
        s = self.settings
        host, port = s.address()
        try:
            client: smtplib.SMTP
            if s.security == "ssl":
                client = smtplib.SMTP_SSL(host, port, timeout=s.timeout, context=self._tls())
            else:
                client = smtplib.SMTP(host, port, timeout=s.timeout)
            with client:
                client.ehlo()
                if s.security == "starttls":
                    client.starttls(context=self._tls())
                    client.ehlo()
                if s.username:
                    client.login(s.username, s.password or "")
                client.send_message(message)
        except smtplib.SMTPAuthenticationError:
            raise MailError(f"the SMTP server {s.smtp} refused the credentials of {s.username}") from None
        except smtplib.SMTPNotSupportedError as exc:
            raise MailError(f"the SMTP server {s.smtp} does not support {exc}") from None
        except smtplib.SMTPException as exc:
            raise MailError(f"the SMTP server {s.smtp} refused the message: {exc}") from None
        except ssl.SSLError as exc:
            raise MailError(
                f"TLS with the SMTP server {s.smtp} failed ({exc.reason}); check smtp_security "
                "and smtp_cafile"
            ) from None
        except OSError as exc:
            raise MailError(f"cannot reach the SMTP server {s.smtp}: {exc}") from None


def make_mailer(settings: MailSettings, data: Path) -> Mailer:
    """The SMTP mailer when a server is configured, else the outbox in the data directory."""
    if settings.smtp:
        return SMTPMailer(settings)
    return OutboxMailer(data / "outbox", settings.sender)


def read_password(path: str | None) -> str | None:
    """The SMTP password: from a file (first line), else ``TWOFOLD_SMTP_PASSWORD``."""
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read smtp_password_file {path}: {exc.strerror}") from None
        return text.splitlines()[0] if text else ""
    return os.environ.get("TWOFOLD_SMTP_PASSWORD")
