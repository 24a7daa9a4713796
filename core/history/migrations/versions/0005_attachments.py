"""messages.files: references to the files a user message had attached, as JSON.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``files`` (nullable): ``[{"id", "name", "mimetype", "size"}]``, never content."""
    op.add_column("messages", sa.Column("files", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop ``files``."""
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("files")
