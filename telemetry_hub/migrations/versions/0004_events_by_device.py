"""Events and stats keyed by device and event id: event ids are unique per device only (a restored image or a
cloned SD card starts two devices from the same outbox), and an id two devices sent was kept for the first one
alone. Rows are kept; the keys only widen, so every existing row stays unique.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EVENTS = ("id VARCHAR(64) NOT NULL, device_id VARCHAR(128) NOT NULL, kind VARCHAR(32) NOT NULL, "
          "ts_ms BIGINT NOT NULL, payload TEXT NOT NULL, received_ms BIGINT NOT NULL")
STATS = ("id VARCHAR(64) NOT NULL, device_id VARCHAR(128) NOT NULL, ts_ms BIGINT NOT NULL, payload TEXT NOT NULL, "
         "received_ms BIGINT NOT NULL")
KEYS = {"events": ("device_id", "id"), "stats": ("device_id", "id", "ts_ms")}


def _rekey(table: str, columns: str, key: tuple[str, ...]) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":  # in place; on the partitioned stats the partitions follow their parent
        name = sa.inspect(bind).get_pk_constraint(table)["name"]
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}, ADD PRIMARY KEY ({', '.join(key)})")
        return
    # SQLite cannot change a primary key: the table is copied into one with the new key
    indexes = sa.inspect(bind).get_indexes(table)
    op.execute(f"CREATE TABLE {table}_rekeyed ({columns}, PRIMARY KEY ({', '.join(key)}))")
    names = "id, device_id, " + ("kind, " if table == "events" else "") + "ts_ms, payload, received_ms"
    op.execute(f"INSERT INTO {table}_rekeyed ({names}) SELECT {names} FROM {table}")
    op.execute(f"DROP TABLE {table}")
    op.execute(f"ALTER TABLE {table}_rekeyed RENAME TO {table}")
    for index in indexes:
        op.create_index(index["name"], table, index["column_names"], unique=bool(index["unique"]))


def upgrade() -> None:
    _rekey("events", EVENTS, KEYS["events"])
    _rekey("stats", STATS, KEYS["stats"])


def downgrade() -> None:  # only while no id is stored for two devices
    _rekey("events", EVENTS, ("id",))
    _rekey("stats", STATS, ("id", "ts_ms"))
