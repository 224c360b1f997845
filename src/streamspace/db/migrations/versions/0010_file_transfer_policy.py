"""file transfer policy: per-group allow_upload / allow_download

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 12:00:00

Two nullable booleans on `groups`: NULL means the group has no say (the settings decide), and a
user any of whose groups says False is refused.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("groups", sa.Column("allow_upload", sa.Boolean(), nullable=True))
    op.add_column("groups", sa.Column("allow_download", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("groups") as batch:
        batch.drop_column("allow_download")
        batch.drop_column("allow_upload")
