"""usernames unique case-insensitively

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00

Users whose names differ only by case ("Alice" and "alice") cannot both keep their name under
the new index, and picking one to rename or merge would change who can log in as whom. So the
upgrade refuses, names them, and changes nothing; the operator renames or deletes all but one
of each group, then starts again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from streamspace.db.migrate import MigrationRefused

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _clashes(conn: sa.Connection) -> list[list[tuple[str, str]]]:
    users = sa.table("users", sa.column("id", sa.String), sa.column("username", sa.String))
    rows = conn.execute(sa.select(users.c.username, users.c.id).order_by(users.c.username)).all()
    groups: dict[str, list[tuple[str, str]]] = {}
    for username, user_id in rows:
        groups.setdefault(username.lower(), []).append((username, user_id))
    return [group for group in groups.values() if len(group) > 1]


def upgrade() -> None:
    clashes = _clashes(op.get_bind())
    if clashes:
        listed = "; ".join(
            " and ".join(f"{name!r} (id {user_id})" for name, user_id in group) for group in clashes
        )
        raise MigrationRefused(
            "usernames must now be unique whatever their case, but these users differ only by "
            f"case: {listed}. Nothing was changed. Keep one user of each group: delete the "
            "others (DELETE /api/v1/users/<id> as an admin, after stopping their sessions) or "
            "rename them in the database (UPDATE users SET username = '...' WHERE id = '...'), "
            "then start StreamSpace again."
        )
    with op.batch_alter_table("users") as batch:
        batch.create_index("uq_users_username_lower", [sa.text("lower(username)")], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_index("uq_users_username_lower")
