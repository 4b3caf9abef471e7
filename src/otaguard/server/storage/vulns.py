"""Imported vulnerabilities in SQL, and the reads vulnerability response needs.

Tables::

    vulnerabilities(id PK, source, summary, record, imported_at, imported_by, updated_at)

``record`` is the normalised advisory (:meth:`otaguard.model.vuln.Vulnerability.to_json`),
checked by the pure parser before it is stored. Importing an id again replaces the record
and keeps ``imported_at``: exposure is counted from the first time the operator knew.

The reads join the SBOM index (:mod:`.sboms`) and the check-in history
(:mod:`.checkins`): the components whose purl names a package, every indexed release,
and the accepted check-ins of devices that ever booted given images (by the image digest
they booted, as the SBOM index does).
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Column, DateTime, String, Table, Text, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import ServerStorageError
from otaguard.model.vuln import Vulnerability
from otaguard.server.storage.checkins import checkins_table
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.sboms import sbom_components_table, sbom_releases_table
from otaguard.server.storage.schema import SCHEMA

__all__ = [
    "MAX_HISTORY_ROWS",
    "MAX_VULNS_LISTED",
    "CheckinPoint",
    "IndexedComponent",
    "IndexedRelease",
    "SQLVulnStore",
    "StoredVuln",
    "VulnStore",
    "vulnerabilities_table",
]

#: vulnerabilities a list or a report covers: an operator's advisories, not a database
MAX_VULNS_LISTED: Final = 10_000
#: check-ins read for one report: 10,000 devices x 100 check-ins; past it the report says
#: it is cut rather than holding the whole table in memory
MAX_HISTORY_ROWS: Final = 1_000_000

vulnerabilities_table = Table(
    "vulnerabilities",
    SCHEMA,
    Column("id", String(128), primary_key=True),
    Column("source", String(16), nullable=False),
    Column("summary", String(1024), nullable=False),
    Column("record", Text, nullable=False),
    Column("imported_at", DateTime(timezone=True), nullable=False),
    Column("imported_by", String(64), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class StoredVuln:
    """An imported vulnerability and when it was first imported."""

    vuln: Vulnerability
    imported_at: dt.datetime
    imported_by: str


@dataclass(frozen=True)
class IndexedRelease:
    """A release of the SBOM index."""

    target: str
    version: str
    image_sha256: str


@dataclass(frozen=True)
class IndexedComponent:
    """A component of an indexed release."""

    target: str
    name: str
    version: str | None
    purl: str


@dataclass(frozen=True)
class CheckinPoint:
    """One accepted check-in: which image a device booted, when."""

    serial: str
    time: dt.datetime
    boot_sha256: str
    running_version: str


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; every value stored here was UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class VulnStore(ABC):
    """Imported vulnerabilities, and the index reads matching needs."""

    @abstractmethod
    def put(self, vuln: Vulnerability, *, actor: str, now: dt.datetime) -> bool:
        """Store ``vuln``; True if its id is new (else the record is replaced)."""

    @abstractmethod
    def get(self, vuln_id: str) -> StoredVuln | None:
        """One vulnerability, or None."""

    @abstractmethod
    def all(self) -> list[StoredVuln]:
        """Every vulnerability (at most :data:`MAX_VULNS_LISTED`), by id."""

    @abstractmethod
    def releases(self) -> list[IndexedRelease]:
        """Every indexed release."""

    @abstractmethod
    def components(self, package_purl: str, name: str) -> list[IndexedComponent]:
        """Indexed components with a purl whose package may be ``package_purl``: the
        purl starts with it, or the component is called ``name`` (any case; the caller
        compares normalised purls)."""

    @abstractmethod
    def history(self, images: Sequence[str]) -> tuple[list[CheckinPoint], bool]:
        """Accepted check-ins (by device, oldest first) of the devices that ever booted one
        of ``images``; and whether :data:`MAX_HISTORY_ROWS` cut them."""


class SQLVulnStore(VulnStore):
    """:class:`VulnStore` on the server's shared engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine):
        """Use ``engine`` (schema made current by the migrations)."""
        self._engine = engine

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"vulnerability store {what} failed", self._engine)

    def put(self, vuln: Vulnerability, *, actor: str, now: dt.datetime) -> bool:
        """See :meth:`VulnStore.put`."""
        t = vulnerabilities_table
        values = {"source": vuln.source, "summary": vuln.summary, "record": vuln.to_json()}
        try:
            with self._engine.begin() as conn:
                changed = conn.execute(
                    update(t).where(t.c.id == vuln.id).values(**values, updated_at=now)
                ).rowcount
            if changed:
                return False
            with self._engine.begin() as conn:
                conn.execute(
                    insert(t).values(
                        id=vuln.id, imported_at=now, imported_by=actor[:64], updated_at=now,
                        **values,
                    )
                )  # fmt: skip
        except IntegrityError:
            # Another import of the same id won the insert: replace its record instead.
            self.put(vuln, actor=actor, now=now)
            return False
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return True

    def _stored(self, row: object) -> StoredVuln:
        return StoredVuln(
            vuln=Vulnerability.from_json(row.record),  # type: ignore[attr-defined]
            imported_at=_utc(row.imported_at),  # type: ignore[attr-defined]
            imported_by=row.imported_by,  # type: ignore[attr-defined]
        )

    def get(self, vuln_id: str) -> StoredVuln | None:
        """See :meth:`VulnStore.get`."""
        t = vulnerabilities_table
        try:
            with self._engine.connect() as conn:
                row = conn.execute(select(t).where(t.c.id == vuln_id)).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return None if row is None else self._stored(row)

    def all(self) -> list[StoredVuln]:
        """See :meth:`VulnStore.all`."""
        t = vulnerabilities_table
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(select(t).order_by(t.c.id).limit(MAX_VULNS_LISTED)).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [self._stored(r) for r in rows]

    def releases(self) -> list[IndexedRelease]:
        """See :meth:`VulnStore.releases`."""
        r = sbom_releases_table.c
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(select(r.target, r.version, r.image_sha256)).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [IndexedRelease(row.target, row.version, row.image_sha256) for row in rows]

    def components(self, package_purl: str, name: str) -> list[IndexedComponent]:
        """See :meth:`VulnStore.components`."""
        c = sbom_components_table.c
        # The purl up to "@": a LIKE prefix, its wildcards escaped (names may hold "_").
        prefix = package_purl.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = (
            select(c.target, c.name, c.version, c.purl)
            .where(
                c.purl.is_not(None),
                (c.purl == package_purl)
                | c.purl.like(f"{prefix}@%", escape="\\")
                | (func.lower(c.name) == name.lower()),
            )
            .order_by(c.target, c.id)
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(stmt).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [IndexedComponent(row.target, row.name, row.version, row.purl) for row in rows]

    def history(self, images: Sequence[str]) -> tuple[list[CheckinPoint], bool]:
        """See :meth:`VulnStore.history`."""
        if not images:
            return [], False
        ch = checkins_table.c
        exposed = (
            select(ch.serial).where(ch.boot_sha256.in_(list(images))).distinct().scalar_subquery()
        )
        stmt = (
            select(ch.serial, ch.time, ch.boot_sha256, ch.running_version)
            .where(ch.serial.in_(exposed), ch.outcome == "accepted")
            .order_by(ch.serial, ch.time, ch.id)
            .limit(MAX_HISTORY_ROWS + 1)
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(stmt).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        points = [
            CheckinPoint(row.serial, _utc(row.time), row.boot_sha256, row.running_version)
            for row in rows[:MAX_HISTORY_ROWS]
        ]
        return points, len(rows) > MAX_HISTORY_ROWS
