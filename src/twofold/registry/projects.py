"""Projects: what an organisation may call, per environment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry import audit
from twofold.registry.auth import (
    Principal,
)
from twofold.registry.base import RegistryBase
from twofold.registry.models import (
    ApiProduct,
    Environment,
    Project,
    ProjectProduct,
)
from twofold.registry.rules import (
    Conflict,
    Forbidden,
    NotFound,
    RegistryError,
)


class ProjectsMixin(RegistryBase):
    """Projects of an organisation and the API products they hold per environment."""

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
            return await self._project_views(session, list((await session.execute(query)).scalars()))

    async def project(self, actor: Principal, project_id: int) -> dict[str, Any]:
        """One project of the caller's organisation (operators: any) with its API products."""
        async with self.sessions() as session:
            project = await session.get(Project, project_id)
            if project is None or (project.org_id != actor.org_id and not actor.is_operator):
                raise NotFound(f"no project {project_id}", code="project_not_found")
            return (await self._project_views(session, [project]))[0]

    @staticmethod
    async def _project_views(session: AsyncSession, projects: list[Project]) -> list[dict[str, Any]]:
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
                "products": sorted(by_project.get(p.id, []), key=lambda x: (x["environment"], x["product"])),
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
                details={"name": project.name, "product": product_id, "environment": env_id},
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
