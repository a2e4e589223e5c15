"""Alembic environment: always run from `callbridge.store` with an open connection.

callbridge has no alembic.ini: the store builds the configuration in code, takes the
migration lock, and hands its connection over in `config.attributes["connection"]`.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run callbridge migrations with `callbridge db upgrade`, not the alembic command")
context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
