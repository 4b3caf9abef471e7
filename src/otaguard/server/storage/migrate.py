"""Schema migrations of the server's database (Alembic, shipped inside the package).

The scripts live in ``otaguard/server/storage/migrations/versions`` and are found through
the package (``otaguard.server.storage:migrations``), so an installed wheel migrates
without any file of the source tree. Nothing here calls ``create_all``.

Policy (ADR 0009):

* the embedded SQLite database (no ``--database-url``) is upgraded when the server
  starts: one process owns it;
* a shared database (``--database-url``, PostgreSQL) is upgraded by the operator,
  ``otaguard server db upgrade --database-url URL``; a server finding it behind refuses
  to start with that command in the message, so a rolling restart never migrates under
  processes still running the previous version;
* every upgrade runs in one transaction under a lock (PostgreSQL: an advisory lock;
  SQLite: ``BEGIN IMMEDIATE``), so two processes upgrading at once migrate once;
* a database an older otaguard made with ``create_all`` (the baseline tables and no
  ``alembic_version``) is adopted at the baseline revision, then upgraded.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from otaguard.model.errors import ConfigError, ServerStorageError
from otaguard.server.storage.database import (
    create_db_engine,
    describe_error,
    mask_url,
    sqlite_url,
)

__all__ = [
    "BASELINE_REVISION",
    "DatabaseBehindError",
    "current_revision",
    "head_revision",
    "new_revision",
    "open_database",
    "require_current",
    "upgrade_database",
]

logger = logging.getLogger(__name__)

#: where the migration scripts are, as a package resource
SCRIPT_LOCATION: Final = "otaguard.server.storage:migrations"
#: the revision that matches the tables older servers created with ``create_all``
BASELINE_REVISION: Final = "0001"
# Tables every database at the baseline has; their presence without alembic_version
# marks a database made by a server from before migrations.
_BASELINE_TABLES: Final = frozenset(
    {
        "metadata",
        "current",
        "devices",
        "device_certs",
        "enrollment_tokens",
        "checkin_nonces",
        "checkins",
        "attestation_keys",
        "device_alerts",
    }
)
# A migration may rebuild an index on a large table: the server's per-statement timeout
# does not apply to it. Another migrator waits this long for the lock, then gives up.
MIGRATION_LOCK_TIMEOUT_MS: Final = 10 * 60 * 1000
# pg_advisory_xact_lock key: "otagdb" in ASCII; any fixed 64-bit number otaguard owns.
ADVISORY_LOCK_KEY: Final = 0x6F7461676462


class DatabaseBehindError(ConfigError):
    """The database's schema is older (or newer) than this server's code."""


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision this code knows (its models' schema)."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships revisions
        raise RuntimeError("no migration revisions are packaged")
    return head


def _known(revision: str) -> bool:
    try:
        ScriptDirectory.from_config(_config()).get_revision(revision)
    except CommandError:
        return False
    return True


@contextmanager
def _migration_engine(url: str) -> Iterator[Engine]:
    """An engine whose transactions lock out other migrators (disposed afterwards)."""
    engine = create_db_engine(url)
    if engine.dialect.name == "sqlite":
        # pysqlite begins transactions lazily (and never for DDL); take the write lock
        # at BEGIN so the whole migration is one transaction no other process enters.
        def _autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        event.listen(engine, "connect", _autocommit_driver)
        event.listen(engine, "begin", _begin_immediate)
    try:
        yield engine
    finally:
        engine.dispose()


def _revision_of(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current_revision(url: str) -> str | None:
    """The database's revision (``None``: no otaguard schema, or one from before migrations).

    Raises:
        ConfigError: the URL is malformed or unsupported.
        ServerStorageError: the database cannot be reached.
    """
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return _revision_of(conn)
    except SQLAlchemyError as e:
        raise ServerStorageError(
            f"cannot read the schema revision of {mask_url(url)}: {describe_error(e, url)}"
        ) from e
    finally:
        engine.dispose()


def _adopt_legacy(conn: Connection) -> None:
    """Stamp a database made by ``create_all`` (pre-migration servers) at the baseline."""
    tables = set(inspect(conn).get_table_names())
    if not tables & _BASELINE_TABLES:
        return  # empty (or someone else's tables only): migrate from scratch
    if not tables >= _BASELINE_TABLES:
        raise ServerStorageError(
            "the database holds some otaguard tables but no schema revision "
            f"(missing: {', '.join(sorted(_BASELINE_TABLES - tables))}); refusing to guess"
        )
    logger.warning(
        "adopting a database created before migrations at revision %s", BASELINE_REVISION
    )
    command.stamp(_config(conn), BASELINE_REVISION)


def upgrade_database(url: str, *, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the database at ``url`` to ``revision``, in one locked transaction.

    Args:
        url: the database URL (its password is never logged).
        revision: target revision; ``head`` is this code's schema.

    Returns:
        The revision before and after.

    Raises:
        DatabaseBehindError: the database is at a revision this code does not know (a
            newer otaguard migrated it).
        ConfigError: the URL is malformed or unsupported.
        ServerStorageError: the database failed; nothing was changed.
    """
    with _migration_engine(url) as engine:
        try:
            with engine.connect() as conn, conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {MIGRATION_LOCK_TIMEOUT_MS}")
                    # Several server processes (or operators) upgrading at once: one
                    # migrates, the others wait and then find nothing to do.
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
                    )
                before = _revision_of(conn)
                if before is not None and not _known(before):
                    raise DatabaseBehindError(
                        f"the database {mask_url(url)} is at schema revision {before}, which "
                        f"this otaguard does not know (its newest is {head_revision()}): "
                        "a newer otaguard migrated it; upgrade otaguard"
                    )
                if before is None:
                    _adopt_legacy(conn)
                command.upgrade(_config(conn), revision)
                after = _revision_of(conn)
        except (SQLAlchemyError, CommandError) as e:
            raise ServerStorageError(
                f"migrating the database {mask_url(url)} failed: {describe_error(e, url)}"
            ) from e
    if before != after:
        logger.info("database %s migrated from %s to %s", mask_url(url), before, after)
    return before, after


def require_current(url: str) -> None:
    """Refuse a database whose schema is not this code's (behind or ahead).

    Raises:
        DatabaseBehindError: the database is behind (the message gives the command that
            upgrades it) or ahead of this code.
        ServerStorageError: the database cannot be reached.
    """
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    if current is not None and not _known(current):
        raise DatabaseBehindError(
            f"the database {mask_url(url)} is at schema revision {current}, newer than this "
            f"otaguard knows ({head}): upgrade otaguard"
        )
    raise DatabaseBehindError(
        f"the database {mask_url(url)} is at schema revision {current or 'none'}, this "
        f"server needs {head}: run 'otaguard server db upgrade --database-url URL' "
        "(or set OTAGUARD_DATABASE_URL) first"
    )


def open_database(url: str, *, upgrade: bool) -> Engine:
    """The engine the server's stores share, its schema at this code's revision.

    Args:
        url: the database URL.
        upgrade: migrate to the newest revision first (embedded SQLite); otherwise
            refuse a database that is not at it (a shared database the operator migrates).

    Raises:
        DatabaseBehindError: ``upgrade`` is false and the database is not current.
        ConfigError: the URL is malformed or unsupported.
        ServerStorageError: the database cannot be reached or migrated.
    """
    if upgrade:
        upgrade_database(url)
    else:
        require_current(url)
    return create_db_engine(url)


def new_revision(message: str) -> Path:
    """Write a new revision script autogenerated from the models (for developers).

    A scratch SQLite database is upgraded to the current head and compared with the
    models; what differs becomes ``rNNNN_<slug>.py`` in the package's ``versions``
    directory. Review it (and run the migration tests on both engines) before committing.

    Returns:
        The path of the new script.
    """
    head = head_revision()
    rev_id = f"{int(head) + 1:04d}"
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40] or "change"
    with tempfile.TemporaryDirectory() as tmp:
        url = sqlite_url(Path(tmp) / "scratch.db")
        upgrade_database(url)
        with _migration_engine(url) as engine, engine.connect() as conn, conn.begin():
            cfg = _config(conn)
            cfg.set_main_option("file_template", f"r{rev_id}_{slug}")
            script = command.revision(cfg, message=message, autogenerate=True, rev_id=rev_id)
    if script is None or isinstance(script, list):  # pragma: no cover - one head
        raise RuntimeError("alembic wrote no single revision")
    return Path(script.path)
