"""The registry: every change and every read of the provider side's source of truth.

Authorisation is decided here, for every caller (pages, JSON API, CLI): each method takes
the acting :class:`Principal`. Organisation users see and change only their own
organisation; API Security users manage certificates; Developers manage projects;
operators manage organisations, users, environments and products.

One class, :class:`Registry`, composed of one mixin per aggregate (each in its own module):
sessions and tokens, accounts, the catalogue, projects, certificates (and their issuance from
CSRs), expiry notices, the sandbox's payments, the provider's published signing keys;
their foundation (engine, transactions, audit) is :mod:`twofold.registry.base`.
"""

from __future__ import annotations

from twofold.registry.accounts import SESSION_LIFETIME, AccountsMixin, user_view
from twofold.registry.base import NOTIFY_CHANNEL, RegistryBase
from twofold.registry.catalogue import (
    DEFAULT_CONTENT_TYPES,
    DEFAULT_ENVIRONMENTS,
    SIGNATURE_POLICIES,
    CatalogueMixin,
    env_view,
    product_view,
)
from twofold.registry.certificates import cert_view
from twofold.registry.issuance import IssuanceMixin
from twofold.registry.notices import NoticesMixin
from twofold.registry.payments import PaymentsMixin
from twofold.registry.projects import ProjectsMixin
from twofold.registry.rules import USES
from twofold.registry.signing_keys import SigningKeysMixin


class Registry(
    AccountsMixin,
    CatalogueMixin,
    ProjectsMixin,
    IssuanceMixin,
    NoticesMixin,
    PaymentsMixin,
    SigningKeysMixin,
):
    """Open with :meth:`open` (runs migrations), close with :meth:`close`."""


__all__ = [
    "DEFAULT_CONTENT_TYPES",
    "DEFAULT_ENVIRONMENTS",
    "NOTIFY_CHANNEL",
    "SESSION_LIFETIME",
    "SIGNATURE_POLICIES",
    "USES",
    "Registry",
    "RegistryBase",
    "cert_view",
    "env_view",
    "product_view",
    "user_view",
]
