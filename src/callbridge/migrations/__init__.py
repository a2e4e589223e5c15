"""Alembic migrations of the call records' schema (see `callbridge.store.upgrade_database`)."""
