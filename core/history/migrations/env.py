"""Alembic environment: migrations run on a connection handed over by core.history.store."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "Sluice's migrations run through `sluice db upgrade` (core.history.store.upgrade), "
        "not the alembic command line"
    )
context.configure(
    connection=connection,
    target_metadata=None,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
