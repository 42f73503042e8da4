"""The registry: every change and every read of the provider side's source of truth.

Authorisation is decided here, for every caller (pages, JSON API, CLI): each method takes
the acting :class:`Principal`. Organisation users see and change only their own
organisation; API Security users manage certificates; Developers manage projects;
operators manage organisations, users, environments and products.

One class, :class:`Registry`, composed of one mixin per aggregate (each in its own module):
sessions and tokens, accounts, invitations and links, the second factor, the catalogue,
projects, certificates (and their issuance from CSRs), expiry notices, the sandbox's payments,
recent gateway calls and dashboards, the provider's published signing keys;
their foundation (engine, transactions, audit) is :mod:`twofold.registry.base`.
"""

from __future__ import annotations

from twofold.registry.accounts import SESSION_LIFETIME, AccountsMixin, user_view
from twofold.registry.base import NOTIFY_CHANNEL, RegistryBase
from twofold.registry.calls import CallRecord, CallsMixin
from twofold.registry.catalogue import (
    DEFAULT_CONTENT_TYPES,
    DEFAULT_ENVIRONMENTS,
    SIGNATURE_POLICIES,
    CatalogueMixin,
    env_view,
    product_view,
)
from twofold.registry.certificates import cert_view
from twofold.registry.invitations import DEFAULT_LINK_LIFETIME, InvitationsMixin, Link, LinkInvalid
from twofold.registry.issuance import IssuanceMixin
from twofold.registry.mfa import MfaMixin
from twofold.registry.notices import NoticesMixin
from twofold.registry.payments import PaymentsMixin
from twofold.registry.projects import ProjectsMixin
from twofold.registry.rules import USES
from twofold.registry.signing_keys import SigningKeysMixin


class Registry(
    InvitationsMixin,
    MfaMixin,
    AccountsMixin,
    CatalogueMixin,
    ProjectsMixin,
    IssuanceMixin,
    NoticesMixin,
    PaymentsMixin,
    CallsMixin,
    SigningKeysMixin,
):
    """Open with :meth:`open` (runs migrations), close with :meth:`close`."""


__all__ = [
    "DEFAULT_CONTENT_TYPES",
    "DEFAULT_ENVIRONMENTS",
    "DEFAULT_LINK_LIFETIME",
    "NOTIFY_CHANNEL",
    "SESSION_LIFETIME",
    "SIGNATURE_POLICIES",
    "USES",
    "CallRecord",
    "Link",
    "LinkInvalid",
    "Registry",
    "RegistryBase",
    "cert_view",
    "env_view",
    "product_view",
    "user_view",
]
