"""Fleet tables (instance leases, fleet-wide call ownership) and what a call learned after
it was answered (answering-machine detection, the agent platform's post-call analysis).

- `instances`: one row per running process, its lease renewed on a heartbeat. A row whose
  lease expired belongs to a dead instance; `reconciled_by` is set, atomically, by the one
  live instance that closes its calls.
- `fleet_calls`: which instance holds each call (where its stream runs; until then, where it
  was answered), and whether its stream token was used (single use across the fleet).
- `calls.answered_by`: Twilio's `AnsweredBy` for outbound calls placed with detection.
- `calls.analysis`: the post-call analysis as the agent platform reported it (JSON).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("answered_by", sa.Text))
    op.add_column("calls", sa.Column("analysis", sa.JSON))
    op.create_table(
        "instances",
        sa.Column("instance_id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("draining", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("live_calls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reconciled_by", sa.Text),
    )
    op.create_index("ix_instances_expires_at", "instances", ["expires_at"])
    op.create_table(
        "fleet_calls",
        sa.Column("call_sid", sa.Text, primary_key=True),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),  # answered | live | ended
        sa.Column("stream_used", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_fleet_calls_instance_state", "fleet_calls", ["instance", "state"])
