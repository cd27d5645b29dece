"""Stats rolled up per device and model, per 5 minutes and per hour (``stats_5m``, ``stats_1h``), so raw stats are
kept for a short window only; ``rollup_state`` holds how far the rollup got (by the hub's arrival stamp), and
``stats.received_ms`` is indexed so each rollup pass reads only what arrived since; on PostgreSQL,
``edgeloop_try_jsonb`` reads a payload as JSON or NULL (a device's payload that does not parse must not stop the
rollup).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TIERS = ("stats_5m", "stats_1h")


def upgrade() -> None:
    for name in TIERS:
        op.create_table(
            name,
            sa.Column("device_id", sa.String(128), primary_key=True),
            sa.Column("model_name", sa.String(128), primary_key=True),
            sa.Column("bucket_ms", sa.BigInteger, primary_key=True),
            sa.Column("samples", sa.Integer, nullable=False),
            sa.Column("requests", sa.BigInteger, nullable=False),
            sa.Column("p50_ms_sum", sa.Float, nullable=False),
            sa.Column("p50_count", sa.Integer, nullable=False),
            sa.Column("p99_ms_max", sa.Float, nullable=True),
            sa.Column("last_ts_ms", sa.BigInteger, nullable=False),
            sa.Column("state", sa.String(32), nullable=False),
            sa.Column("serving_version", sa.String(128), nullable=False),
        )
    op.create_table(
        "rollup_state",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("watermark_ms", sa.BigInteger, nullable=False),
    )
    # the raw rows already stored are rolled up by the hub's first passes, from the oldest arrival on
    op.create_index("stats_received", "stats", ["received_ms"])
    if op.get_bind().dialect.name == "postgresql":  # PostgreSQL rolls up in SQL, where a payload may not parse
        op.execute("CREATE OR REPLACE FUNCTION edgeloop_try_jsonb(doc text) RETURNS jsonb LANGUAGE plpgsql "
                   "IMMUTABLE AS $$ BEGIN RETURN doc::jsonb; EXCEPTION WHEN others THEN RETURN NULL; END $$")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS edgeloop_try_jsonb(text)")
    op.drop_index("stats_received", table_name="stats")
    op.drop_table("rollup_state")
    for name in TIERS:
        op.drop_table(name)
