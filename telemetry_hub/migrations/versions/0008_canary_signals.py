"""Per device and model, what promoting a canary needs: ``serving_since_ms`` (when ``serving_version`` last changed,
by the device's clock) and the feedback accuracy of the serving version (``feedback_version`` and its
``feedback_labels``, ``feedback_known``, ``feedback_correct``: labels apps sent for requests the device still
remembered, those naming a class it could compare, those where its top-1 was right; summed over the device's stats
events, started anew per version).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COUNTS = ("feedback_labels", "feedback_known", "feedback_correct")


def upgrade() -> None:
    op.add_column("device_models", sa.Column("serving_since_ms", sa.BigInteger, nullable=True))
    op.add_column("device_models", sa.Column("feedback_version", sa.String(128), nullable=True))
    for name in COUNTS:
        op.add_column("device_models", sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("device_models") as batch:
        for name in ("serving_since_ms", "feedback_version", *COUNTS):
            batch.drop_column(name)
