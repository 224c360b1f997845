"""Per-group clipboard switches

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 13:10:00

Adds nullable `groups.clipboard_in` and `groups.clipboard_out` (NULL: the group has no say);
no existing row changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("groups", sa.Column("clipboard_in", sa.Boolean(), nullable=True))
    op.add_column("groups", sa.Column("clipboard_out", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("clipboard_out")
        batch.drop_column("clipboard_in")
