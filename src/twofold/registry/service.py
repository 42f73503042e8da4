"""The registry: every change and every read of the provider side's source of truth.

Authorisation is decided here, for every caller (pages, JSON API, CLI): each method takes
the acting :class:`Principal`. Organisation users see and change only their own
organisation; API Security users manage certificates; Developers manage projects;
operators manage organisations, users, environments and products.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from twofold.crypto import certs as _certs
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
from twofold.registry.db import create_engine, in_transaction, is_sqlite, sessionmaker
from twofold.registry.models import (
    ApiProduct,
    ApiToken,
    Certificate,
    CnOwner,
    Environment,
    Organisation,
    Project,
    ProjectProduct,
    RegistryVersion,
    SandboxPayment,
    Session,
    User,
    utcnow,
)
from twofold.registry.rules import (
    USE_LABELS,
    USES,
    Conflict,
    Forbidden,
    NotFound,
    RegistryError,
    Unauthorized,
    inspect_upload,
)

T = TypeVar("T")
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SESSION_LIFETIME = dt.timedelta(hours=8)
SIGNATURE_POLICIES = ("required", "optional", "none")
DEFAULT_CONTENT_TYPES = ["application/json", "application/jose", "text/xml"]
NOTIFY_CHANNEL = "twofold_registry"

DEFAULT_ENVIRONMENTS = [
    {"id": "cat", "name": "Client Testing", "allow_self_signed": True, "gateway_port": 8443, "position": 1},
    {"id": "prod", "name": "Production", "allow_self_signed": False, "gateway_port": 9443, "position": 2},
]


def _slug(value: str, what: str) -> str:
    value = value.strip().lower()
    if not SLUG.match(value):
        raise RegistryError(
            f"{what} {value!r} must be lower-case letters, digits and dashes (max 63)", code="slug_invalid"
        )
    return value


def cert_view(
    row: Certificate, env_name: str | None = None, org_slug: str | None = None, now: dt.datetime | None = None
) -> dict[str, Any]:
    now = now or utcnow()
    return {
        "id": row.id,
        "fingerprint": row.fingerprint,
        "environment": row.environment_id,
        "environment_name": env_name,
        "organisation": org_slug,
        "use": row.use,
        "use_label": USE_LABELS[row.use],
        "common_name": row.common_name,
        "subject": row.subject,
        "issuer": row.issuer,
        "serial": row.serial,
        "not_before": row.not_before.isoformat(),
        "not_after": row.not_after.isoformat(),
        "days_left": _certs.days_left(row.not_after, now),
        "key": f"{row.key_type} {row.key_size}",
        "self_signed": row.self_signed,
        "x5t_s256": row.x5t_s256,
        "sha1_thumbprint": row.sha1_thumbprint,
        "status": row.status,
        "added_by": row.added_by,
        "added_at": row.added_at.isoformat(),
        "removed_by": row.removed_by,
        "removed_at": row.removed_at.isoformat() if row.removed_at else None,
    }


def product_view(row: ApiProduct) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "path_prefix": row.path_prefix,
        "upstream": row.upstream,
        "signature": row.signature,
        "content_types": list(row.content_types),
        "algorithms": list(row.algorithms),
    }


def env_view(row: Environment) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "allow_self_signed": row.allow_self_signed,
        "gateway_port": row.gateway_port,
        "has_ca": bool(row.ca_pem),
    }


def user_view(row: User, org_slug: str | None) -> dict[str, Any]:
    roles = sorted(r for r in row.roles.split(",") if r)
    return {
        "id": row.id,
        "email": row.email,
        "organisation": org_slug,
        "roles": roles,
        "role_labels": [ROLE_LABELS[r] for r in roles],
        "active": row.active,
        "created_at": row.created_at.isoformat(),
    }


class Registry:
    """Open with :meth:`open` (runs migrations), close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.sessions: async_sessionmaker[AsyncSession] = sessionmaker(engine)

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, readonly: bool = False) -> Registry:
        if migrate:
            from twofold.registry.db import migrate_async

            await migrate_async(url)
        return cls(create_engine(url, readonly=readonly), url)

    async def close(self) -> None:
        await self.engine.dispose()

    async def _tx(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        return await in_transaction(self.sessions, work)

    async def _bump(self, session: AsyncSession) -> None:
        """Tell gateways something they care about changed."""
        now = utcnow()
        result = await session.execute(
            update(RegistryVersion)
            .where(RegistryVersion.id == 1)
            .values(version=RegistryVersion.version + 1, changed_at=now)
        )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            session.add(RegistryVersion(id=1, version=1, changed_at=now))
            await session.flush()
        if not is_sqlite(self.url):
            await session.execute(select(func.pg_notify(NOTIFY_CHANNEL, "changed")))

    async def version(self) -> int:
        async with self.sessions() as session:
            value = (
                await session.execute(select(RegistryVersion.version).where(RegistryVersion.id == 1))
            ).scalar()
            return int(value or 0)

    # --- bootstrap ------------------------------------------------------------------------

    async def ensure_defaults(self) -> list[str]:
        """Default environments if there are none; returns what was created."""

        async def work(session: AsyncSession) -> list[str]:
            existing = (await session.execute(select(func.count()).select_from(Environment))).scalar()
            if existing:
                return []
            for env in DEFAULT_ENVIRONMENTS:
                session.add(Environment(**env))
            await audit.append(
                session,
                actor="system",
                action="environment.defaults",
                object_type="environment",
                object_id="cat,prod",
            )
            await self._bump(session)
            return [e["id"] for e in DEFAULT_ENVIRONMENTS]  # type: ignore[misc]

        return await self._tx(work)

    async def has_operator(self) -> bool:
        async with self.sessions() as session:
            rows = (await session.execute(select(User.roles).where(User.active.is_(True)))).scalars()
            return any(OPERATOR in r.split(",") for r in rows)

    # --- authentication ---------------------------------------------------------------------

    async def _principal_for(self, session: AsyncSession, user: User) -> Principal:
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
        )

    async def authenticate(self, email: str, password: str) -> Principal:
        async with self.sessions() as session:
            user = (await session.execute(select(User).where(User.email == email.strip().lower()))).scalar()
            # argon2 costs ~0.1 s of CPU by design: keep it off the event loop.
            ok = await asyncio.to_thread(check_password, user.password_hash if user else None, password)
            if not user or not ok or not user.active:
                raise Unauthorized("wrong email or password", code="login_failed")
            return await self._principal_for(session, user)

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
            return await self._principal_for(session, user), row.csrf_token

    async def end_session(self, cookie: str) -> None:
        async def work(session: AsyncSession) -> None:
            await session.execute(delete(Session).where(Session.id_hash == secret_hash(cookie)))

        await self._tx(work)

    async def create_token(self, actor: Principal, name: str = "api", *, for_email: str | None = None) -> str:
        """A personal API token (shown once). Operators may create one for another user."""
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
            principal = await self._principal_for(session, user)
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

    # --- organisations and users -----------------------------------------------------------

    @staticmethod
    def _need_operator(actor: Principal) -> None:
        if not actor.is_operator:
            raise Forbidden("only platform operators may do this", code="operator_only")

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

    async def list_orgs(self, actor: Principal) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            query = select(Organisation).order_by(Organisation.slug)
            if not actor.is_operator:
                query = query.where(Organisation.id == actor.org_id)
            return [
                {"id": o.id, "slug": o.slug, "name": o.name, "created_at": o.created_at.isoformat()}
                for o in (await session.execute(query)).scalars()
            ]

    @staticmethod
    async def _user_by_email(session: AsyncSession, email: str) -> User:
        user = (await session.execute(select(User).where(User.email == email.strip().lower()))).scalar()
        if user is None:
            raise NotFound(f"no user {email}", code="user_not_found")
        return user

    async def _org_by_slug(self, session: AsyncSession, slug: str) -> Organisation:
        org = (
            await session.execute(select(Organisation).where(Organisation.slug == slug.strip().lower()))
        ).scalar()
        if org is None:
            raise NotFound(f"no organisation {slug!r}", code="org_not_found")
        return org

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
                query = query.where(Organisation.slug == org)
            rows = (await session.execute(query.order_by(User.email))).all()
            return [user_view(u, slug) for u, slug in rows]

    # --- environments and products ----------------------------------------------------------

    async def list_environments(self) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            rows = (
                await session.execute(select(Environment).order_by(Environment.position, Environment.id))
            ).scalars()
            return [env_view(e) for e in rows]

    async def environment(self, env_id: str) -> dict[str, Any]:
        async with self.sessions() as session:
            env = await session.get(Environment, env_id)
            if env is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
            return env_view(env)

    async def save_environment(
        self,
        actor: Principal,
        env_id: str,
        *,
        name: str | None = None,
        allow_self_signed: bool | None = None,
        ca_pem: str | None = None,
        gateway_port: int | None = None,
    ) -> dict[str, Any]:
        self._need_operator(actor)
        env_id = _slug(env_id, "the environment id")
        if ca_pem:
            try:
                cas = _certs.load_certificates(ca_pem.encode(), name="the CA file")
            except RegistryError:
                raise
            except Exception as exc:
                raise RegistryError(
                    f"the CA file is not PEM certificates: {exc}", code="ca_invalid"
                ) from None
            ca_pem = "".join(_certs.certificate_pem(c).decode() for c in cas)

        async def work(session: AsyncSession) -> dict[str, Any]:
            env = await session.get(Environment, env_id)
            created = env is None
            if env is None:
                position = (await session.execute(select(func.max(Environment.position)))).scalar() or 0
                env = Environment(
                    id=env_id,
                    name=name or env_id,
                    allow_self_signed=bool(allow_self_signed),
                    position=position + 1,
                )
                session.add(env)
            if name is not None:
                env.name = name
            if allow_self_signed is not None:
                env.allow_self_signed = allow_self_signed
            if ca_pem is not None:
                env.ca_pem = ca_pem or None
            if gateway_port is not None:
                env.gateway_port = gateway_port
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="environment.create" if created else "environment.update",
                object_type="environment",
                object_id=env_id,
                details={
                    "name": env.name,
                    "allow_self_signed": env.allow_self_signed,
                    "has_ca": bool(env.ca_pem),
                },
            )
            await self._bump(session)
            return env_view(env)

        return await self._tx(work)

    async def list_products(self) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            return [
                product_view(p)
                for p in (await session.execute(select(ApiProduct).order_by(ApiProduct.id))).scalars()
            ]

    async def save_product(
        self,
        actor: Principal,
        product_id: str,
        *,
        name: str,
        path_prefix: str,
        upstream: str,
        signature: str = "required",
        content_types: list[str] | None = None,
        algorithms: list[str] | None = None,
    ) -> dict[str, Any]:
        self._need_operator(actor)
        product_id = _slug(product_id, "the product id")
        if signature not in SIGNATURE_POLICIES:
            raise RegistryError(
                f"signature must be one of {', '.join(SIGNATURE_POLICIES)}", code="product_invalid"
            )
        if not path_prefix.startswith("/") or "//" in path_prefix or any(c in path_prefix for c in "?#* "):
            raise RegistryError(
                "the path prefix must be an absolute path such as /tsapi/v1/payments", code="product_invalid"
            )
        path_prefix = path_prefix.rstrip("/") or "/"
        if not (upstream.startswith(("http://", "https://")) or upstream.startswith("sandbox:")):
            raise RegistryError(
                "the upstream must be an http(s):// URL or sandbox:<name>", code="product_invalid"
            )
        from twofold.crypto.jws import SUPPORTED_ALGORITHMS

        algorithms = algorithms or ["RS256"]
        bad = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS or a.startswith("HS")]
        if bad:
            raise RegistryError(f"unsupported signature algorithms: {', '.join(bad)}", code="product_invalid")
        content_types = content_types or list(DEFAULT_CONTENT_TYPES)

        async def work(session: AsyncSession) -> dict[str, Any]:
            clash = (
                await session.execute(
                    select(ApiProduct).where(
                        ApiProduct.path_prefix == path_prefix, ApiProduct.id != product_id
                    )
                )
            ).scalar()
            if clash:
                raise Conflict(f"product {clash.id} already serves {path_prefix}", code="product_path_taken")
            row = await session.get(ApiProduct, product_id)
            created = row is None
            if row is None:
                row = ApiProduct(id=product_id)
                session.add(row)
            row.name, row.path_prefix, row.upstream, row.signature = name, path_prefix, upstream, signature
            row.content_types, row.algorithms = content_types, algorithms
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="product.create" if created else "product.update",
                object_type="product",
                object_id=product_id,
                details=product_view(row),
            )
            await self._bump(session)
            return product_view(row)

        return await self._tx(work)

    # --- projects -------------------------------------------------------------------------

    async def create_project(self, actor: Principal, name: str) -> dict[str, Any]:
        if not actor.manages_projects:
            raise Forbidden("only Developers of an organisation may create projects", code="developer_only")
        name = name.strip()
        if not name or len(name) > 200:
            raise RegistryError("a project needs a name (up to 200 characters)", code="project_invalid")

        async def work(session: AsyncSession) -> dict[str, Any]:
            if (
                await session.execute(
                    select(Project).where(Project.org_id == actor.org_id, Project.name == name)
                )
            ).scalar():
                raise Conflict(f"a project named {name!r} already exists", code="project_exists")
            project = Project(org_id=actor.org_id, name=name)
            session.add(project)
            await session.flush()
            await audit.append(
                session,
                actor=actor.name,
                action="project.create",
                object_type="project",
                object_id=str(project.id),
                org_id=actor.org_id,
                details={"name": name},
            )
            return {"id": project.id, "name": name, "products": []}

        return await self._tx(work)

    async def list_projects(self, actor: Principal, org: str | None = None) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            query = select(Project).order_by(Project.name)
            if actor.is_operator:
                if org:
                    query = query.where(Project.org_id == (await self._org_by_slug(session, org)).id)
            else:
                query = query.where(Project.org_id == actor.org_id)
            projects = list((await session.execute(query)).scalars())
            links = (
                await session.execute(
                    select(ProjectProduct).where(ProjectProduct.project_id.in_([p.id for p in projects]))
                )
            ).scalars()
            by_project: dict[int, list[dict[str, str]]] = {}
            for link in links:
                by_project.setdefault(link.project_id, []).append(
                    {"product": link.product_id, "environment": link.environment_id}
                )
            return [
                {
                    "id": p.id,
                    "name": p.name,
                    "products": sorted(
                        by_project.get(p.id, []), key=lambda x: (x["environment"], x["product"])
                    ),
                }
                for p in projects
            ]

    async def _own_project(self, session: AsyncSession, actor: Principal, project_id: int) -> Project:
        project = await session.get(Project, project_id)
        if project is None or project.org_id != actor.org_id:
            raise NotFound(f"no project {project_id}", code="project_not_found")
        return project

    async def set_project_product(
        self, actor: Principal, project_id: int, product_id: str, env_id: str, *, present: bool
    ) -> None:
        if not actor.manages_projects:
            raise Forbidden("only Developers of the organisation may change projects", code="developer_only")

        async def work(session: AsyncSession) -> None:
            project = await self._own_project(session, actor, project_id)
            if await session.get(ApiProduct, product_id) is None:
                raise NotFound(f"no API product {product_id!r}", code="product_not_found")
            if await session.get(Environment, env_id) is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
            key = (project.id, product_id, env_id)
            link = await session.get(ProjectProduct, key)
            if present and link is None:
                session.add(
                    ProjectProduct(project_id=project.id, product_id=product_id, environment_id=env_id)
                )
            elif not present and link is not None:
                await session.delete(link)
            else:
                return
            await audit.append(
                session,
                actor=actor.name,
                action="project.product.add" if present else "project.product.remove",
                object_type="project",
                object_id=str(project.id),
                org_id=actor.org_id,
                details={"product": product_id, "environment": env_id},
            )
            await self._bump(session)

        await self._tx(work)

    async def delete_project(self, actor: Principal, project_id: int) -> None:
        if not actor.manages_projects:
            raise Forbidden("only Developers of the organisation may delete projects", code="developer_only")

        async def work(session: AsyncSession) -> None:
            project = await self._own_project(session, actor, project_id)
            await session.execute(delete(ProjectProduct).where(ProjectProduct.project_id == project.id))
            await session.delete(project)
            await audit.append(
                session,
                actor=actor.name,
                action="project.delete",
                object_type="project",
                object_id=str(project_id),
                org_id=actor.org_id,
                details={"name": project.name},
            )
            await self._bump(session)

        await self._tx(work)

    # --- certificates ---------------------------------------------------------------------

    async def add_certificate(self, actor: Principal, env_id: str, use: str, data: bytes) -> dict[str, Any]:
        """Register a certificate under every rule; refusals leave the registry unchanged."""
        if not actor.manages_certificates:
            raise Forbidden(
                "only users with the API Security role may add certificates", code="api_security_only"
            )
        async with self.sessions() as session:
            env = await session.get(Environment, env_id)
            if env is None:
                raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
            cas = _certs.load_certificates(env.ca_pem.encode()) if env.ca_pem else []
        facts = inspect_upload(
            data,
            use=use,
            allow_self_signed=env.allow_self_signed,
            trusted_cas=cas,
            environment_name=f"{env.name} ({env.id})",
        )
        org_id = actor.org_id
        assert org_id is not None

        async def work(session: AsyncSession) -> dict[str, Any]:
            active = Certificate.status == "active"
            # One statement, so one snapshot: a concurrent upload of the same certificate that
            # commits in between cannot make the answer "public key reused".
            same = or_(
                Certificate.fingerprint == facts.fingerprint, Certificate.spki_sha256 == facts.spki_sha256
            )
            clashes = set(
                (await session.execute(select(Certificate.fingerprint).where(active, same))).scalars()
            )
            if facts.fingerprint in clashes:
                raise Conflict("this certificate is already registered", code="certificate_duplicate")
            if clashes:
                raise Conflict(
                    "a certificate with the same public key is already registered; every certificate "
                    "needs its own key pair",
                    code="public_key_reused",
                )
            if use == "mtls":
                # Locked (PostgreSQL) so that a concurrent removal of the CN's last certificate
                # cannot release the name between this check and this transaction's insert.
                owner = await session.get(CnOwner, (env_id, facts.cn_key), with_for_update=True)
                if owner is not None and owner.org_id != org_id:
                    raise Conflict(
                        f"the Common Name {facts.common_name!r} belongs to another organisation in "
                        f"{env.name}; use a Common Name of your own",
                        code="cn_taken",
                    )
                if owner is None:
                    session.add(CnOwner(environment_id=env_id, cn_key=facts.cn_key, org_id=org_id))
                    await session.flush()
                taken_q = select(Certificate.slot).where(
                    active,
                    Certificate.use == "mtls",
                    Certificate.environment_id == env_id,
                    Certificate.cn_key == facts.cn_key,
                )
                full = (
                    f"at most two mTLS certificates may share the Common Name {facts.common_name!r} in "
                    f"{env.name}; remove one before adding another"
                )
                code = "mtls_cn_limit"
            else:
                taken_q = select(Certificate.slot).where(
                    active,
                    Certificate.use == "signature",
                    Certificate.environment_id == env_id,
                    Certificate.org_id == org_id,
                )
                full = (
                    f"at most two Digital Signature certificates are allowed per organisation in {env.name}; "
                    "remove one before adding another"
                )
                code = "signature_limit"
            taken = set((await session.execute(taken_q)).scalars())
            free = [slot for slot in (1, 2) if slot not in taken]
            if not free:
                raise Conflict(full, code=code)
            row = Certificate(
                org_id=org_id,
                environment_id=env_id,
                use=use,
                slot=free[0],
                der=facts.der,
                fingerprint=facts.fingerprint,
                spki_sha256=facts.spki_sha256,
                x5t_s256=facts.x5t_s256,
                sha1_thumbprint=facts.sha1_thumbprint,
                subject=facts.subject,
                common_name=facts.common_name,
                cn_key=facts.cn_key,
                issuer=facts.issuer,
                serial=facts.serial,
                not_before=facts.not_before,
                not_after=facts.not_after,
                key_type=facts.key_type,
                key_size=facts.key_size,
                self_signed=facts.self_signed,
                status="active",
                added_by=actor.name,
                added_at=utcnow(),
            )
            session.add(row)
            await session.flush()  # a lost race on a slot or fingerprint raises here → retried
            await audit.append(
                session,
                actor=actor.name,
                action="certificate.add",
                object_type="certificate",
                object_id=facts.fingerprint,
                org_id=org_id,
                details={
                    "environment": env_id,
                    "use": use,
                    "common_name": facts.common_name,
                    "not_after": facts.not_after.isoformat(),
                },
            )
            await self._bump(session)
            return cert_view(row, env.name, actor.org_slug)

        return await self._tx(work)

    async def list_certificates(
        self,
        actor: Principal,
        env_id: str | None = None,
        *,
        org: str | None = None,
        include_removed: bool = False,
    ) -> list[dict[str, Any]]:
        async with self.sessions() as session:
            query = (
                select(Certificate, Environment.name, Organisation.slug)
                .join(Environment, Environment.id == Certificate.environment_id)
                .join(Organisation, Organisation.id == Certificate.org_id)
            )
            if actor.is_operator:
                if org:
                    query = query.where(Organisation.slug == org)
            elif actor.org_id is None:
                raise Forbidden("this account belongs to no organisation")
            else:
                query = query.where(Certificate.org_id == actor.org_id)
            if env_id:
                if await session.get(Environment, env_id) is None:
                    raise NotFound(f"no environment {env_id!r}", code="environment_not_found")
                query = query.where(Certificate.environment_id == env_id)
            if not include_removed:
                query = query.where(Certificate.status == "active")
            rows = (
                await session.execute(
                    query.order_by(
                        Certificate.environment_id, Certificate.use, Certificate.common_name, Certificate.id
                    )
                )
            ).all()
            now = utcnow()
            return [cert_view(c, env_name, slug, now) for c, env_name, slug in rows]

    async def remove_certificate(self, actor: Principal, env_id: str, fingerprint: str) -> dict[str, Any]:
        """Remove an active certificate; operators may remove any (incident response)."""
        if not (actor.manages_certificates or actor.is_operator):
            raise Forbidden(
                "only users with the API Security role may remove certificates", code="api_security_only"
            )
        fingerprint = fingerprint.strip().lower().replace(":", "")

        async def work(session: AsyncSession) -> dict[str, Any]:
            query = select(Certificate).where(
                Certificate.status == "active",
                Certificate.environment_id == env_id,
                Certificate.fingerprint == fingerprint,
            )
            if not actor.is_operator:
                query = query.where(Certificate.org_id == actor.org_id)
            row = (await session.execute(query)).scalar()
            if row is None:
                raise NotFound(
                    f"no active certificate {fingerprint[:16]}… in environment {env_id}",
                    code="certificate_not_found",
                )
            row.status, row.removed_by, row.removed_at = "removed", actor.name, utcnow()
            await session.flush()
            if row.use == "mtls":
                # Lock the name's owner row first: a concurrent add of the same CN holds it until
                # it commits, so the count below sees that add and the name is not released.
                await session.execute(
                    select(CnOwner)
                    .where(CnOwner.environment_id == env_id, CnOwner.cn_key == row.cn_key)
                    .with_for_update()
                )
                left = (
                    await session.execute(
                        select(func.count())
                        .select_from(Certificate)
                        .where(
                            Certificate.status == "active",
                            Certificate.use == "mtls",
                            Certificate.environment_id == env_id,
                            Certificate.cn_key == row.cn_key,
                        )
                    )
                ).scalar()
                if not left:
                    await session.execute(
                        delete(CnOwner).where(CnOwner.environment_id == env_id, CnOwner.cn_key == row.cn_key)
                    )
            await audit.append(
                session,
                actor=actor.name,
                action="certificate.remove",
                object_type="certificate",
                object_id=fingerprint,
                org_id=row.org_id,
                details={"environment": env_id, "use": row.use, "common_name": row.common_name},
            )
            await self._bump(session)
            return cert_view(row)

        return await self._tx(work)

    # --- audit ----------------------------------------------------------------------------

    async def audit_entries(
        self, actor: Principal, *, limit: int = 200, org: str | None = None
    ) -> list[dict[str, Any]]:
        from twofold.registry.models import AuditEntry

        async with self.sessions() as session:
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, 1000)))
            if actor.is_operator:
                if org:
                    query = query.where(AuditEntry.org_id == (await self._org_by_slug(session, org)).id)
            else:
                query = query.where(AuditEntry.org_id == actor.org_id)
            return [
                {
                    "id": e.id,
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "action": e.action,
                    "object_type": e.object_type,
                    "object_id": e.object_id,
                    "details": e.details,
                    "hash": e.hash,
                }
                for e in (await session.execute(query)).scalars()
            ]

    async def verify_audit(self, expect_head: str | None = None) -> audit.AuditReport:
        async with self.sessions() as session:
            return await audit.verify_chain(session, expect_head)

    # --- sandbox --------------------------------------------------------------------------

    async def sandbox_create_payment(
        self, org_id: int, env_id: str, end_to_end_id: str, request: dict[str, Any]
    ) -> dict[str, Any]:
        async def work(session: AsyncSession) -> dict[str, Any]:
            existing = (
                await session.execute(
                    select(SandboxPayment).where(
                        SandboxPayment.org_id == org_id,
                        SandboxPayment.environment_id == env_id,
                        SandboxPayment.end_to_end_id == end_to_end_id,
                    )
                )
            ).scalar()
            if existing is not None:
                raise Conflict(
                    f"a payment with endToEndId {end_to_end_id!r} already exists",
                    code="duplicate_end_to_end_id",
                )
            row = SandboxPayment(
                org_id=org_id,
                environment_id=env_id,
                end_to_end_id=end_to_end_id,
                firm_root_id=str(uuid.uuid4()),
                status="PENDING",
                request=request,
            )
            session.add(row)
            await session.flush()
            return {
                "endToEndId": row.end_to_end_id,
                "firmRootId": row.firm_root_id,
                "status": row.status,
                "createdAt": row.created_at.isoformat(),
            }

        return await self._tx(work)

    async def sandbox_payment(self, org_id: int, env_id: str, end_to_end_id: str) -> dict[str, Any]:
        async with self.sessions() as session:
            row = (
                await session.execute(
                    select(SandboxPayment).where(
                        SandboxPayment.org_id == org_id,
                        SandboxPayment.environment_id == env_id,
                        SandboxPayment.end_to_end_id == end_to_end_id,
                    )
                )
            ).scalar()
            if row is None:
                raise NotFound(f"no payment with endToEndId {end_to_end_id!r}", code="payment_not_found")
            # The sandbox settles payments a few seconds after initiation.
            age = (utcnow() - row.created_at).total_seconds()
            status = "COMPLETED" if age > 5 else row.status
            return {
                "endToEndId": row.end_to_end_id,
                "firmRootId": row.firm_root_id,
                "status": status,
                "createdAt": row.created_at.isoformat(),
            }


__all__ = ["USES", "Registry"]
