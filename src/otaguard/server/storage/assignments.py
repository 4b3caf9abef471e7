"""Operator assignments for the director, in SQL next to the registry.

Table::

    director_assignments(serial PK -> devices, mode, version, assigned_at)

``mode`` is ``release`` (install ``version``) or ``hold`` (install nothing). No row: the
default policy (the newest release for the device's hardware id). Kept simple on
purpose: rollouts and channels (issue 7, another part) replace the policy, not this.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    String,
    Table,
    bindparam,
    delete,
    insert,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from otaguard.model.errors import ServerStorageError
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.schema import SCHEMA
from otaguard.server.storage.unit import reading

__all__ = [
    "ASSIGNMENT_MODES",
    "Assignment",
    "AssignmentStore",
    "SQLAssignmentStore",
    "assignments_table",
]

#: ``release``: install that version; ``hold``: install nothing
ASSIGNMENT_MODES: Final = ("release", "hold")

_schema = SCHEMA
assignments_table = Table(
    "director_assignments",
    _schema,
    Column("serial", String(64), ForeignKey("devices.serial"), primary_key=True),
    Column("mode", String(16), nullable=False),
    Column("version", String(256), nullable=True),
    Column("assigned_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class Assignment:
    """What an operator assigned to one device."""

    serial: str
    mode: str
    version: str | None
    assigned_at: dt.datetime

    def __post_init__(self) -> None:
        if self.mode not in ASSIGNMENT_MODES:
            raise ValueError(f"assignment mode must be one of {ASSIGNMENT_MODES}")
        if (self.mode == "release") != (self.version is not None):
            raise ValueError("a release assignment names a version; a hold names none")


class AssignmentStore(ABC):
    """Per-device operator assignments (one per device at most)."""

    @abstractmethod
    def get(self, serial: str) -> Assignment | None:
        """The device's assignment, ``None`` for the default policy."""

    @abstractmethod
    def set(self, assignment: Assignment) -> None:
        """Replace the device's assignment."""

    @abstractmethod
    def clear(self, serial: str) -> None:
        """Back to the default policy."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


# Read on every check-in's answer, so built once.
_GET: Final = select(assignments_table).where(assignments_table.c.serial == bindparam("serial"))


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class SQLAssignmentStore(AssignmentStore):
    """:class:`AssignmentStore` on any SQLAlchemy 2 database URL."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current.

        Args:
            engine: from :func:`~otaguard.server.storage.migrate.open_database`.
        """
        self._engine = engine

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"assignment store {what} failed", self._engine)

    def get(self, serial: str) -> Assignment | None:
        """See :meth:`AssignmentStore.get`."""
        try:
            with reading(self._engine) as conn:
                row = conn.execute(_GET, {"serial": serial}).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        if row is None:
            return None
        return Assignment(row.serial, row.mode, row.version, _utc(row.assigned_at))

    def all(self, *, limit: int) -> list[Assignment]:
        """Every assignment, at most ``limit`` of them (by serial)."""
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(
                    select(assignments_table).order_by(assignments_table.c.serial).limit(limit)
                ).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [Assignment(r.serial, r.mode, r.version, _utc(r.assigned_at)) for r in rows]

    def set(self, assignment: Assignment) -> None:
        """See :meth:`AssignmentStore.set`."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    delete(assignments_table).where(assignments_table.c.serial == assignment.serial)
                )
                conn.execute(
                    insert(assignments_table).values(
                        serial=assignment.serial,
                        mode=assignment.mode,
                        version=assignment.version,
                        assigned_at=assignment.assigned_at,
                    )
                )
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def clear(self, serial: str) -> None:
        """See :meth:`AssignmentStore.clear`."""
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(assignments_table).where(assignments_table.c.serial == serial))
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def close(self) -> None:
        """Dispose of the engine."""
        self._engine.dispose()
