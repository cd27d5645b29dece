"""Fixtures of the hub's tests."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.engine import make_url

from telemetry_hub.store import HubStore
from tests.telemetry_hub.test_hub import POSTGRES_URL, postgres_listening


@pytest.fixture
def own_schema_store():
    """A hub store on PostgreSQL in a schema of its own (other tests share the public one), dropped afterwards."""
    if not postgres_listening(POSTGRES_URL):
        pytest.skip("no PostgreSQL listening (.ci/run starts one)")
    schema = f"hub_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    store = None
    try:
        url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        store = HubStore(url.render_as_string(hide_password=False))
        yield store
    finally:
        if store is not None:
            store.engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
