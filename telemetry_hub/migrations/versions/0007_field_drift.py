"""Per device and model: the drift of what the device serves from the training data, as the hub last computed it
from the device's field statistics (``drift_json``: the largest Jensen-Shannon distance, its feature, each
feature's, and the samples it was measured on).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("device_models", sa.Column("drift_json", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_models") as batch:
        batch.drop_column("drift_json")
