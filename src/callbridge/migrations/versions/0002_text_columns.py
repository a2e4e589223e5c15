"""Columns fit what the services send; a record notes the fields the database refused.

Caller IDs are E.164 numbers but also SIP URIs (RFC 3261 sets no length; carriers
send well over 64 characters) and `client:` identities; SIDs and conversation ids are
the services' own and may grow. They become unbounded text (checked at the boundary,
not by the column). `refused_fields` names the fields of a record that the database
refused (the record is written without them).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WIDENED = (
    "call_sid",
    "stream_sid",
    "conversation_id",
    "direction",
    "from_number",
    "to_number",
    "status",
    "end_reason",
    "twilio_status",
    "instance",
)


def upgrade() -> None:
    # SQLite never enforced VARCHAR lengths (and cannot ALTER a column's type).
    if op.get_bind().dialect.name != "sqlite":
        for name in WIDENED:
            nullable = name not in ("call_sid", "direction", "status")
            op.alter_column("calls", name, type_=sa.Text, existing_nullable=nullable)
    op.add_column("calls", sa.Column("refused_fields", sa.Text))
