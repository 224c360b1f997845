"""Sign-ins: what the account security page lists and ends

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 12:10:00

Adds `sign_ins` (one row per refresh-token family). Families that exist already get a row
each (no device or address is known for them), so they show and can be ended too.
Entitlements need no schema: a template's `allowed_groups` lives in its `spec` JSON.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from streamspace.db.types import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sign_ins",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("user_agent", sa.String(512), nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_sign_ins_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sign_ins"),
    )
    op.create_index("ix_sign_ins_user_id", "sign_ins", ["user_id"])
    op.execute(
        "INSERT INTO sign_ins (id, user_id, method, user_agent, ip, created_at, last_used_at, "
        "expires_at, revoked_at) "
        "SELECT family_id, min(user_id), '', '', '', min(created_at), max(created_at), "
        "max(expires_at), CASE WHEN count(revoked_at) = count(*) THEN max(revoked_at) END "
        "FROM refresh_tokens GROUP BY family_id"
    )


def downgrade() -> None:
    op.drop_index("ix_sign_ins_user_id", table_name="sign_ins")
    op.drop_table("sign_ins")
