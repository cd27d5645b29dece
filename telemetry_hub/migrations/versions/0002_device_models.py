"""A row per device and model (a device serves several models); rows a hub before several models kept in
``devices`` (one model per device) are carried over.

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

MODEL_FIELDS = ("target_key", "desired_version", "serving_version", "state", "validation_result", "p50_ms",
                "p99_ms", "batching_json", "variant_json")


def upgrade() -> None:
    op.create_table(
        "device_models",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("model_name", sa.String(128), primary_key=True),
        sa.Column("target_key", sa.String(128)),
        sa.Column("desired_version", sa.String(128)),
        sa.Column("serving_version", sa.String(128)),
        sa.Column("state", sa.String(32)),
        sa.Column("validation_result", sa.Text),
        sa.Column("p50_ms", sa.Float),
        sa.Column("p99_ms", sa.Float),
        sa.Column("last_seen_ms", sa.BigInteger),
        sa.Column("batching_json", sa.Text),
        sa.Column("variant_json", sa.Text),
    )
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("devices")}
    if "model_name" in have:  # the one-model devices table of the first hub releases
        columns = ["device_id", "model_name", "last_seen_ms", *(f for f in MODEL_FIELDS if f in have)]
        listed = ", ".join(f'"{c}"' for c in columns)
        op.execute(f"INSERT INTO device_models ({listed}) SELECT {listed} FROM devices "
                   f"WHERE model_name IS NOT NULL AND model_name <> ''")


def downgrade() -> None:
    op.drop_table("device_models")
