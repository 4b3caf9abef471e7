"""The one SQLAlchemy ``MetaData`` every server table is defined on, and where they live.

The Alembic migrations (:mod:`.migrate`) are checked against this schema: a test upgrades
an empty database to the newest revision and asserts that nothing differs from it, on
SQLite and on PostgreSQL.

Adding a table: define it on :data:`SCHEMA` in its storage module, list that module in
:data:`TABLE_MODULES`, and add a revision under ``migrations/versions/`` (see the README
there and ADR 0009).
"""

from __future__ import annotations

import importlib
from typing import Final

from sqlalchemy import MetaData

__all__ = ["SCHEMA", "TABLE_MODULES", "load_schema"]

#: every table of the server's database is defined on this
SCHEMA: Final = MetaData()

#: the modules that define tables on :data:`SCHEMA` (imported to register them)
TABLE_MODULES: Final = (
    "otaguard.server.storage.sql",
    "otaguard.server.storage.devices",
    "otaguard.server.storage.checkins",
    "otaguard.server.storage.assignments",
    "otaguard.server.storage.operators",
    "otaguard.server.storage.inventory",
    "otaguard.server.storage.rollouts",
    "otaguard.server.storage.sboms",
    "otaguard.server.storage.monitoring",
    "otaguard.server.storage.vulns",
)


def load_schema() -> MetaData:
    """Import every table module and return :data:`SCHEMA` with all tables on it."""
    for name in TABLE_MODULES:
        importlib.import_module(name)
    return SCHEMA
