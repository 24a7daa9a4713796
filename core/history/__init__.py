"""Conversation history: the hot window in Redis, the SQL store, migrations, export, purge."""
