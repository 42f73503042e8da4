"""The sandbox's payment store."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from twofold.registry.base import RegistryBase
from twofold.registry.models import (
    SandboxPayment,
    utcnow,
)
from twofold.registry.rules import (
    Conflict,
    NotFound,
)


class PaymentsMixin(RegistryBase):
    """The sandbox upstream's payments, kept per organisation and environment."""

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
