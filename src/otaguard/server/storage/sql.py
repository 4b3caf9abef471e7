"""Metadata in a SQL database through SQLAlchemy 2 Core.

SQLite is the embedded default (``DATA/otaguard.db``); the same tables work unchanged on
PostgreSQL (``postgresql+psycopg://...``) because only portable column types are used.
With :mod:`.devices` (the fleet registry), :mod:`.checkins`, :mod:`.database` and
:mod:`.migrate`, the only modules of the server that import SQLAlchemy. The tables are
created by the migrations (:mod:`.migrate`), never here.

Tables::

    metadata(filename PK, role, version, sha256, data, published_at)
    current(name PK, filename -> metadata.filename, updated_at)   # name = "timestamp"
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import ConflictError, VerificationError
from otaguard.server.storage.base import (
    MetadataRecord,
    MetadataStore,
    PublishOutcome,
)
from otaguard.server.storage.database import sqlite_url, storage_failure
from otaguard.server.storage.schema import SCHEMA
from otaguard.server.storage.unit import reading

__all__ = ["SQLMetadataStore", "sqlite_url"]

logger = logging.getLogger(__name__)

TIMESTAMP_POINTER: Final = "timestamp"

_schema = SCHEMA
metadata_table = Table(
    "metadata",
    _schema,
    Column("filename", String(255), primary_key=True),
    Column("role", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=False),
    Index("ix_metadata_role_version", "role", "version"),
)
current_table = Table(
    "current",
    _schema,
    Column("name", String(32), primary_key=True),
    Column("filename", String(255), ForeignKey("metadata.filename"), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


# Read on every check-in (twice), so built once.
_NEWEST_VERSION: Final = select(func.max(metadata_table.c.version)).where(
    metadata_table.c.role == bindparam("role")
)


def _record(row: Row[Any]) -> MetadataRecord:
    return MetadataRecord(
        filename=row.filename,
        role=row.role,
        version=int(row.version),
        data=bytes(row.data),
        sha256=row.sha256,
    )


class SQLMetadataStore(MetadataStore):
    """:class:`MetadataStore` on any SQLAlchemy 2 database URL."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current.

        Args:
            engine: from :func:`~otaguard.server.storage.migrate.open_database`.
        """
        # Serialises publishes within this process; across processes the transaction
        # re-checks the pointer (compare-and-swap) and the database's own locks decide.
        self._publish_lock = threading.Lock()
        self._engine = engine

    def _one(self, stmt: Any, params: dict[str, Any] | None = None) -> Row[Any] | None:
        try:
            with reading(self._engine) as conn:
                return conn.execute(stmt, params).first()
        except SQLAlchemyError as e:
            raise storage_failure(e, "metadata database read failed", self._engine) from e

    def get(self, filename: str) -> bytes | None:
        """Return the stored bytes of ``filename``, or ``None``."""
        row = self._one(select(metadata_table.c.data).where(metadata_table.c.filename == filename))
        return None if row is None else bytes(row.data)

    def get_record(self, filename: str) -> MetadataRecord | None:
        """Return the stored record of ``filename``, or ``None``."""
        row = self._one(select(metadata_table).where(metadata_table.c.filename == filename))
        return None if row is None else _record(row)

    def current_timestamp(self) -> MetadataRecord | None:
        """Return the timestamp the pointer names, or ``None`` before the first publish."""
        stmt = (
            select(metadata_table)
            .join(current_table, current_table.c.filename == metadata_table.c.filename)
            .where(current_table.c.name == TIMESTAMP_POINTER)
        )
        row = self._one(stmt)
        return None if row is None else _record(row)

    def newest(self, role: str) -> MetadataRecord | None:
        """Return the highest-version stored record of ``role``."""
        stmt = (
            select(metadata_table)
            .where(metadata_table.c.role == role)
            .order_by(metadata_table.c.version.desc())
            .limit(1)
        )
        row = self._one(stmt)
        return None if row is None else _record(row)

    def newest_version(self, role: str) -> int | None:
        """Return the highest stored version of ``role`` (an index-only read, no bytes)."""
        row = self._one(_NEWEST_VERSION, {"role": role})
        return None if row is None or row[0] is None else int(row[0])

    def publish(
        self,
        records: Sequence[MetadataRecord],
        *,
        timestamp: str | None,
        now: dt.datetime,
        expected_timestamp: str | None,
    ) -> PublishOutcome:
        """Insert ``records`` and move the timestamp pointer in one transaction.

        See :meth:`MetadataStore.publish`.

        Raises:
            ConflictError: another publish moved the pointer since the caller read it, or
                inserted one of the same rows first; nothing was changed.
            VerificationError: a versioned file exists with different bytes.
            ServerStorageError: the database failed; nothing was changed.
        """
        added: list[str] = []
        unchanged: list[str] = []
        try:
            with self._publish_lock, self._engine.begin() as conn:
                self._check_pointer(conn, expected_timestamp)
                for rec in records:
                    if self._insert(conn, rec, now):
                        added.append(rec.filename)
                    else:
                        unchanged.append(rec.filename)
                moved = timestamp is not None and timestamp != expected_timestamp
                if moved:
                    values = {"filename": timestamp, "updated_at": now}
                    if expected_timestamp is None:
                        # A concurrent first publish inserts the same key: IntegrityError.
                        conn.execute(insert(current_table).values(name=TIMESTAMP_POINTER, **values))
                    else:
                        # Compare-and-swap in the statement itself: whatever the isolation
                        # level or engine (SQLite takes no row lock for FOR UPDATE), only a
                        # pointer still at the expected value moves.
                        moved_rows = conn.execute(
                            update(current_table)
                            .where(
                                current_table.c.name == TIMESTAMP_POINTER,
                                current_table.c.filename == expected_timestamp,
                            )
                            .values(**values)
                        ).rowcount
                        if moved_rows != 1:
                            raise ConflictError("a concurrent publish moved the timestamp; retry")
        except IntegrityError as e:
            # A concurrent writer (another process on the same database) inserted the
            # same filename or the first pointer between our check and our insert.
            raise ConflictError("a concurrent publish changed the repository; retry") from e
        except SQLAlchemyError as e:
            raise storage_failure(e, "publish transaction failed", self._engine) from e
        if moved:
            logger.info("timestamp pointer moved to %s", timestamp)
        return PublishOutcome(
            added=tuple(added),
            unchanged=tuple(unchanged),
            timestamp_filename=timestamp if moved else None,
            published_at=now,
        )

    @staticmethod
    def _check_pointer(conn: Connection, expected: str | None) -> None:
        stmt = (
            select(current_table.c.filename)
            .where(current_table.c.name == TIMESTAMP_POINTER)
            .with_for_update()
        )
        current = conn.execute(stmt).scalar_one_or_none()
        if current != expected:
            # Compare-and-swap failed: the caller verified against another served state.
            raise ConflictError("a concurrent publish moved the timestamp; retry")

    @staticmethod
    def _insert(conn: Connection, rec: MetadataRecord, now: dt.datetime) -> bool:
        stmt = select(metadata_table.c.sha256, metadata_table.c.data).where(
            metadata_table.c.filename == rec.filename
        )
        existing = conn.execute(stmt).first()
        if existing is not None:
            if existing.sha256 == rec.sha256 and bytes(existing.data) == rec.data:
                return False
            raise VerificationError(
                f"{rec.filename} is already published with different content; "
                "versioned metadata is immutable"
            )
        conn.execute(
            insert(metadata_table).values(
                filename=rec.filename,
                role=rec.role,
                version=rec.version,
                sha256=rec.sha256,
                data=rec.data,
                published_at=now,
            )
        )
        return True

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._engine.dispose()
