"""Per-group microphone switch

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 15:25:00

Adds nullable `groups.allow_microphone` (NULL: the group has no say); no existing row changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("groups", sa.Column("allow_microphone", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("allow_microphone")
