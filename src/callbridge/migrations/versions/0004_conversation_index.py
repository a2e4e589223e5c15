"""An index on `calls.conversation_id`: a post-call webhook names the conversation, and
when it does not carry the call's SID the record is found by it (without the index, a
scan of every record).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_calls_conversation_id", "calls", ["conversation_id"])
