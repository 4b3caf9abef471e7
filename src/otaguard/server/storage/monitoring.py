"""Telemetry, device health and explainable alerts in the server's database (ADR 0026).

Tables::

    device_health(serial PK -> devices, hardware_id, last_seen, running_version,
                  instructed_image, instructed_at, telemetry_at, transport, boot_id,
                  boot_count, seq, release_version, release_reports, base_boot_count,
                  base_rollbacks, base_errors, boot_count_now, rollbacks_now, errors_now)
    telemetry_reports(id PK, serial -> devices, time, transport, body)
    alerts(id PK, time, signal, subject, serial, rollout, observed, threshold, detail,
           action, outcome, dedup_key, acked_at, acked_by)

``device_health`` is one row per device, updated at each check-in and each telemetry
report: what the sweeps (silence, cohorts) read without scanning the history. The
``release_*`` and ``base_*`` columns count boots, rollbacks and agent errors since the
device started reporting its current release (the cohort rates). ``telemetry_reports``
keeps each report as received (bounded by the parser; purged after
:data:`TELEMETRY_RETENTION`). An alert is stored once per open ``dedup_key`` (signal and
subject): a sweep that finds the same anomaly again does not raise it again until an
operator acknowledged it.
"""

from __future__ import annotations

import datetime as dt
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from otaguard.model.errors import ServerStorageError
from otaguard.model.telemetry import Telemetry
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.devices import devices_table
from otaguard.server.storage.fleet_base import UnknownNameError
from otaguard.server.storage.unit import newest_of_device, reading, writing

__all__ = [
    "TELEMETRY_RETENTION",
    "AlertRecord",
    "DeviceHealth",
    "HealthNote",
    "MonitorStore",
    "SQLMonitorStore",
    "write_health_note",
]

logger = logging.getLogger(__name__)

#: telemetry history kept per report; older rows are purged by the monitor's sweep (the
#: latest figures per device stay in device_health)
TELEMETRY_RETENTION: Final = dt.timedelta(days=7)
_TEXT: Final = 512

_schema = devices_table.metadata
health_table = Table(
    "device_health",
    _schema,
    Column("serial", String(64), ForeignKey("devices.serial"), primary_key=True),
    Column("hardware_id", String(128), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=True),
    Column("running_version", String(64), nullable=False),
    Column("instructed_image", String(256), nullable=True),
    Column("instructed_at", DateTime(timezone=True), nullable=True),
    Column("telemetry_at", DateTime(timezone=True), nullable=True),
    Column("transport", String(8), nullable=True),
    Column("boot_id", String(32), nullable=True),
    Column("boot_count", BigInteger, nullable=True),
    Column("seq", BigInteger, nullable=True),
    Column("release_version", String(64), nullable=True),
    Column("release_reports", BigInteger, nullable=False, default=0),
    Column("base_boot_count", BigInteger, nullable=False, default=0),
    Column("base_rollbacks", BigInteger, nullable=False, default=0),
    Column("base_errors", BigInteger, nullable=False, default=0),
    Column("rollbacks_now", BigInteger, nullable=False, default=0),
    Column("errors_now", BigInteger, nullable=False, default=0),
)
telemetry_table = Table(
    "telemetry_reports",
    _schema,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("serial", String(64), ForeignKey("devices.serial"), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("transport", String(8), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Index("ix_telemetry_reports_serial_time", "serial", "time"),
    Index("ix_telemetry_reports_time", "time"),
)
alerts_table = Table(
    "alerts",
    _schema,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("signal", String(32), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("serial", String(64), nullable=True),
    Column("rollout", String(128), nullable=True),
    Column("observed", String(_TEXT), nullable=False),
    Column("threshold", String(_TEXT), nullable=False),
    Column("detail", String(_TEXT), nullable=False),
    Column("action", String(16), nullable=False),
    Column("outcome", String(_TEXT), nullable=False),
    Column("dedup_key", String(240), nullable=False),
    Column("acked_at", DateTime(timezone=True), nullable=True),
    Column("acked_by", String(64), nullable=True),
    Index("ix_alerts_dedup_key", "dedup_key"),
    Index("ix_alerts_time", "time"),
)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite returns naive datetimes; every value stored here was UTC.
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class DeviceHealth:
    """The latest health figures of one device (one ``device_health`` row)."""

    serial: str
    hardware_id: str
    last_seen: dt.datetime | None
    running_version: str
    instructed_image: str | None
    instructed_at: dt.datetime | None
    telemetry_at: dt.datetime | None
    boot_id: str | None
    boot_count: int | None
    seq: int | None
    release_version: str | None
    release_reports: int
    release_boots: int
    release_rollbacks: int
    release_errors: int


@dataclass(frozen=True)
class HealthNote:
    """What a check-in writes to its device's health row: last seen ``now``, running
    ``running_version``, told to install ``instructed_image`` (``None``: nothing)."""

    serial: str
    hardware_id: str
    running_version: str
    instructed_image: str | None
    now: dt.datetime

    def values(self) -> dict[str, Any]:
        """The row's check-in columns (bounded as the table is)."""
        image = self.instructed_image
        return {
            "hardware_id": self.hardware_id,
            "last_seen": self.now,
            "running_version": self.running_version[:64],
            "instructed_image": image[:256] if image else None,
            "instructed_at": self.now if image else None,
        }


@dataclass(frozen=True)
class AlertRecord:
    """One explainable alert: signal, subject, observed value, threshold, action taken."""

    id: int
    time: dt.datetime
    signal: str
    subject: str
    serial: str | None
    rollout: str | None
    observed: str
    threshold: str
    detail: str
    action: str
    outcome: str
    acked_at: dt.datetime | None = None
    acked_by: str | None = None


def _health(row: Row[Any]) -> DeviceHealth:
    boots = 0 if row.boot_count is None else max(0, row.boot_count - row.base_boot_count)
    return DeviceHealth(
        serial=row.serial,
        hardware_id=row.hardware_id,
        last_seen=_utc(row.last_seen),
        running_version=row.running_version,
        instructed_image=row.instructed_image,
        instructed_at=_utc(row.instructed_at),
        telemetry_at=_utc(row.telemetry_at),
        boot_id=row.boot_id,
        boot_count=row.boot_count,
        seq=row.seq,
        release_version=row.release_version,
        release_reports=row.release_reports,
        release_boots=boots,
        release_rollbacks=max(0, row.rollbacks_now - row.base_rollbacks),
        release_errors=max(0, row.errors_now - row.base_errors),
    )


def _alert(row: Row[Any]) -> AlertRecord:
    return AlertRecord(
        id=row.id,
        time=_utc(row.time) or dt.datetime.now(dt.UTC),
        signal=row.signal,
        subject=row.subject,
        serial=row.serial,
        rollout=row.rollout,
        observed=row.observed,
        threshold=row.threshold,
        detail=row.detail,
        action=row.action,
        outcome=row.outcome,
        acked_at=_utc(row.acked_at),
        acked_by=row.acked_by,
    )


class MonitorStore(ABC):
    """Device health, telemetry history and alerts."""

    @abstractmethod
    def note_checkin(self, note: HealthNote) -> None:
        """A check-in: last seen now, what it runs, what it was told to install."""

    @abstractmethod
    def health(self, serial: str) -> DeviceHealth | None:
        """The device's row, if it ever checked in or reported."""

    @abstractmethod
    def record_telemetry(
        self,
        report: Telemetry,
        *,
        hardware_id: str,
        body: bytes,
        transport: str,
        now: dt.datetime,
    ) -> None:
        """Store a parsed report and fold it into the device's health row."""

    @abstractmethod
    def silent_instructed(self, *, seen_before: dt.datetime) -> list[DeviceHealth]:
        """The devices told to install an image whose last check-in is older than
        ``seen_before`` (the silence sweep: the rows it may raise for, not the fleet)."""

    @abstractmethod
    def reporting(self) -> list[DeviceHealth]:
        """The devices that sent telemetry about the release they run (the cohorts'
        rates: a device without a report has none to compare)."""

    @abstractmethod
    def running_counts(self) -> dict[tuple[str, str], int]:
        """Number of devices per (hardware id, version its last check-in reported)."""

    @abstractmethod
    def telemetry(self, serial: str, *, limit: int) -> list[tuple[dt.datetime, str, bytes]]:
        """The device's latest reports (time, transport, body), newest first."""

    @abstractmethod
    def purge_telemetry(self, *, before: dt.datetime) -> int:
        """Forget reports older than ``before``; how many."""

    @abstractmethod
    def add_alert(
        self,
        alert: AlertRecord,
        *,
        dedup_key: str,
    ) -> AlertRecord | None:
        """Store ``alert`` (its id is assigned) unless an unacknowledged alert has
        ``dedup_key``: then ``None``."""

    @abstractmethod
    def is_open(self, dedup_key: str) -> bool:
        """Whether an unacknowledged alert has ``dedup_key``."""

    @abstractmethod
    def alerts(self, *, include_acked: bool, limit: int) -> list[AlertRecord]:
        """Alerts, newest first."""

    @abstractmethod
    def ack(self, alert_id: int, *, by: str, now: dt.datetime) -> AlertRecord:
        """Acknowledge an alert (idempotent: the first acknowledgement stays).

        Raises:
            OperatorError: no such alert.
        """

    @abstractmethod
    def alert_counts(self) -> dict[tuple[str, bool], int]:
        """Number of alerts per (signal, acknowledged)."""


# Every check-in writes it (note_checkin), so it is built once: building and keying the
# statement per call cost more of a worker than running it.
_NOTE_CHECKIN: Final = (
    update(health_table)
    .where(health_table.c.serial == bindparam("s"))
    .values(
        {
            c: bindparam(f"v_{c}")
            for c in (
                "hardware_id",
                "last_seen",
                "running_version",
                "instructed_image",
                "instructed_at",
            )
        }
    )
)


def write_health_note(conn: Connection, note: HealthNote) -> None:
    """Write ``note`` to its device's health row in ``conn``'s transaction (the row is
    made at the device's first check-in or report)."""
    values = note.values()
    done = conn.execute(
        _NOTE_CHECKIN, {"s": note.serial, **{f"v_{k}": v for k, v in values.items()}}
    )
    if done.rowcount == 0:
        conn.execute(insert(health_table).values(serial=note.serial, **values))


class SQLMonitorStore(MonitorStore):
    """:class:`MonitorStore` on any SQLAlchemy 2 database URL."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current."""
        self._engine = engine

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"monitor store {what} failed", self._engine)

    def note_checkin(self, note: HealthNote) -> None:
        """See :meth:`MonitorStore.note_checkin`."""
        try:
            with writing(self._engine) as conn:
                write_health_note(conn, note)
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def health(self, serial: str) -> DeviceHealth | None:
        """See :meth:`MonitorStore.health`."""
        try:
            with reading(self._engine) as conn:
                row = conn.execute(
                    select(health_table).where(health_table.c.serial == serial)
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return _health(row) if row is not None else None

    def record_telemetry(
        self,
        report: Telemetry,
        *,
        hardware_id: str,
        body: bytes,
        transport: str,
        now: dt.datetime,
    ) -> None:
        """See :meth:`MonitorStore.record_telemetry`."""
        try:
            with writing(self._engine) as conn:
                conn.execute(
                    insert(telemetry_table).values(
                        serial=report.serial, time=now, transport=transport, body=body
                    )
                )
                row = conn.execute(
                    select(health_table).where(health_table.c.serial == report.serial)
                ).first()
                values: dict[str, Any] = {
                    "hardware_id": hardware_id,
                    "telemetry_at": now,
                    "transport": transport,
                    "boot_id": report.boot_id,
                    "boot_count": report.boot_count,
                    "seq": report.seq,
                    "rollbacks_now": report.rollbacks,
                    "errors_now": report.agent_errors,
                }
                if row is None or row.release_version != report.running_version:
                    # A new release starts the counts from this report's figures.
                    values |= {
                        "release_version": report.running_version,
                        "release_reports": 0,
                        "base_boot_count": report.boot_count,
                        "base_rollbacks": report.rollbacks,
                        "base_errors": report.agent_errors,
                    }
                else:
                    values["release_reports"] = row.release_reports + 1
                if row is None:
                    conn.execute(
                        insert(health_table).values(
                            serial=report.serial, running_version=report.running_version, **values
                        )
                    )
                else:
                    conn.execute(
                        update(health_table)
                        .where(health_table.c.serial == report.serial)
                        .values(**values)
                    )
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def _health_rows(self, *where: ColumnElement[bool]) -> list[DeviceHealth]:
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(select(health_table).where(*where)).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [_health(r) for r in rows]

    def silent_instructed(self, *, seen_before: dt.datetime) -> list[DeviceHealth]:
        """See :meth:`MonitorStore.silent_instructed`."""
        # The filter in the database: reading every row made each sweep cost about 70 us
        # of a worker per device (0.7 s every 30 s in each worker at 10,000 devices).
        return self._health_rows(
            health_table.c.instructed_image.is_not(None),
            health_table.c.last_seen < seen_before,
        )

    def reporting(self) -> list[DeviceHealth]:
        """See :meth:`MonitorStore.reporting`."""
        return self._health_rows(
            health_table.c.release_version.is_not(None), health_table.c.release_reports > 0
        )

    def running_counts(self) -> dict[tuple[str, str], int]:
        """See :meth:`MonitorStore.running_counts`."""
        hw, version = health_table.c.hardware_id, health_table.c.running_version
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(select(hw, version, func.count()).group_by(hw, version)).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def telemetry(self, serial: str, *, limit: int) -> list[tuple[dt.datetime, str, bytes]]:
        """See :meth:`MonitorStore.telemetry`."""
        try:
            rows = newest_of_device(self._engine, telemetry_table, serial, limit=limit)
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [(_utc(r.time) or r.time, r.transport, bytes(r.body)) for r in rows]

    def purge_telemetry(self, *, before: dt.datetime) -> int:
        """See :meth:`MonitorStore.purge_telemetry`."""
        try:
            with writing(self._engine) as conn:
                done = conn.execute(delete(telemetry_table).where(telemetry_table.c.time < before))
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return int(done.rowcount or 0)

    def add_alert(self, alert: AlertRecord, *, dedup_key: str) -> AlertRecord | None:
        """See :meth:`MonitorStore.add_alert`."""
        try:
            with writing(self._engine) as conn:
                open_one = conn.execute(
                    select(alerts_table.c.id).where(
                        alerts_table.c.dedup_key == dedup_key[:240],
                        alerts_table.c.acked_at.is_(None),
                    )
                ).first()
                if open_one is not None:
                    return None
                new_id: int = conn.execute(
                    insert(alerts_table)
                    .values(
                        time=alert.time,
                        signal=alert.signal[:32],
                        subject=alert.subject[:200],
                        serial=alert.serial,
                        rollout=alert.rollout,
                        observed=alert.observed[:_TEXT],
                        threshold=alert.threshold[:_TEXT],
                        detail=alert.detail[:_TEXT],
                        action=alert.action[:16],
                        outcome=alert.outcome[:_TEXT],
                        dedup_key=dedup_key[:240],
                    )
                    .returning(alerts_table.c.id)
                ).scalar_one()
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return AlertRecord(**{**alert.__dict__, "id": int(new_id)})

    def is_open(self, dedup_key: str) -> bool:
        """See :meth:`MonitorStore.is_open`."""
        try:
            with reading(self._engine) as conn:
                row = conn.execute(
                    select(alerts_table.c.id).where(
                        alerts_table.c.dedup_key == dedup_key[:240],
                        alerts_table.c.acked_at.is_(None),
                    )
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return row is not None

    def alerts(self, *, include_acked: bool, limit: int) -> list[AlertRecord]:
        """See :meth:`MonitorStore.alerts`."""
        query = select(alerts_table).order_by(alerts_table.c.id.desc()).limit(limit)
        if not include_acked:
            query = query.where(alerts_table.c.acked_at.is_(None))
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [_alert(r) for r in rows]

    def ack(self, alert_id: int, *, by: str, now: dt.datetime) -> AlertRecord:
        """See :meth:`MonitorStore.ack`."""
        try:
            with writing(self._engine) as conn:
                conn.execute(
                    update(alerts_table)
                    .where(alerts_table.c.id == alert_id, alerts_table.c.acked_at.is_(None))
                    .values(acked_at=now, acked_by=by[:64])
                )
                row = conn.execute(
                    select(alerts_table).where(alerts_table.c.id == alert_id)
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        if row is None:
            raise UnknownNameError(f"no alert {alert_id}")
        return _alert(row)

    def alert_counts(self) -> dict[tuple[str, bool], int]:
        """See :meth:`MonitorStore.alert_counts`."""
        acked = alerts_table.c.acked_at.is_not(None)
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(
                    select(alerts_table.c.signal, acked.label("acked"), func.count()).group_by(
                        alerts_table.c.signal, acked
                    )
                ).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return {(r[0], bool(r[1])): int(r[2]) for r in rows}
