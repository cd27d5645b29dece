"""Stats events in their own table, partitioned by day on PostgreSQL (retention drops whole days), keyed by
(id, ts_ms) so a resend, which carries the same timestamp, still lands on its original and inserts nothing.
State changes (every other kind) stay in ``events`` and are kept.

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
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE TABLE stats (id VARCHAR(64) NOT NULL, device_id VARCHAR(128) NOT NULL, "
                   "ts_ms BIGINT NOT NULL, payload TEXT NOT NULL, received_ms BIGINT NOT NULL, "
                   "PRIMARY KEY (id, ts_ms)) PARTITION BY RANGE (ts_ms)")
        op.execute("CREATE INDEX stats_device ON stats (device_id, ts_ms)")
    else:
        op.create_table(
            "stats",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("device_id", sa.String(128), nullable=False),
            sa.Column("ts_ms", sa.BigInteger, primary_key=True),
            sa.Column("payload", sa.Text, nullable=False),
            sa.Column("received_ms", sa.BigInteger, nullable=False),
        )
        op.create_index("stats_device", "stats", ["device_id", "ts_ms"])


def downgrade() -> None:
    op.drop_table("stats")
