"""The SBOM index in SQL: each published release's components, for vulnerability response.

Tables::

    sbom_releases(target PK, version, image_sha256, sbom_sha256, indexed_at)
    sbom_components(id PK, target -> sbom_releases, name, version, purl, type)

A release is indexed once, from the SBOM its signed target binds (the exact bytes, hash
checked), when the server first sees it published; a withdrawn release stays indexed
because devices may still run it. "Which devices run a vulnerable X" is
:meth:`SbomStore.releases_with_component` joined with each device's newest check-in
(:meth:`SbomStore.devices_running`) by the image digest the device booted (its boot
measurement, TPM-attested where it has a TPM), not by a name the device reports.
Indexing one release is one transaction and the release row is its primary key, so two
server processes indexing at once insert it once.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    and_,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import ServerStorageError
from otaguard.model.sbom import Component
from otaguard.server.storage.checkins import checkins_table
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.schema import SCHEMA

__all__ = [
    "MAX_FIELD_CHARS",
    "MAX_FIND_RESULTS",
    "ComponentHit",
    "RunningDevice",
    "SQLSbomStore",
    "SbomStore",
    "sbom_components_table",
    "sbom_releases_table",
]

#: component fields longer than this are cut (model/sbom.py refuses longer ones already)
MAX_FIELD_CHARS: Final = 1024
#: a query answers at most this many release/component rows: an operator's question, not
#: an export of the index
MAX_FIND_RESULTS: Final = 1000

sbom_releases_table = Table(
    "sbom_releases",
    SCHEMA,
    Column("target", String(256), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("image_sha256", String(64), nullable=False, index=True),
    Column("sbom_sha256", String(64), nullable=False),
    Column("indexed_at", DateTime(timezone=True), nullable=False),
)
sbom_components_table = Table(
    "sbom_components",
    SCHEMA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("target", String(256), ForeignKey("sbom_releases.target"), nullable=False),
    Column("name", String(MAX_FIELD_CHARS), nullable=False),
    Column("version", String(MAX_FIELD_CHARS), nullable=True),
    Column("purl", String(MAX_FIELD_CHARS), nullable=True),
    Column("type", String(64), nullable=False),
    Index("ix_sbom_components_name", "name"),
    Index("ix_sbom_components_purl", "purl"),
)


@dataclass(frozen=True)
class ComponentHit:
    """A release containing the component asked about."""

    target: str
    release: str
    name: str
    version: str | None
    purl: str | None


@dataclass(frozen=True)
class RunningDevice:
    """A device whose newest check-in reports booting the image of ``target``."""

    serial: str
    target: str
    running_version: str
    last_checkin: dt.datetime


class SbomStore(ABC):
    """The per-release component index."""

    @abstractmethod
    def indexed(self) -> set[str]:
        """Targets already indexed."""

    @abstractmethod
    def add_release(
        self,
        *,
        target: str,
        version: str,
        image_sha256: str,
        sbom_sha256: str,
        components: Sequence[Component],
        now: dt.datetime,
    ) -> bool:
        """Index one release's components; False when it was indexed already (a race)."""

    @abstractmethod
    def releases_with_component(
        self, query: str, *, version: str | None = None
    ) -> list[ComponentHit]:
        """Releases with a component whose purl or name is ``query`` (and ``version``)."""

    @abstractmethod
    def devices_running(self, targets: Sequence[str]) -> list[RunningDevice]:
        """Devices whose newest check-in reports booting the image of one of ``targets``."""


def _cut(value: str | None) -> str | None:
    return None if value is None else value[:MAX_FIELD_CHARS]


class SQLSbomStore(SbomStore):
    """:class:`SbomStore` on the server's shared engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine):
        """Use ``engine`` (schema made current by the migrations)."""
        self._engine = engine

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"SBOM index {what} failed", self._engine)

    def indexed(self) -> set[str]:
        """See :meth:`SbomStore.indexed`."""
        try:
            with self._engine.connect() as conn:
                return set(conn.execute(select(sbom_releases_table.c.target)).scalars())
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e

    def add_release(
        self,
        *,
        target: str,
        version: str,
        image_sha256: str,
        sbom_sha256: str,
        components: Sequence[Component],
        now: dt.datetime,
    ) -> bool:
        """See :meth:`SbomStore.add_release`."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(sbom_releases_table).values(
                        target=target,
                        version=version,
                        image_sha256=image_sha256,
                        sbom_sha256=sbom_sha256,
                        indexed_at=now,
                    )
                )
                if components:
                    conn.execute(
                        insert(sbom_components_table),
                        [
                            {
                                "target": target,
                                "name": _cut(c.name) or "",
                                "version": _cut(c.version),
                                "purl": _cut(c.purl),
                                "type": c.type[:64],
                            }
                            for c in components
                        ],
                    )
        except IntegrityError:
            return False  # another server process indexed it first: the same rows
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return True

    def releases_with_component(
        self, query: str, *, version: str | None = None
    ) -> list[ComponentHit]:
        """See :meth:`SbomStore.releases_with_component`."""
        c, r = sbom_components_table.c, sbom_releases_table.c
        match = or_(c.purl == query, c.name == query)
        if version is not None:
            match = and_(match, c.version == version)
        stmt = (
            select(c.target, r.version.label("release"), c.name, c.version, c.purl)
            .join(sbom_releases_table, r.target == c.target)
            .where(match)
            .order_by(r.version, c.target, c.name, c.id)
            .limit(MAX_FIND_RESULTS)
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(stmt).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [
            ComponentHit(row.target, row.release, row.name, row.version, row.purl) for row in rows
        ]

    def devices_running(self, targets: Sequence[str]) -> list[RunningDevice]:
        """See :meth:`SbomStore.devices_running`."""
        if not targets:
            return []
        ch, r = checkins_table.c, sbom_releases_table.c
        newest = select(func.max(ch.id).label("id")).group_by(ch.serial).subquery("newest_checkin")
        stmt = (
            select(ch.serial, r.target, ch.running_version, ch.time)
            .join(newest, newest.c.id == ch.id)
            .join(sbom_releases_table, r.image_sha256 == ch.boot_sha256)
            .where(r.target.in_(list(targets)))
            .order_by(ch.serial)
            .limit(MAX_FIND_RESULTS)
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(stmt).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [
            RunningDevice(
                row.serial,
                row.target,
                row.running_version,
                row.time if row.time.tzinfo is not None else row.time.replace(tzinfo=dt.UTC),
            )
            for row in rows
        ]
