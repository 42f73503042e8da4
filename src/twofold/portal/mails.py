"""The messages the portal sends: invitations and password-reset links (plain text, the
link on a line of its own so that it can be copied). Used by the pages, the JSON API and
`twofold admin user invite`, through the one :class:`~twofold.mail.Mailer`."""

from __future__ import annotations

import asyncio
import logging

from twofold.errors import TwofoldError
from twofold.mail import Mailer
from twofold.registry.auth import ROLE_LABELS
from twofold.registry.invitations import ACTIVATE, Link

log = logging.getLogger("twofold.portal")
_pending: set[asyncio.Task[None]] = set()


def link_url(public_url: str, link: Link) -> str:
    return public_url.rstrip("/") + link.path


def _expiry(link: Link) -> str:
    return link.expires_at.strftime("%Y-%m-%d %H:%M UTC")


def compose(link: Link, public_url: str, title: str = "twofold developer portal") -> tuple[str, str]:
    """(subject, text) of the message carrying ``link``."""
    url = link_url(public_url, link)
    again = f"{public_url.rstrip('/')}/account/recover"
    if link.purpose == ACTIVATE:
        roles = ", ".join(ROLE_LABELS.get(r, r) for r in link.roles)
        where = f" for {link.organisation}" if link.organisation else ""
        inviter = f"{link.inviter} invited you" if link.inviter else "You were invited"
        second = (
            "\nAs an API Security user you will also set up an authenticator app (a second factor)."
            if "api_security" in link.roles or "operator" in link.roles
            else ""
        )
        return (
            f"You are invited to the {title}",
            f"{inviter} to the {title}{where} ({roles}).\n\n"
            f"Open this link to choose your password and activate your account:\n\n{url}\n\n"
            f"The link works once and until {_expiry(link)}.{second}\n"
            f"If it has expired, ask for a new one at {again}\n\n"
            "If you did not expect this invitation, ignore this message.\n",
        )
    return (
        f"Reset your password for the {title}",
        f"Someone (hopefully you) asked to reset the password of {link.email}.\n\n"
        f"Open this link to choose a new password:\n\n{url}\n\n"
        f"The link works once and until {_expiry(link)}. Choosing a new password signs you out "
        "everywhere; your API tokens and your second factor stay as they are.\n\n"
        "If you did not ask for this, ignore this message: your password stays as it is.\n",
    )


def require_mailer(mailer: Mailer | None) -> Mailer:
    """Checked before an invitation is made, so that none is made that cannot be sent."""
    if mailer is None:
        raise TwofoldError(
            "this portal sends no mail; an operator can hand out a one-time password instead",
            code="mail_unavailable",
            status=503,
        )
    return mailer


async def send_link(mailer: Mailer | None, public_url: str, link: Link) -> str:
    """Send the link; returns where the message went (an outbox file, or the SMTP server)."""
    mailer = require_mailer(mailer)
    subject, text = compose(link, public_url)
    return await mailer.send([link.email], subject, text)


def send_in_background(mailer: Mailer | None, public_url: str, link: Link) -> None:
    """Send without making the caller wait: a self-service request answers at once and the
    same whether or not a message goes out (its timing reveals nothing)."""

    async def send() -> None:
        try:
            await send_link(mailer, public_url, link)
        except Exception as exc:
            log.warning("could not send the %s link (%s)", link.purpose, type(exc).__name__)

    task = asyncio.get_running_loop().create_task(send())
    _pending.add(task)
    task.add_done_callback(_pending.discard)
