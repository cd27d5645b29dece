"""Per device: the stats events the hub acknowledged but did not keep (stamped outside the retention window, a
device clock far off) and the device's clock skew as the hub last saw it.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("stats_out_of_window", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("devices", sa.Column("clock_skew_ms", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("clock_skew_ms")
        batch.drop_column("stats_out_of_window")
