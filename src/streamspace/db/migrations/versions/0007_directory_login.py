"""directory (LDAP) login: where a user and a group come from

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 05:00:00

Adds `users.auth_source` and `groups.source`, `local` for every existing row.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, never a batch: on SQLite a batch rebuilds `users` and drops the
    # expression index on lower(username) (0003). The server default fills existing rows.
    op.add_column(
        "users",
        sa.Column("auth_source", sa.String(16), nullable=False, server_default="local"),
    )
    op.add_column(
        "groups",
        sa.Column("source", sa.String(16), nullable=False, server_default="local"),
    )


def downgrade() -> None:
    op.drop_column("groups", "source")
    op.drop_column("users", "auth_source")
