"""Alembic migrations of Sluice's SQL schema, run by :func:`core.history.store.upgrade`."""
