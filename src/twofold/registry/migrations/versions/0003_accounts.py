"""accounts: invitations and reset links, TOTP second factor, recovery codes, recent gateway calls

Revision ID: 0003
Revises: 0004 (re-chained after the certificate-lifecycle migration when main was merged)
Create Date: 2026-12-01

Upgrades an existing database in place: existing users keep their passwords and sessions
(``pending_activation`` false, no second factor enrolled: API Security users and operators
are asked to enrol at their next sign-in); existing sessions have not passed a second factor.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0004"
branch_labels = None
depends_on = None

_USER_COLUMNS: tuple[sa.Column[object], ...] = (
    sa.Column("pending_activation", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("totp_secret", sa.String(length=64), nullable=True),
    sa.Column("totp_enabled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("totp_last_counter", sa.Integer(), nullable=True),
)


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN on both databases (see 0002: no batch rebuild on SQLite).
    for column in _USER_COLUMNS:
        op.add_column("users", column)
    op.add_column("sessions", sa.Column("mfa_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "recovery_codes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "code_hash"),
    )
    op.create_index(op.f("ix_recovery_codes_user_id"), "recovery_codes", ["user_id"], unique=False)
    op.create_table(
        "account_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=320), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("purpose IN ('activate', 'reset')", name="ck_link_purpose"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index(op.f("ix_account_links_user_id"), "account_links", ["user_id"], unique=False)
    op.create_table(
        "gateway_calls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("environment_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("product", sa.String(length=64), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=300), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.Column("message", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(["org_id"], ["organisations.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_gateway_calls_org_env", "gateway_calls", ["org_id", "environment_id", "id"], unique=False
    )
    op.create_table(
        "gateway_refusals",
        sa.Column("environment_id", sa.String(length=32), nullable=False),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("environment_id", "minute", "outcome"),
    )
    op.create_table(
        "gateway_first_success",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("environment_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["organisations.id"]),
        sa.PrimaryKeyConstraint("org_id", "environment_id"),
    )


def downgrade() -> None:
    op.drop_table("gateway_first_success")
    op.drop_table("gateway_refusals")
    op.drop_index("ix_gateway_calls_org_env", table_name="gateway_calls")
    op.drop_table("gateway_calls")
    op.drop_index(op.f("ix_account_links_user_id"), table_name="account_links")
    op.drop_table("account_links")
    op.drop_index(op.f("ix_recovery_codes_user_id"), table_name="recovery_codes")
    op.drop_table("recovery_codes")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("mfa_at")
    with op.batch_alter_table("users") as batch:
        for column in reversed(_USER_COLUMNS):
            batch.drop_column(column.name)
