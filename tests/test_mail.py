"""The mail path against a real SMTP server on loopback (aiosmtpd): plain (loopback only),
STARTTLS, implicit TLS, authentication; and the outbox used when no SMTP is configured."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from clientkit import free_port
from mailkit import SMTPServer, body, links, outbox
from twofold.errors import UsageError
from twofold.mail import MailError, MailSettings, OutboxMailer, SMTPMailer, make_mailer, read_password

TEXT = "Open https://portal.example/activate/abc123 within 72 hours.\n"


def _send(settings: MailSettings, to: str = "sec@acme.example") -> str:
    return asyncio.run(SMTPMailer(settings).send([to], "Your twofold invitation", TEXT))


@pytest.mark.parametrize("mode", ["plain", "starttls", "ssl"])
def test_delivers_through_each_kind_of_smtp_server(tmp_path: Path, mode: str) -> None:
    security = {"plain": "none", "starttls": "starttls", "ssl": "ssl"}[mode]
    with SMTPServer(tmp_path, mode=mode) as server:
        where = _send(MailSettings(smtp=server.address, security=security, cafile=str(server.cafile)))
        (message,) = server.wait_for(1)
    assert where == f"smtp://{server.address}"
    assert message["To"] == "sec@acme.example"
    assert message["Subject"] == "Your twofold invitation"
    assert message["Message-ID"]
    assert message["Date"]
    assert links(message) == ["https://portal.example/activate/abc123"]
    assert server.envelopes == [("no-reply@twofold.local", ["sec@acme.example"])]


def test_authenticates_after_starttls(tmp_path: Path) -> None:
    with SMTPServer(tmp_path, mode="starttls", users={"twofold": "s3cret-pass"}) as server:
        good = MailSettings(
            smtp=server.address, username="twofold", password="s3cret-pass", cafile=str(server.cafile)
        )
        _send(good)
        server.wait_for(1)
        with pytest.raises(MailError, match="refused the credentials of twofold") as refused:
            _send(
                MailSettings(
                    smtp=server.address, username="twofold", password="wrong", cafile=str(server.cafile)
                )
            )
    assert refused.value.code == "mail_failed"
    assert "wrong" not in refused.value.message


def test_an_untrusted_smtp_certificate_is_refused(tmp_path: Path) -> None:
    with SMTPServer(tmp_path, mode="starttls") as server, pytest.raises(MailError, match="TLS with the SMTP"):
        _send(MailSettings(smtp=server.address))  # system CAs do not know the test CA
    assert server.messages == []


def test_a_server_that_does_not_offer_starttls_is_refused(tmp_path: Path) -> None:
    with SMTPServer(tmp_path, mode="plain") as server, pytest.raises(MailError, match="does not support"):
        _send(MailSettings(smtp=server.address, security="starttls"))
    assert server.messages == []


def test_an_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(MailError, match="cannot reach the SMTP server"):
        _send(MailSettings(smtp=f"127.0.0.1:{free_port()}", security="none", timeout=2))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (MailSettings(smtp="mail.example.com"), "host:port"),
        (MailSettings(smtp="mail.example.com:99999"), "host:port"),
        (MailSettings(smtp="mail.example.com:25", security="none"), "only towards"),
        (MailSettings(smtp="127.0.0.1:25", security="plain"), "must be one of"),
        (MailSettings(smtp="mail.example.com:587", username="u"), "no password"),
        (MailSettings(smtp="mail.example.com:587", sender="nobody"), "not an e-mail address"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings: MailSettings, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        SMTPMailer(settings)


def test_header_injection_is_refused(tmp_path: Path) -> None:
    mailer = OutboxMailer(tmp_path / "outbox")
    with pytest.raises(UsageError, match="line breaks"):
        asyncio.run(mailer.send(["a@example.com"], "hi\r\nBcc: evil@example.com", TEXT))
    assert not (tmp_path / "outbox").exists() or not list((tmp_path / "outbox").iterdir())


def test_without_smtp_messages_go_to_the_outbox_privately(tmp_path: Path) -> None:
    mailer = make_mailer(MailSettings(), tmp_path)
    assert isinstance(mailer, OutboxMailer)
    first = asyncio.run(mailer.send(["a@example.com"], "one", TEXT))
    asyncio.run(mailer.send(["b@example.com"], "two", "second\n"))
    directory = tmp_path / "outbox"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(first).stat().st_mode) == 0o600
    assert not list(directory.glob("*.part"))
    messages = outbox(directory)
    assert [m["Subject"] for m in messages] == ["one", "two"]
    assert body(messages[0]) == TEXT
    assert links(messages[0]) == ["https://portal.example/activate/abc123"]


def test_an_unwritable_outbox_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "outbox"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(MailError, match="could not write the message"):
        asyncio.run(OutboxMailer(blocker).send(["a@example.com"], "x", TEXT))


def test_the_smtp_password_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "smtp-password"
    secret.write_text("from-the-file\n")
    monkeypatch.setenv("TWOFOLD_SMTP_PASSWORD", "from-the-env")
    assert read_password(str(secret)) == "from-the-file"
    assert read_password(None) == "from-the-env"
    with pytest.raises(UsageError, match="cannot read smtp_password_file"):
        read_password(str(tmp_path / "missing"))


def test_serve_settings_name_the_mail_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twofold.settings import ServeConfig

    password = tmp_path / "smtp-password"
    password.write_text("p4ss\n")
    toml = tmp_path / "twofold.toml"
    toml.write_text(
        'smtp = "mail.example.com:587"\nsmtp_username = "twofold"\n'
        f'smtp_password_file = "{password}"\nmail_from = "Bank portal <portal@bank.example>"\n'
        'portal_url = "https://developer.bank.example/"\n'
    )
    config = ServeConfig.load(str(toml))
    settings = config.mail_settings()
    assert (settings.smtp, settings.security, settings.username, settings.password) == (
        "mail.example.com:587",
        "starttls",
        "twofold",
        "p4ss",
    )
    assert settings.sender == "Bank portal <portal@bank.example>"
    assert config.public_url == "https://developer.bank.example"
    assert ServeConfig.load(None, portal_port=8123).public_url == "https://localhost:8123"
    toml.write_text('smtp = "mail.example.com:25"\nsmtp_security = "none"\n')
    with pytest.raises(UsageError, match="only towards"):
        ServeConfig.load(str(toml)).mail_settings()
