"""Invitations and e-mailed links: operators invite an organisation's first users, API
Security users invite their colleagues (roles never above their own); an invited user
activates the account by choosing a password through a single-use link that expires. The
same kind of link resets a forgotten password.

Only the SHA-256 of a link's secret is stored. Opening a link (GET) changes nothing, so that
mail scanners that fetch links do not use them up; using it (choosing the password) marks it
used in one atomic UPDATE. A used, expired, unknown or tampered link gets one answer
(:class:`LinkInvalid`) that reveals nothing else, and asking for a new link answers the same
whether or not the address has an account.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry import audit
from twofold.registry.accounts import EMAIL, AccountsMixin, user_view
from twofold.registry.auth import (
    MFA_ROLES,
    OPERATOR,
    ROLE_LABELS,
    Principal,
    hash_password,
    new_secret,
    parse_roles,
    secret_hash,
)
from twofold.registry.models import AccountLink, ApiToken, Organisation, Session, User
from twofold.registry.rules import Conflict, Forbidden, RegistryError

DEFAULT_LINK_LIFETIME = dt.timedelta(hours=72)
RESEND_INTERVAL = dt.timedelta(seconds=60)  # at most one self-service link a minute per account
ACTIVATE, RESET = "activate", "reset"


class LinkInvalid(RegistryError):
    code = "link_invalid"
    status = 410

    def __init__(self) -> None:
        super().__init__(
            "this link cannot be used: it was already used, it has expired, or it was not copied "
            "completely; ask for a new one below"
        )


@dataclass(frozen=True)
class Link:
    """A link to send: ``token`` goes into the URL and nowhere else."""

    purpose: str  # activate | reset
    email: str
    token: str
    expires_at: dt.datetime
    organisation: str | None = None  # the organisation's display name
    inviter: str | None = None
    roles: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"/account/link/{self.token}"


class InvitationsMixin(AccountsMixin):
    """Invitations, activation links and password-reset links."""

    def _invitable_roles(self, actor: Principal, roles: frozenset[str], org: str | None) -> str | None:
        """The organisation the invitee joins (None: an operator); refuses roles above the
        inviter's own."""
        if not roles:
            raise RegistryError("give at least one role", code="role_invalid")
        if actor.is_operator:
            if OPERATOR in roles and org:
                raise RegistryError("operators do not belong to an organisation", code="role_invalid")
            if OPERATOR not in roles and not org:
                raise RegistryError("say which organisation the user joins", code="org_required")
            return org
        if not actor.manages_certificates:
            raise Forbidden(
                "only users with the API Security role may invite colleagues", code="api_security_only"
            )
        if org and org.strip().lower() != actor.org_slug:
            raise Forbidden("you can invite people to your own organisation only", code="forbidden")
        above = roles - actor.roles
        if above:
            labels = ", ".join(ROLE_LABELS[r] for r in sorted(actor.roles))
            raise Forbidden(
                f"you can give only roles you hold yourself ({labels}); ask a platform operator for more",
                code="role_ceiling",
            )
        return actor.org_slug

    async def invite(
        self,
        actor: Principal,
        email: str,
        *,
        org: str | None,
        roles: str | list[str],
        lifetime: dt.timedelta = DEFAULT_LINK_LIFETIME,
    ) -> Link:
        """Create the invited (pending) user and an activation link. Inviting a pending user
        again replaces the link (the old one stops working)."""
        email = email.strip().lower()
        if not EMAIL.match(email):
            raise RegistryError(f"{email!r} is not an email address", code="email_invalid")
        role_set = parse_roles(roles)
        org = self._invitable_roles(actor, role_set, org)
        self._need_second_factor(actor)

        async def work(session: AsyncSession) -> Link:
            org_row = await self._org_by_slug(session, org) if org else None
            org_id = org_row.id if org_row else None
            user = (await session.execute(select(User).where(User.email == email))).scalar()
            resent = user is not None
            if user is not None and not (user.pending_activation and user.org_id == org_id):
                raise Conflict(
                    f"{email} already has an account"
                    + ("" if actor.is_operator else "; ask a platform operator"),
                    code="user_exists",
                )
            if user is None:
                user = User(email=email, org_id=org_id, active=True, pending_activation=True, roles="")
                session.add(user)
            user.roles = ",".join(sorted(role_set))
            await session.flush()
            link = await self._new_link(session, user, ACTIVATE, actor.name, lifetime)
            await audit.append(
                session,
                actor=actor.name,
                action="user.invite",
                object_type="user",
                object_id=email,
                org_id=org_id,
                details={
                    "roles": sorted(role_set),
                    "expires_at": link.expires_at.isoformat(),
                    "resent": resent,
                },
            )
            return Link(
                ACTIVATE,
                email,
                link.token,
                link.expires_at,
                org_row.name if org_row else None,
                actor.name,
                tuple(sorted(role_set)),
            )

        return await self._tx(work)

    async def _new_link(
        self, session: AsyncSession, user: User, purpose: str, created_by: str, lifetime: dt.timedelta
    ) -> Link:
        """A new link for ``user``; earlier unused links of the user stop working."""
        now = self.clock()
        await session.execute(
            update(AccountLink)
            .where(AccountLink.user_id == user.id, AccountLink.used_at.is_(None))
            .values(used_at=now)
        )
        token = new_secret()
        session.add(
            AccountLink(
                user_id=user.id,
                purpose=purpose,
                token_hash=secret_hash(token),
                created_by=created_by,
                created_at=now,
                expires_at=now + lifetime,
            )
        )
        return Link(purpose, user.email, token, now + lifetime)

    async def list_invitations(self, actor: Principal, org: str | None = None) -> list[dict[str, Any]]:
        """Invited users who have not activated yet, with their link's expiry."""
        async with self.sessions() as session:
            latest = (
                select(AccountLink.user_id, func.max(AccountLink.expires_at).label("expires_at"))
                .where(AccountLink.purpose == ACTIVATE)
                .group_by(AccountLink.user_id)
                .subquery()
            )
            query = (
                select(User, Organisation.slug, latest.c.expires_at)
                .outerjoin(Organisation, User.org_id == Organisation.id)
                .outerjoin(latest, latest.c.user_id == User.id)
                .where(User.pending_activation.is_(True))
                .order_by(User.email)
            )
            if not actor.is_operator:
                query = query.where(User.org_id == actor.org_id)
            elif org:
                query = query.where(Organisation.slug == org.strip().lower())
            now = self.clock()
            rows = []
            for user, slug, expires in (await session.execute(query)).all():
                expires = expires.replace(tzinfo=dt.UTC) if expires and expires.tzinfo is None else expires
                rows.append(
                    {
                        **user_view(user, slug),
                        "link_expires_at": expires.isoformat() if expires else None,
                        "link_expired": expires is None or expires <= now,
                    }
                )
            return rows

    async def _valid_link(self, session: AsyncSession, token: str) -> tuple[AccountLink, User]:
        link = (
            await session.execute(select(AccountLink).where(AccountLink.token_hash == secret_hash(token)))
        ).scalar()
        user = await session.get(User, link.user_id) if link is not None else None
        if link is None or user is None or link.used_at is not None or link.expires_at <= self.clock():
            raise LinkInvalid()
        if not user.active or (link.purpose == ACTIVATE) != bool(user.pending_activation):
            raise LinkInvalid()
        return link, user

    async def check_link(self, token: str) -> dict[str, Any]:
        """What a link is for (nothing is changed): ``{"purpose", "email"}``; LinkInvalid if
        it cannot be used."""
        async with self.sessions() as session:
            link, user = await self._valid_link(session, token)
            return {
                "purpose": link.purpose,
                "email": user.email,
                "mfa_required": bool(set(user.roles.split(",")) & MFA_ROLES),
            }

    async def use_link(self, token: str, password: str) -> tuple[Principal, dict[str, Any]]:
        """Choose the password through a link (once). Every session of the user ends; API
        tokens and the second factor stay as they are. Returns the user and what was done."""
        if len(password) < 10:
            raise RegistryError("passwords need at least 10 characters", code="password_weak")
        async with self.sessions() as session:
            await self._valid_link(session, token)  # refuse before spending time on argon2
        hashed = await asyncio.to_thread(hash_password, password)

        async def work(session: AsyncSession) -> tuple[Principal, dict[str, Any]]:
            link, user = await self._valid_link(session, token)
            now = self.clock()
            claimed = await session.execute(
                update(AccountLink)
                .where(AccountLink.id == link.id, AccountLink.used_at.is_(None))
                .values(used_at=now)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                raise LinkInvalid()
            user.password_hash = hashed
            user.must_change_password = False
            user.pending_activation = False
            ended = await session.execute(delete(Session).where(Session.user_id == user.id))
            tokens = await session.execute(
                select(func.count())
                .select_from(ApiToken)
                .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
            )
            done = {
                "purpose": link.purpose,
                "sessions_ended": int(ended.rowcount or 0),  # type: ignore[attr-defined]
                "tokens_kept": int(tokens.scalar() or 0),
                "second_factor_kept": user.totp_enabled_at is not None,
            }
            await audit.append(
                session,
                actor=user.email,
                action="user.activate_link" if link.purpose == ACTIVATE else "user.password_reset",
                object_type="user",
                object_id=user.email,
                org_id=user.org_id,
                details=done,
            )
            return await self._principal_for(session, user, mfa_passed=False), done

        return await self._tx(work)

    async def request_link(self, email: str, lifetime: dt.timedelta = DEFAULT_LINK_LIFETIME) -> Link | None:
        """Self-service: a new activation link (not yet activated) or a password-reset link.
        None when there is nothing to send — unknown or deactivated address, or a link was
        sent less than a minute ago; the caller answers the same either way."""
        email = email.strip().lower()

        async def work(session: AsyncSession) -> Link | None:
            user = (await session.execute(select(User).where(User.email == email))).scalar()
            if user is None or not user.active:
                return None
            recent = await session.execute(
                select(func.count())
                .select_from(AccountLink)
                .where(
                    AccountLink.user_id == user.id, AccountLink.created_at > self.clock() - RESEND_INTERVAL
                )
            )
            if recent.scalar():
                return None
            purpose = ACTIVATE if user.pending_activation else RESET
            link = await self._new_link(session, user, purpose, email, lifetime)
            await audit.append(
                session,
                actor=email,
                action="user.link_request",
                object_type="user",
                object_id=email,
                org_id=user.org_id,
                details={"purpose": purpose, "expires_at": link.expires_at.isoformat()},
            )
            org = await session.get(Organisation, user.org_id) if user.org_id else None
            roles = tuple(sorted(r for r in user.roles.split(",") if r))
            return Link(purpose, email, link.token, link.expires_at, org.name if org else None, None, roles)

        return await self._tx(work)
