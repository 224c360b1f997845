"""SAML sign-ins under way

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 12:45:00

Adds `saml_logins`; no existing row changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from streamspace.db.types import JSONList, UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "saml_logins",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("browser_hash", sa.String(64), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("assertion_id", sa.String(128), nullable=True),
        sa.Column("grant_hash", sa.String(64), nullable=True),
        sa.Column("identity", JSONList, nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_saml_logins"),
        sa.UniqueConstraint("assertion_id", name="uq_saml_logins_assertion_id"),
        sa.UniqueConstraint("grant_hash", name="uq_saml_logins_grant_hash"),
    )
    op.create_index("ix_saml_logins_expires_at", "saml_logins", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_saml_logins_expires_at", table_name="saml_logins")
    op.drop_table("saml_logins")
