"""Alembic environment of the hub's schema. The hub runs it itself at start (``HubStore``), on the connection it
opened; ``alembic -c telemetry_hub/alembic.ini upgrade head`` does the same by hand with ``HUB_DATABASE_URL``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

connection = context.config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    url = os.environ.get("HUB_DATABASE_URL", "sqlite:///hub.sqlite")
    with create_engine(url).connect() as opened:
        context.configure(connection=opened, target_metadata=None, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
