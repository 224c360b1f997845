"""isolation report of agents; home size quota and the limit each session was created with

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 21:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("isolation", sa.String(32), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("isolation_detail", sa.String(512), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("limits_enforced", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("quotas") as batch:
        batch.add_column(sa.Column("max_home_mb", sa.Integer(), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("home_limit_mb", sa.Integer(), nullable=True))
    # Server defaults only fill existing rows; the models own the defaults from here on.
    with op.batch_alter_table("agents") as batch:
        batch.alter_column("isolation", server_default=None)
        batch.alter_column("isolation_detail", server_default=None)
        batch.alter_column("limits_enforced", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("home_limit_mb")
    with op.batch_alter_table("quotas") as batch:
        batch.drop_column("max_home_mb")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("limits_enforced")
        batch.drop_column("isolation_detail")
        batch.drop_column("isolation")
