"""Operator accounts and the audit log in a SQL database through SQLAlchemy 2 Core.

Tables::

    operators(name PK, role, token_hash UNIQUE, created_at, created_by, revoked_at)
    audit_log(seq PK, time, actor, role, action, target, result, request_id, detail,
              prev_hash UNIQUE, hash)

Tokens are stored only as their SHA-256. The audit log is append-only: this adapter has
no UPDATE or DELETE of it. Appending reads the newest entry and inserts the next one,
numbered ``seq + 1`` and chained to its hash, in one transaction. On PostgreSQL the
transaction first takes an advisory lock, so appends from several server processes
queue instead of racing; everywhere, ``seq`` is the key and ``prev_hash`` unique, so an
append that still loses a race fails and retries on the new head instead of forking the
chain.
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
import random
import threading
import time
from typing import Any, Final

from sqlalchemy import Column, DateTime, Integer, String, Table, insert, select, text, update
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import ServerStorageError, StateConflictError
from otaguard.server.audit_chain import GENESIS, AuditEntry, entry_hash
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.fleet_base import (
    AuditStore,
    NameExistsError,
    NewAuditEntry,
    OperatorRecord,
    OperatorStore,
    UnknownNameError,
)
from otaguard.server.storage.schema import SCHEMA

__all__ = ["APPEND_ATTEMPTS", "MAX_AUDIT_TEXT", "SQLAuditStore", "SQLOperatorStore"]

logger = logging.getLogger(__name__)

#: free text per audit column; longer is cut before hashing, so the stored text is hashed
MAX_AUDIT_TEXT: Final = 500
#: concurrent appends from other processes that may win before ours gives up; each
#: losing attempt costs one short transaction, and a log this contended is a bug
APPEND_ATTEMPTS: Final = 8
# Up to this long (seconds, random) between attempts, so racing appenders spread out.
_RETRY_JITTER: Final = 0.02
# Key of the PostgreSQL transaction-level advisory lock that queues audit appends (any
# constant; "otaguard audit" in ASCII, 8 bytes).
_PG_AUDIT_LOCK: Final = int.from_bytes(b"otgaudit", "big") >> 1

_schema = SCHEMA
operators_table = Table(
    "operators",
    _schema,
    Column("name", String(64), primary_key=True),
    Column("role", String(32), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)
audit_table = Table(
    "audit_log",
    _schema,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("actor", String(64), nullable=False),
    Column("role", String(32), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(MAX_AUDIT_TEXT), nullable=False),
    Column("result", String(MAX_AUDIT_TEXT), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("detail", String(MAX_AUDIT_TEXT), nullable=False),
    Column("prev_hash", String(64), nullable=False, unique=True),
    Column("hash", String(64), nullable=False),
)


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; every value stored here was UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _operator(row: Row[Any]) -> OperatorRecord:
    return OperatorRecord(
        name=row.name,
        role=row.role,
        created_at=_utc(row.created_at),
        created_by=row.created_by,
        revoked_at=_utc(row.revoked_at) if row.revoked_at is not None else None,
    )


class SQLOperatorStore(OperatorStore):
    """:class:`OperatorStore` on any SQLAlchemy 2 database URL."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current.

        Args:
            engine: from :func:`~otaguard.server.storage.migrate.open_database`.
        """
        self._engine = engine

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"operator store {what} failed", self._engine)

    def add(
        self, name: str, *, role: str, token_hash: str, created_by: str, now: dt.datetime
    ) -> OperatorRecord:
        """See :meth:`OperatorStore.add`."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(operators_table).values(
                        name=name,
                        role=role,
                        token_hash=token_hash,
                        created_at=now,
                        created_by=created_by,
                        revoked_at=None,
                    )
                )
        except IntegrityError as e:
            raise NameExistsError(f"an operator named {name!r} exists (or existed)") from e
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        logger.info("operator %s created with role %s by %s", name, role, created_by)
        return OperatorRecord(name, role, now, created_by, None)

    def by_token_hash(self, token_hash: str) -> OperatorRecord | None:
        """See :meth:`OperatorStore.by_token_hash`."""
        try:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(operators_table).where(operators_table.c.token_hash == token_hash)
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return _operator(row) if row is not None else None

    def list(self) -> builtins.list[OperatorRecord]:
        """See :meth:`OperatorStore.list`."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(select(operators_table).order_by(operators_table.c.name)).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [_operator(r) for r in rows]

    def revoke(self, name: str, *, now: dt.datetime) -> OperatorRecord:
        """See :meth:`OperatorStore.revoke`."""
        try:
            with self._engine.begin() as conn:
                row = conn.execute(
                    select(operators_table).where(operators_table.c.name == name)
                ).first()
                if row is None:
                    raise UnknownNameError(f"no operator named {name!r}")
                if row.revoked_at is not None:
                    raise StateConflictError(f"operator {name!r} is already revoked")
                conn.execute(
                    update(operators_table)
                    .where(operators_table.c.name == name)
                    .values(revoked_at=now)
                )
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        logger.warning("operator %s revoked", name)
        return OperatorRecord(row.name, row.role, _utc(row.created_at), row.created_by, now)

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._engine.dispose()


def _entry(row: Row[Any]) -> AuditEntry:
    return AuditEntry(
        seq=int(row.seq),
        time=_utc(row.time),
        actor=row.actor,
        role=row.role,
        action=row.action,
        target=row.target,
        result=row.result,
        request_id=row.request_id,
        detail=row.detail,
        prev=row.prev_hash,
        hash=row.hash,
    )


class SQLAuditStore(AuditStore):
    """:class:`AuditStore` on any SQLAlchemy 2 database URL (append-only)."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current.

        Args:
            engine: from :func:`~otaguard.server.storage.migrate.open_database`.
        """
        # Serialises appends within this process; across processes the unique
        # prev_hash decides and the loser retries.
        self._lock = threading.Lock()
        self._engine = engine

    def append(self, entry: NewAuditEntry, *, now: dt.datetime) -> AuditEntry:
        """See :meth:`AuditStore.append`.

        Raises:
            ServerStorageError: the database failed, or other writers kept winning.
        """
        fields = {
            "actor": entry.actor[:64],
            "role": entry.role[:32],
            "action": entry.action[:64],
            "target": entry.target[:MAX_AUDIT_TEXT],
            "result": entry.result[:MAX_AUDIT_TEXT],
            "request_id": entry.request_id[:64],
            "detail": entry.detail[:MAX_AUDIT_TEXT],
        }
        # Hashed with the microseconds the database keeps, nothing finer.
        now = now.astimezone(dt.UTC)
        for _attempt in range(APPEND_ATTEMPTS):
            try:
                with self._lock, self._engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_AUDIT_LOCK}
                        )
                    head = conn.execute(
                        select(audit_table.c.seq, audit_table.c.hash)
                        .order_by(audit_table.c.seq.desc())
                        .limit(1)
                    ).first()
                    seq, prev = (int(head.seq) + 1, head.hash) if head else (1, GENESIS)
                    digest = entry_hash(seq=seq, time=now, prev=prev, **fields)
                    conn.execute(
                        insert(audit_table).values(
                            seq=seq, time=now, prev_hash=prev, hash=digest, **fields
                        )
                    )
            except IntegrityError:
                logger.debug("audit append lost a race; retrying on the new head")
                time.sleep(random.uniform(0, _RETRY_JITTER))  # noqa: S311 - not a secret
                continue
            except SQLAlchemyError as e:
                raise storage_failure(e, "audit log write failed", self._engine) from e
            return AuditEntry(seq=seq, time=now, prev=prev, hash=digest, **fields)
        raise ServerStorageError(f"audit log write lost {APPEND_ATTEMPTS} races in a row")

    def entries(
        self, *, after_seq: int = 0, since: dt.datetime | None = None, limit: int
    ) -> list[AuditEntry]:
        """See :meth:`AuditStore.entries`."""
        stmt = select(audit_table).where(audit_table.c.seq > after_seq)
        if since is not None:
            stmt = stmt.where(audit_table.c.time >= since.astimezone(dt.UTC))
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(stmt.order_by(audit_table.c.seq).limit(limit)).all()
        except SQLAlchemyError as e:
            raise storage_failure(e, "audit log read failed", self._engine) from e
        return [_entry(r) for r in rows]

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._engine.dispose()
