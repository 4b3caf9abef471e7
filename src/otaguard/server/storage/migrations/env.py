"""Alembic environment: runs on the connection :mod:`otaguard.server.storage.migrate` opened.

Never run ``alembic`` against a URL of its own here: the migrate module takes the lock
that keeps several server processes from migrating at once, and hands its connection in.
"""

from __future__ import annotations

from alembic import context

from otaguard.server.storage.schema import load_schema

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through 'otaguard server db upgrade' or otaguard.server.storage.migrate"
    )
context.configure(
    connection=connection,
    target_metadata=load_schema(),
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
