"""A real SMTP server on loopback (aiosmtpd) for the tests that follow mail: invitations,
password resets, expiry notices. It keeps every message it accepts, parsed."""

from __future__ import annotations

import email
import email.policy
import re
import ssl
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from clientkit import free_port
from twofold.crypto import certs
from twofold.crypto.ca import LocalCA
from twofold.tls import load_into_context

LINK = re.compile(r"https?://\S+")


class _Handler:
    def __init__(self, box: SMTPServer) -> None:
        self.box = box

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.box.changed:
            self.box.messages.append(message)
            self.box.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self.box.changed.notify_all()
        return "250 OK"


class SMTPServer:
    """``mode``: "plain", "starttls" (required before MAIL) or "ssl" (implicit TLS).
    ``users``: when given, AUTH is required with one of these name → password pairs."""

    def __init__(self, tmp: Path, *, mode: str = "plain", users: dict[str, str] | None = None) -> None:
        self.mode, self.users = mode, users
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.changed = threading.Condition()
        self.port = free_port()
        self.ca = LocalCA("test SMTP CA")
        self.cafile = tmp / "smtp-ca.pem"
        self.cafile.write_bytes(certs.certificate_pem(self.ca.certificate))
        issued = self.ca.issue("localhost", usage="server", sans=["DNS:localhost", "IP:127.0.0.1"])
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_into_context(tls, issued.key, issued.certificate)
        kwargs: dict[str, Any] = {}
        if mode == "starttls":
            kwargs.update(tls_context=tls, require_starttls=True)
        elif mode == "ssl":
            kwargs.update(ssl_context=tls, server_hostname="localhost")
        if users is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True)
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port, **kwargs)

    def _authenticate(self, _server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any) -> Any:
        ok = (
            isinstance(data, LoginPassword)
            and self.users is not None
            and self.users.get(data.login.decode()) == data.password.decode()
        )
        return AuthResult(success=ok, handled=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> SMTPServer:
        self.controller.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.controller.stop()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """Block until at least ``count`` messages arrived; returns them all."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.messages)} of {count} messages arrived in {timeout} s")
                self.changed.wait(left)
            return list(self.messages)


def body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None, "the message has no text/plain part"
    return str(part.get_content())  # type: ignore[attr-defined]


def links(message: EmailMessage) -> list[str]:
    """The URLs in a message's plain-text body, in order."""
    return LINK.findall(body(message))


def outbox(directory: Path) -> list[EmailMessage]:
    """The messages an OutboxMailer wrote, oldest first."""
    found = []
    for path in sorted(directory.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        found.append(message)
    return found
