"""messages: every user message and answer.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``messages`` with its unique key and the indexes its queries use."""
    op.create_table(
        "messages",
        sa.Column(
            "id",
            sa.Integer().with_variant(sa.BigInteger(), "postgresql"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("channel", sa.String(255), nullable=False),
        sa.Column("thread", sa.String(255), nullable=True),
        sa.Column("conversation_id", sa.String(1024), nullable=False),
        sa.Column("user", sa.String(255), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_encoding", sa.String(16), nullable=True),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("tokens_in", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("tokens_out", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lane", sa.String(64), nullable=False, server_default="default"),
        sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.UniqueConstraint("platform", "tenant", "message_id", name="uq_messages_message_id"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # lz4 TOASTs long texts faster than the default pglz (Postgres 14+ built with
        # lz4); older or other builds keep pglz.
        op.execute(
            "DO $$ BEGIN ALTER TABLE messages ALTER COLUMN text SET COMPRESSION lz4; "
            "EXCEPTION WHEN others THEN NULL; END $$"
        )
    op.create_index("ix_messages_conversation_ts", "messages", ["conversation_id", "ts"])
    op.create_index("ix_messages_tenant_user_ts", "messages", ["tenant", "user", "ts"])
    # Retention scans by time; rows arrive in time order, so on Postgres a BRIN index
    # serves it at almost no cost per insert.
    op.create_index("ix_messages_ts", "messages", ["ts"], postgresql_using="brin")


def downgrade() -> None:
    """Drop ``messages``."""
    op.drop_table("messages")
