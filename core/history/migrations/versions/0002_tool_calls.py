"""messages.tool: the tool-call fields of a turn, as JSON.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``tool`` (nullable): ``tool_calls`` of an assistant turn, or a tool result's
    ``tool_call_id`` and ``tool_name``, as a JSON object."""
    op.add_column("messages", sa.Column("tool", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop ``tool``."""
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("tool")
