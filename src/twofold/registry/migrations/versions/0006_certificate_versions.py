"""certificates.changed_version: the registry version of a certificate's last change, so that
gateways reload only what changed (a registry of 100,000 certificates reloads one row, not all)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows: 0, loaded by every gateway's first (full) load.
    op.add_column(
        "certificates",
        sa.Column("changed_version", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.create_index("ix_certificates_changed_version", "certificates", ["changed_version"])


def downgrade() -> None:
    op.drop_index("ix_certificates_changed_version", table_name="certificates")
    op.drop_column("certificates", "changed_version")
