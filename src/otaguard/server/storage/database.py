"""Connecting to the server's database: the embedded SQLite file or PostgreSQL.

One engine per server process, shared by every SQL store (:mod:`.sql`, :mod:`.devices`,
:mod:`.checkins`). URLs:

* ``sqlite+pysqlite:////abs/path/otaguard.db`` (:func:`sqlite_url`): the embedded default,
  ``DATA/otaguard.db``; WAL, a busy timeout and foreign keys on every connection.
* ``postgresql+psycopg://user:password@host:5432/dbname`` (psycopg 3; plain
  ``postgresql://`` means the same): for several server processes sharing one database.
  Every connection gets a statement and a lock timeout, the pool is bounded and a connection
  idle for a while is checked before use (:data:`POOL_SIZE` and the other limits below).

A URL may carry a password: it only ever reaches logs and messages through
:func:`mask_url`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Final

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, SQLAlchemyError

from otaguard.model.errors import ConfigError, ServerStorageError

__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "LOCK_TIMEOUT_MS",
    "MAX_OVERFLOW",
    "PING_AFTER_IDLE_SECONDS",
    "POOL_RECYCLE_SECONDS",
    "POOL_SIZE",
    "POOL_TIMEOUT_SECONDS",
    "SQLITE_BUSY_TIMEOUT_MS",
    "STATEMENT_TIMEOUT_MS",
    "create_db_engine",
    "describe_error",
    "mask_url",
    "normalise_url",
    "ping_when_idle",
    "sqlite_url",
    "storage_failure",
]

logger = logging.getLogger(__name__)

# SQLite writers wait this long for the file lock before failing with ServerStorageError.
# One writer at a time, and SQLite's busy handler polls (every 100 ms once waiting long):
# on an overloaded 2-core machine 16 check-ins in flight queued past 5 s and got 503s
# ("database is locked"); a device would rather wait than poll again later.
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
#: connections kept open per server process: uvicorn's thread pool runs at most 40 sync
#: requests at once, most of which are short reads; 10 + 5 overflow serve them, and N
#: processes stay well below PostgreSQL's default max_connections (100). A connection
#: beyond the pool size is opened and closed per use (a PostgreSQL backend started each
#: time, milliseconds of CPU): 10 kept covers a worker's check-ins in flight at once
#: (ADR 0012: 5 churned an overflow connection every few check-ins under load)
POOL_SIZE: Final = 10
MAX_OVERFLOW: Final = 5
# A request waiting longer than this for a pooled connection fails (503-like storage
# error) instead of piling up behind a stuck database.
POOL_TIMEOUT_SECONDS: Final = 10
# Connections are replaced after this, so a failover or a proxy's idle cut is survived.
POOL_RECYCLE_SECONDS: Final = 1800
# Every statement the server runs is a short OLTP query; one running longer is stuck
# (or a hostile request found a slow path) and is cancelled rather than holding a worker.
STATEMENT_TIMEOUT_MS: Final = 15_000
# A row lock (a publication, a token redeemed by two clients) is held for milliseconds;
# waiting longer than this means a stuck transaction elsewhere.
LOCK_TIMEOUT_MS: Final = 5_000
#: a pooled connection idle longer than this is pinged (one round trip) before a request
#: uses it, so a database restart or failover during a quiet spell is noticed before a
#: request fails. One used more recently is not: under load every connection is, and the
#: ping was one statement more per check-in (ADR 0036). A connection the database dropped
#: within this time fails its request once, and the disconnect invalidates the whole pool
#: (SQLAlchemy's disconnect handling), so the next requests get fresh connections.
PING_AFTER_IDLE_SECONDS: Final = 1.0
# Connecting to an unreachable database fails after this instead of hanging start-up.
CONNECT_TIMEOUT_SECONDS: Final = 10

_POSTGRES_DRIVER: Final = "postgresql+psycopg"
_INVALID: Final = "<invalid database URL>"


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of a SQLite database file."""
    return f"sqlite+pysqlite:///{Path(path).resolve()}"


def mask_url(url: str | URL) -> str:
    """Return ``url`` fit for logs and messages: its password replaced by ``***``."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return _INVALID
    return parsed.render_as_string(hide_password=True)


# Enough of a driver's message to name the cause ("database "x" does not exist").
_MAX_ERROR_CHARS: Final = 200


def describe_error(e: BaseException, url: str | URL) -> str:
    """One line naming a database failure: the error class and the driver's first line.

    The URL's password is cut out of the text, should a driver ever echo it.
    """
    orig = getattr(e, "orig", None) or e
    lines = str(orig).strip().splitlines()
    first = " ".join(lines[0].split()) if lines else ""
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError, TypeError):
        password = None
    if password:
        first = first.replace(str(password), "***")
    first = first[:_MAX_ERROR_CHARS]
    return f"{e.__class__.__name__}: {first}" if first else e.__class__.__name__


def storage_failure(e: SQLAlchemyError, message: str, engine: Engine) -> ServerStorageError:
    """The error a store raises for a failed statement: ``message: ErrorClass`` for the
    caller and the client (nothing of the database's own text), after logging the
    driver's first line for the operator (the URL's password cut out)."""
    logger.error("%s: %s", message, describe_error(e, engine.url))
    return ServerStorageError(f"{message}: {e.__class__.__name__}")


def normalise_url(url: str) -> URL:
    """Parse a database URL and pick the driver: psycopg 3 for PostgreSQL.

    Raises:
        ConfigError: the URL is malformed or names a database otaguard does not support
            (only SQLite and PostgreSQL); the message never contains the password.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as e:
        raise ConfigError(
            "the database URL is malformed (expected e.g. "
            "postgresql://user@host:5432/otaguard or sqlite:////path/otaguard.db)"
        ) from e
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):  # postgres://: the libpq spelling
        if parsed.drivername != _POSTGRES_DRIVER:
            # psycopg 3 is the one driver installed and tested.
            parsed = parsed.set(drivername=_POSTGRES_DRIVER)
        if not parsed.database:
            raise ConfigError(f"the database URL names no database: {mask_url(parsed)}")
        return parsed
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            # Each pooled connection would see its own empty in-memory database.
            raise ConfigError("a SQLite database URL must name a file")
        return parsed
    raise ConfigError(
        f"unsupported database {backend!r} in {mask_url(parsed)}: use sqlite or postgresql"
    )


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """SQLAlchemy ``connect`` hook: WAL, a busy timeout and foreign keys on SQLite."""
    cur = dbapi_conn.cursor()
    try:
        # WAL lets devices read while a publish writes; foreign keys keep the pointer honest.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _idle_since(record: Any) -> float | None:
    since = record.info.get("otaguard_idle_since")
    return since if isinstance(since, float) else None


def ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection on checkout when it sat idle past
    :data:`PING_AFTER_IDLE_SECONDS`; a dead one is replaced (the pool retries)."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        record.info["otaguard_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _taken(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = _idle_since(record)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return  # new, or in use a moment ago
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as e:
            if dialect.is_disconnect(e, dbapi_conn, None):
                # the pool discards it and checks out (or opens) another
                raise DisconnectionError(describe_error(e, engine.url)) from e
            raise


def create_db_engine(url: str) -> Engine:
    """Create the engine (connection pool) for ``url``; connects lazily.

    Raises:
        ConfigError: the URL is malformed or unsupported.
        ServerStorageError: the driver cannot be loaded.
    """
    parsed = normalise_url(url)
    try:
        if parsed.get_backend_name() == "postgresql":
            engine = create_engine(
                parsed,
                pool_size=POOL_SIZE,
                max_overflow=MAX_OVERFLOW,
                pool_timeout=POOL_TIMEOUT_SECONDS,
                pool_recycle=POOL_RECYCLE_SECONDS,
                # not pre_ping (a round trip per checkout): ping_when_idle below
                connect_args={
                    "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                    "application_name": "otaguard",
                    "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
                    f"-c lock_timeout={LOCK_TIMEOUT_MS}",
                },
            )
            ping_when_idle(engine)
        else:
            engine = create_engine(parsed)
            event.listen(engine, "connect", sqlite_pragmas)
    except (SQLAlchemyError, ImportError) as e:
        raise ServerStorageError(
            f"cannot use the database {mask_url(parsed)}: {e.__class__.__name__}"
        ) from e
    logger.debug("database engine for %s", mask_url(parsed))
    return engine
