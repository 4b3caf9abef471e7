"""A failed statement: the caller (and a client) gets what failed and the error class; the
operator's log gets the driver's own first line, which names the cause."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from otaguard.model.errors import ServerStorageError
from otaguard.server.storage.assignments import SQLAssignmentStore


def test_a_failed_statement_logs_the_drivers_cause_and_tells_the_caller_what_failed(
    db_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with db_engine.begin() as conn:
        conn.execute(text("DROP TABLE director_assignments"))
    with (
        caplog.at_level(logging.ERROR, logger="otaguard.server.storage.database"),
        pytest.raises(ServerStorageError) as raised,
    ):
        SQLAssignmentStore(db_engine).get("d1")
    message = str(raised.value)
    assert message.startswith("assignment store read failed: ")
    assert "director_assignments" not in message  # no database text to the caller
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        line.startswith("assignment store read failed: ") and "director_assignments" in line
        for line in logged
    ), logged
