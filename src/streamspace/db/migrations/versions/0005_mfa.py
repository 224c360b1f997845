"""TOTP second factors

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 04:30:00

Adds the `mfa_totp` table; no existing row changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from streamspace.db.types import JSONList, UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mfa_totp",
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("secret_sealed", sa.Text(), nullable=False),
        sa.Column("confirmed_at", UTCDateTime(), nullable=True),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("recovery_hashes", JSONList, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_mfa_totp_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", name="pk_mfa_totp"),
    )


def downgrade() -> None:
    op.drop_table("mfa_totp")
