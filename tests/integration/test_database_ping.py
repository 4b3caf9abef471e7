"""A pooled PostgreSQL connection the database dropped is replaced before a request uses
it when it sat idle (ping after idle, storage/database.py), and the ping is not paid by a
connection used a moment ago (ADR 0036)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from db_support import fresh_database
from otaguard.server.storage import database
from otaguard.server.storage.database import create_db_engine


@pytest.fixture
def pg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    with fresh_database(request.config, "postgresql", tmp_path) as url:
        engine = create_db_engine(url)
        try:
            yield engine, url
        finally:
            engine.dispose()


def _terminate_backends(url: str) -> int:
    """Kill the otaguard pool's server processes, as a database restart does."""
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :d AND application_name = 'otaguard'"
                    ),
                    {"d": name},
                ).all()
            )
    finally:
        admin.dispose()


def test_a_connection_dropped_while_idle_is_replaced_before_use(
    pg: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, url = pg
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)  # every checkout is "idle"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert _terminate_backends(url) == 1
    # the pooled connection is dead; the request still succeeds on a fresh one
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 2")).scalar_one() == 2


def _count_pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    pings: list[object] = []
    real = engine.dialect.do_ping

    def counted(dbapi_conn: object) -> bool:
        pings.append(dbapi_conn)
        return real(dbapi_conn)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return pings


def test_a_connection_used_a_moment_ago_is_not_pinged(
    pg: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = pg
    pings = _count_pings(engine, monkeypatch)
    for _ in range(5):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert pings == []  # reused within PING_AFTER_IDLE_SECONDS: no round trip more
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert len(pings) == 1  # idle (by the patched bound): checked before use
