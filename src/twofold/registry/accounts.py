"""Accounts: organisations, users, passwords, sessions and API tokens."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry import audit
from twofold.registry.auth import (
    OPERATOR,
    ROLE_LABELS,
    TOKEN_PREFIX,
    Principal,
    check_password,
    hash_password,
    new_secret,
    parse_roles,
    secret_hash,
)
from twofold.registry.base import RegistryBase, _slug
from twofold.registry.models import (
    AccountLink,
    ApiToken,
    Certificate,
    CnOwner,
    GatewayCall,
    GatewayFirstSuccess,
    Organisation,
    Project,
    ProjectProduct,
    RecoveryCode,
    SandboxPayment,
    Session,
    User,
    utcnow,
)
from twofold.registry.rules import (
    Conflict,
    Forbidden,
    NotFound,
    RegistryError,
    Unauthorized,
)

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SESSION_LIFETIME = dt.timedelta(hours=8)


def user_view(row: User, org_slug: str | None) -> dict[str, Any]:
    roles = sorted(r for r in row.roles.split(",") if r)
    return {
        "id": row.id,
        "email": row.email,
        "organisation": org_slug,
        "roles": roles,
        "role_labels": [ROLE_LABELS[r] for r in roles],
        "active": row.active,
        "pending_activation": bool(row.pending_activation),
        "second_factor": row.totp_enabled_at is not None,
        "created_at": row.created_at.isoformat(),
    }


class SessionsMixin(RegistryBase):
    """Sign-in, browser sessions and personal API tokens."""

    async def has_operator(self) -> bool:
        async with self.sessions() as session:
            rows = (await session.execute(select(User.roles).where(User.active.is_(True)))).scalars()
            return any(OPERATOR in r.split(",") for r in rows)

    # --- authentication ---------------------------------------------------------------------

    async def _principal_for(self, session: AsyncSession, user: User, *, mfa_passed: bool) -> Principal:
        slug = None
        if user.org_id is not None:
            slug = (
                await session.execute(select(Organisation.slug).where(Organisation.id == user.org_id))
            ).scalar()
        return Principal(
            user.email,
            user.id,
            user.org_id,
            slug,
            frozenset(r for r in user.roles.split(",") if r),
            bool(user.must_change_password),
            mfa_enrolled=user.totp_enabled_at is not None,
            mfa_passed=mfa_passed,
        )

    async def authenticate(self, email: str, password: str) -> Principal:
        async with self.sessions() as session:
            user = (await session.execute(select(User).where(User.email == email.strip().lower()))).scalar()
            # argon2 costs ~0.1 s of CPU by design: keep it off the event loop.
            ok = await asyncio.to_thread(check_password, user.password_hash if user else None, password)
            if not user or not ok or not user.active:
                raise Unauthorized("wrong email or password", code="login_failed")
            return await self._principal_for(session, user, mfa_passed=False)

    async def create_session(self, principal: Principal) -> tuple[str, str]:
        """A new session: (cookie value, CSRF token). Only the cookie's hash is stored."""
        cookie, csrf = new_secret(), new_secret()

        async def work(session: AsyncSession) -> None:
            await session.execute(delete(Session).where(Session.expires_at < utcnow()))
            session.add(
                Session(
                    id_hash=secret_hash(cookie),
                    user_id=principal.user_id,
                    csrf_token=csrf,
                    expires_at=utcnow() + SESSION_LIFETIME,
                )
            )
            await audit.append(
                session,
                actor=principal.name,
                action="session.create",
                object_type="user",
                object_id=principal.name,
                org_id=principal.org_id,
            )

        await self._tx(work)
        return cookie, csrf

    async def session_principal(self, cookie: str) -> tuple[Principal, str] | None:
        async with self.sessions() as session:
            row = (
                await session.execute(select(Session).where(Session.id_hash == secret_hash(cookie)))
            ).scalar()
            if row is None or row.expires_at < utcnow():
                return None
            user = await session.get(User, row.user_id)
            if user is None or not user.active:
                return None
            principal = await self._principal_for(session, user, mfa_passed=row.mfa_at is not None)
            return principal, row.csrf_token

    async def end_session(self, cookie: str) -> None:
        async def work(session: AsyncSession) -> None:
            await session.execute(delete(Session).where(Session.id_hash == secret_hash(cookie)))

        await self._tx(work)

    async def create_token(self, actor: Principal, name: str = "api", *, for_email: str | None = None) -> str:
        """A personal API token (shown once). Operators may create one for another user."""
        self._need_second_factor(actor)
        token = new_secret(TOKEN_PREFIX)

        async def work(session: AsyncSession) -> None:
            email = (for_email or actor.name).strip().lower()
            if email != actor.name and not actor.is_operator:
                raise Forbidden("only operators may create tokens for other users")
            user = await self._user_by_email(session, email)
            session.add(
                ApiToken(
                    user_id=user.id,
                    name=name[:100] or "api",
                    prefix=token[:10],
                    token_hash=secret_hash(token),
                )
            )
            await audit.append(
                session,
                actor=actor.name,
                action="token.create",
                object_type="user",
                object_id=email,
                org_id=user.org_id,
                details={"name": name, "prefix": token[:10]},
            )

        await self._tx(work)
        return token

    async def token_principal(self, token: str) -> Principal:
        if not token.startswith(TOKEN_PREFIX):
            raise Unauthorized(
                "the API token is malformed; create one with `twofold admin token new` or on "
                "the portal's Tokens page",
                code="token_invalid",
            )
        async with self.sessions() as session:
            row = (
                await session.execute(select(ApiToken).where(ApiToken.token_hash == secret_hash(token)))
            ).scalar()
            if row is None or row.revoked_at is not None:
                raise Unauthorized("the API token is unknown or revoked", code="token_invalid")
            user = await session.get(User, row.user_id)
            if user is None or not user.active:
                raise Unauthorized("the API token's user is deactivated", code="token_invalid")
            principal = await self._principal_for(session, user, mfa_passed=True)
        return principal

    async def list_tokens(self, actor: Principal) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(ApiToken).where(ApiToken.user_id == actor.user_id).order_by(ApiToken.id)
                )
            ).scalars()
            return [
                {
                    "id": r.id,
                    "name": r.name,
                    "prefix": r.prefix,
                    "created_at": r.created_at.isoformat(),
                    "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None,
                    "revoked": r.revoked_at is not None,
                }
                for r in rows
            ]

    async def revoke_token(self, actor: Principal, token_id: int) -> None:
        async def work(session: AsyncSession) -> None:
            row = await session.get(ApiToken, token_id)
            if row is None or row.user_id != actor.user_id:
                raise NotFound("no such token", code="token_not_found")
            row.revoked_at = utcnow()
            await audit.append(
                session,
                actor=actor.name,
                action="token.revoke",
                object_type="token",
                object_id=row.prefix,
                org_id=actor.org_id,
            )

        await self._tx(work)


class AccountsMixin(SessionsMixin):
    """Organisations and their users: creation, passwords, roles, deactivation."""

    async def add_org(self, actor: Principal, slug: str, name: str | None = None) -> dict[str, Any]:
        self._need_operator(actor)
        slug = _slug(slug, "the organisation id")

        async def work(session: AsyncSession) -> dict[str, Any]:
            if (await session.execute(select(Organisation).where(Organisation.slug == slug))).scalar():
                raise Conflict(f"organisation {slug} already exists", code="org_exists")
            org = Organisation(slug=slug, name=(name or slug).strip()[:200])
            session.add(org)
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="org.create",
                object_type="organisation",
                object_id=slug,
                org_id=org.id,
                details={"name": org.name},
            )
            return {"id": org.id, "slug": org.slug, "name": org.name}

        return await self._tx(work)

    async def delete_org(self, actor: Principal, slug: str) -> dict[str, Any]:
        """Delete an organisation with everything it owns — users (their sessions and tokens),
        projects, removed certificates, sandbox payments — operators only, and only once it
        has no active certificate (removing those is a step of its own, seen by gateways).
        The audit log keeps every event, the deletion too."""
        self._need_operator(actor)

        async def work(session: AsyncSession) -> dict[str, Any]:
            org = await self._org_by_slug(session, slug)
            active = (
                await session.execute(
                    select(func.count())
                    .select_from(Certificate)
                    .where(Certificate.org_id == org.id, Certificate.status == "active")
                )
            ).scalar()
            if active:
                raise Conflict(
                    f"organisation {org.slug} still has {active} active certificate(s): remove them "
                    "first (Security page, or twofold portal cert rm)",
                    code="org_has_certificates",
                )
            user_ids = select(User.id).where(User.org_id == org.id).scalar_subquery()
            project_ids = select(Project.id).where(Project.org_id == org.id).scalar_subquery()
            users = int(
                (await session.execute(select(func.count()).where(User.org_id == org.id))).scalar() or 0
            )
            await session.execute(delete(Session).where(Session.user_id.in_(user_ids)))
            await session.execute(delete(ApiToken).where(ApiToken.user_id.in_(user_ids)))
            await session.execute(delete(AccountLink).where(AccountLink.user_id.in_(user_ids)))
            await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id.in_(user_ids)))
            await session.execute(delete(User).where(User.org_id == org.id))
            await session.execute(delete(GatewayCall).where(GatewayCall.org_id == org.id))
            await session.execute(delete(GatewayFirstSuccess).where(GatewayFirstSuccess.org_id == org.id))
            await session.execute(delete(ProjectProduct).where(ProjectProduct.project_id.in_(project_ids)))
            await session.execute(delete(Project).where(Project.org_id == org.id))
            await session.execute(delete(Certificate).where(Certificate.org_id == org.id))
            await session.execute(delete(CnOwner).where(CnOwner.org_id == org.id))
            await session.execute(delete(SandboxPayment).where(SandboxPayment.org_id == org.id))
            await session.delete(org)
            await audit.append(
                session,
                actor=actor.name,
                action="org.delete",
                object_type="organisation",
                object_id=org.slug,
                org_id=org.id,
                details={"name": org.name, "users": users},
            )
            await self._bump(session)
            return {"slug": org.slug, "name": org.name, "users": users}

        return await self._tx(work)

    async def list_orgs(self, actor: Principal) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            query = select(Organisation).order_by(Organisation.slug)
            if not actor.is_operator:
                query = query.where(Organisation.id == actor.org_id)
            return [
                {"id": o.id, "slug": o.slug, "name": o.name, "created_at": o.created_at.isoformat()}
                for o in (await session.execute(query)).scalars()
            ]

    async def add_user(
        self,
        actor: Principal,
        email: str,
        *,
        org: str | None,
        roles: str | list[str],
        password: str | None,
        one_time: bool = False,
    ) -> dict[str, Any]:
        """``one_time``: the password was generated and shown once; the portal asks for a new
        one at first sign-in."""
        self._need_operator(actor)
        email = email.strip().lower()
        if not EMAIL.match(email):
            raise RegistryError(f"{email!r} is not an email address", code="email_invalid")
        role_set = parse_roles(roles)
        if not role_set:
            raise RegistryError("give at least one role", code="role_invalid")
        if OPERATOR in role_set and org:
            raise RegistryError("operators do not belong to an organisation", code="role_invalid")
        if OPERATOR not in role_set and not org:
            raise RegistryError("organisation users need --org", code="org_required")
        if password is not None and len(password) < 10:
            raise RegistryError("passwords need at least 10 characters", code="password_weak")

        hashed = await asyncio.to_thread(hash_password, password) if password else None

        async def work(session: AsyncSession) -> dict[str, Any]:
            org_row = await self._org_by_slug(session, org) if org else None
            if (await session.execute(select(User).where(User.email == email))).scalar():
                raise Conflict(f"a user {email} already exists", code="user_exists")
            user = User(
                email=email,
                org_id=org_row.id if org_row else None,
                roles=",".join(sorted(role_set)),
                password_hash=hashed,
                active=True,
                must_change_password=one_time and password is not None,
            )
            session.add(user)
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="user.create",
                object_type="user",
                object_id=email,
                org_id=user.org_id,
                details={"roles": sorted(role_set)},
            )
            return user_view(user, org_row.slug if org_row else None)

        return await self._tx(work)

    async def set_password(
        self, actor: Principal, email: str, password: str, *, one_time: bool = False
    ) -> None:
        email = email.strip().lower()
        if email != actor.name:
            self._need_operator(actor)
        if len(password) < 10:
            raise RegistryError("passwords need at least 10 characters", code="password_weak")

        hashed = await asyncio.to_thread(hash_password, password)

        async def work(session: AsyncSession) -> None:
            user = await self._user_by_email(session, email)
            user.password_hash = hashed
            user.must_change_password = one_time
            user.pending_activation = False  # an operator's one-time password activates too
            await session.execute(delete(Session).where(Session.user_id == user.id))
            revoked = 0
            if email != actor.name:  # an operator's reset (a suspected compromise): tokens go too
                revoked = await self._revoke_all_tokens(session, user.id)
            await audit.append(
                session,
                actor=actor.name,
                action="user.password",
                object_type="user",
                object_id=email,
                org_id=user.org_id,
                details={"tokens_revoked": revoked},
            )

        await self._tx(work)

    async def change_own_password(self, actor: Principal, current: str, new: str) -> None:
        """A signed-in user replaces their password (the current one is asked again)."""
        if actor.user_id is None:
            raise Forbidden("this account has no password")
        await self.authenticate(actor.name, current)  # Unauthorized if wrong
        if new == current:
            raise RegistryError("choose a password different from the current one", code="password_unchanged")
        await self.set_password(actor, actor.name, new)

    async def replace_one_time_password(self, actor: Principal, new: str) -> None:
        """The first sign-in with a one-time password: the user chooses their own without typing
        the one-time one again — the session they just opened with it is the proof. Every
        session ends (the caller opens a new one for this browser)."""
        if actor.user_id is None:
            raise Forbidden("this account has no password")
        async with self.sessions() as session:
            user = await session.get(User, actor.user_id)
            if user is None or not user.must_change_password:
                raise Forbidden(
                    "your password is not a one-time password: give the current one to change it",
                    code="current_password_required",
                )
            old_hash = user.password_hash
        if await asyncio.to_thread(check_password, old_hash, new):
            raise RegistryError(
                "choose a password of your own, not the one-time password", code="password_unchanged"
            )
        await self.set_password(actor, actor.name, new)

    @staticmethod
    async def _revoke_all_tokens(session: AsyncSession, user_id: int) -> int:
        result = await session.execute(
            update(ApiToken)
            .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def set_active(self, actor: Principal, email: str, *, active: bool) -> dict[str, Any]:
        """Deactivate a user (operators): sessions end and API tokens are revoked at once;
        sign-in is refused until reactivated. Reactivation restores sign-in, not tokens."""
        self._need_operator(actor)
        email = email.strip().lower()
        if email == actor.name and not active:
            raise RegistryError("operators cannot deactivate themselves", code="self_deactivation")

        async def work(session: AsyncSession) -> dict[str, Any]:
            user = await self._user_by_email(session, email)
            user.active = active
            revoked = 0
            if not active:
                await session.execute(delete(Session).where(Session.user_id == user.id))
                revoked = await self._revoke_all_tokens(session, user.id)
            await audit.append(
                session,
                actor=actor.name,
                action="user.activate" if active else "user.deactivate",
                object_type="user",
                object_id=email,
                org_id=user.org_id,
                details={"tokens_revoked": revoked},
            )
            slug = (await session.get(Organisation, user.org_id)).slug if user.org_id else None  # type: ignore[union-attr]
            return user_view(user, slug)

        return await self._tx(work)

    async def revoke_user_tokens(self, actor: Principal, email: str) -> int:
        """Revoke every API token of a user (operators, or the user themself)."""
        email = email.strip().lower()
        if email != actor.name:
            self._need_operator(actor)

        async def work(session: AsyncSession) -> int:
            user = await self._user_by_email(session, email)
            revoked = await self._revoke_all_tokens(session, user.id)
            await audit.append(
                session,
                actor=actor.name,
                action="token.revoke_all",
                object_type="user",
                object_id=email,
                org_id=user.org_id,
                details={"tokens_revoked": revoked},
            )
            return revoked

        return await self._tx(work)

    async def set_roles(self, actor: Principal, email: str, roles: str | list[str]) -> dict[str, Any]:
        self._need_operator(actor)
        role_set = parse_roles(roles)

        async def work(session: AsyncSession) -> dict[str, Any]:
            user = await self._user_by_email(session, email)
            if (OPERATOR in role_set) != (user.org_id is None):
                raise RegistryError(
                    "operators have no organisation; organisation users cannot be operators",
                    code="role_invalid",
                )
            if not role_set:
                raise RegistryError("give at least one role", code="role_invalid")
            user.roles = ",".join(sorted(role_set))
            await audit.append(
                session,
                actor=actor.name,
                action="user.roles",
                object_type="user",
                object_id=user.email,
                org_id=user.org_id,
                details={"roles": sorted(role_set)},
            )
            slug = (await session.get(Organisation, user.org_id)).slug if user.org_id else None  # type: ignore[union-attr]
            return user_view(user, slug)

        return await self._tx(work)

    async def list_users(self, actor: Principal, org: str | None = None) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            query = select(User, Organisation.slug).outerjoin(Organisation, User.org_id == Organisation.id)
            if not actor.is_operator:
                query = query.where(User.org_id == actor.org_id)
            elif org:
                query = query.where(User.org_id == (await self._org_by_slug(session, org)).id)
            rows = (await session.execute(query.order_by(User.email))).all()
            return [user_view(u, slug) for u, slug in rows]
