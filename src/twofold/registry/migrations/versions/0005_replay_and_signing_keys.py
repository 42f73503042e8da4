"""replay protection and signed responses per API product; the replay ids the gateways have
seen (shared by every worker and node); the provider's published signing keys (one JWKS)

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (no batch rebuild of the table on SQLite), as in 0002 and 0004.
    op.add_column("api_products", sa.Column("replay_window", sa.Integer(), nullable=True))
    op.add_column(
        "api_products",
        sa.Column("replay_iat", sa.String(length=200), nullable=False, server_default="iat"),
    )
    op.add_column(
        "api_products",
        sa.Column("replay_id", sa.String(length=200), nullable=False, server_default="jti"),
    )
    op.add_column(
        "api_products",
        sa.Column("sign_responses", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "replay_ids",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["organisations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("org_id", "digest"),
    )
    op.create_index("ix_replay_ids_expires_at", "replay_ids", ["expires_at"], unique=False)
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(length=100), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("jwk", sa.JSON(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("purpose IN ('notices', 'responses')", name="ck_signing_key_purpose"),
        sa.PrimaryKeyConstraint("kid"),
    )


def downgrade() -> None:
    op.drop_table("signing_keys")
    op.drop_index("ix_replay_ids_expires_at", table_name="replay_ids")
    op.drop_table("replay_ids")
    with op.batch_alter_table("api_products") as batch:
        batch.drop_column("sign_responses")
        batch.drop_column("replay_id")
        batch.drop_column("replay_iat")
        batch.drop_column("replay_window")
