"""Databases for the tests: a SQLite file, or a fresh PostgreSQL database per test.

The PostgreSQL server is the one at ``--database-url`` (default the local service,
``postgresql://postgres@127.0.0.1:5432/postgres``; env ``OTAGUARD_TEST_DATABASE_URL``);
each test gets its own database ``otaguard_t_<random>``, dropped afterwards.
``--database-url none`` runs the SQLite half only. Without a reachable server the
PostgreSQL half skips, and fails under ``CI=true``: CI must exercise both engines.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from otaguard.server.storage import sqlite_url

__all__ = ["DEFAULT_ADMIN_URL", "ENGINES", "fresh_database"]

DEFAULT_ADMIN_URL: Final = os.environ.get(
    "OTAGUARD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: the engines a ``database_url`` test runs on
ENGINES: Final = ("sqlite", "postgresql")


def _admin_url(config: pytest.Config) -> str | None:
    value = str(config.getoption("--database-url") or "")
    return None if value.lower() in ("", "none") else value


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
    pytest.skip(reason)


@contextmanager
def fresh_database(config: pytest.Config, engine: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of ``engine`` (``sqlite`` or ``postgresql``); yields its URL."""
    if engine == "sqlite":
        yield sqlite_url(tmp_path / "otaguard-test.db")
        return
    admin = _admin_url(config)
    if admin is None:
        _unavailable("PostgreSQL tests are off (--database-url none)")
        return
    admin_url = make_url(admin).set(drivername="postgresql+psycopg")
    admin_engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"otaguard_t_{secrets.token_hex(6)}"
    try:
        with admin_engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        admin_engine.dispose()
        _unavailable(f"no PostgreSQL at {admin_url.render_as_string()}: {e.orig}")
        return
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin_engine.connect() as conn:
            # FORCE: a pool a failed test left open must not keep the database alive.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()
