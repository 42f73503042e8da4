"""certificate lifecycle: issuing CAs per environment, their maximum validity, expiry
notices claimed once per certificate and threshold, organisations' notice webhooks

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (no batch rebuild of the tables on SQLite), as in 0002.
    op.add_column("environments", sa.Column("issuing_ca_pem", sa.Text(), nullable=True))
    op.add_column(
        "environments",
        sa.Column("max_validity_days", sa.Integer(), nullable=False, server_default=sa.text("730")),
    )
    # Test environments that take self-signed certificates: a year, as the bank's rules say.
    op.execute("UPDATE environments SET max_validity_days = 365 WHERE allow_self_signed")
    op.add_column("organisations", sa.Column("notice_webhook", sa.String(length=500), nullable=True))
    op.create_table(
        "expiry_notices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("certificate_id", sa.Integer(), nullable=False),
        sa.Column("threshold_days", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.String(length=300), nullable=True),
        sa.CheckConstraint("channel IN ('mail', 'webhook')", name="ck_notice_channel"),
        sa.CheckConstraint("status IN ('claimed', 'sent', 'failed')", name="ck_notice_status"),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("certificate_id", "threshold_days", "channel", name="uq_expiry_notice"),
    )
    op.create_index(
        op.f("ix_expiry_notices_certificate_id"), "expiry_notices", ["certificate_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_expiry_notices_certificate_id"), table_name="expiry_notices")
    op.drop_table("expiry_notices")
    with op.batch_alter_table("organisations") as batch:
        batch.drop_column("notice_webhook")
    with op.batch_alter_table("environments") as batch:
        batch.drop_column("max_validity_days")
        batch.drop_column("issuing_ca_pem")
