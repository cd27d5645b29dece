"""The telemetry hub: receives device events over gRPC, stores them (SQLite by default, PostgreSQL at scale) and
answers fleet queries (``edgeloop fleet status``)."""
