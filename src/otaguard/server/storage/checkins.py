"""Check-ins in a SQL database through SQLAlchemy 2 Core (next to the registry).

Tables::

    checkin_nonces(nonce PK, serial -> devices, cert_serial, issued_at, expires_at, used_at)
    checkins(id PK, serial -> devices, cert_serial, time, device_time, running_version,
             target, boot_sha256, attested, reset_count, outcome, detail, manifest)
    attestation_keys(serial PK -> devices, public_pem, registered_at)
    device_alerts(id PK, serial -> devices, time, kind, detail)

Spending a nonce is a conditional ``UPDATE ... WHERE used_at IS NULL``: of two
concurrent check-ins with one nonce (two server processes), exactly one wins. The
check-in claims it in that one statement (:meth:`SQLCheckinStore.claim_nonce`, with
``RETURNING``), so reading and spending it is one round trip. Every method runs in the
caller's :func:`~.unit.unit_of_work` when one is open.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
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
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import ServerStorageError
from otaguard.server.storage.base import CheckinRecord, CheckinStore, DeviceAlert, NonceRecord
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.devices import ak_table, devices_table
from otaguard.server.storage.monitoring import HealthNote, write_health_note
from otaguard.server.storage.unit import newest_of_device, reading, writing

__all__ = [
    "MAX_OPEN_NONCES_PER_CERT",
    "NONCE_PURGE_INTERVAL",
    "SPENT_NONCE_KEPT",
    "SQLCheckinStore",
]

logger = logging.getLogger(__name__)

# Free text stored per row; longer is cut (it is display text, the manifest is kept whole).
_DETAIL_CHARS: Final = 1000
#: unused nonces kept per certificate: an honest agent has one open at a time (a few when
#: check-ins fail and retry); an enrolled but hostile device asking in a loop must not
#: grow the table, so asking for more forgets its oldest ones
MAX_OPEN_NONCES_PER_CERT: Final = 4
#: a spent nonce is remembered this long, so a replay soon after is refused as a replay
#: (after that as an unknown nonce): the table holds about one row per device
SPENT_NONCE_KEPT: Final = dt.timedelta(minutes=10)
#: expired nonces are forgotten at most this often per process (server time): each issue
#: purging them was a statement on every check-in, and an expired nonce is refused anyway
#: (it only takes room until the next purge)
NONCE_PURGE_INTERVAL: Final = dt.timedelta(seconds=10)

_schema = devices_table.metadata
nonces_table = Table(
    "checkin_nonces",
    _schema,
    Column("nonce", String(128), primary_key=True),
    Column("serial", String(64), ForeignKey("devices.serial"), nullable=False),
    Column("cert_serial", String(64), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    Index("ix_checkin_nonces_expires", "expires_at"),
    Index("ix_checkin_nonces_used", "used_at"),
    Index("ix_checkin_nonces_cert", "cert_serial"),
    Index("ix_checkin_nonces_serial", "serial"),
)
checkins_table = Table(
    "checkins",
    _schema,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("serial", String(64), ForeignKey("devices.serial"), nullable=False),
    Column("cert_serial", String(64), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("device_time", String(64), nullable=False),
    Column("running_version", String(256), nullable=False),
    Column("target", String(256), nullable=False),
    Column("boot_sha256", String(64), nullable=False),
    Column("attested", Boolean, nullable=False),
    Column("reset_count", BigInteger, nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("detail", String(_DETAIL_CHARS), nullable=False),
    Column("manifest", LargeBinary, nullable=False),
    Index("ix_checkins_serial_time", "serial", "time"),
    Index("ix_checkins_cert_time", "cert_serial", "time"),
)
alerts_table = Table(
    "device_alerts",
    _schema,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("serial", String(64), ForeignKey("devices.serial"), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("detail", String(_DETAIL_CHARS), nullable=False),
    Index("ix_device_alerts_serial_time", "serial", "time"),
)


# The statements of every check-in, built once (building and keying a statement per call
# cost more worker CPU than PostgreSQL spends running it).
_STALE_NONCES: Final = delete(nonces_table).where(
    nonces_table.c.nonce.in_(
        # This certificate's open nonces past the newest MAX - 1.
        select(nonces_table.c.nonce)
        .where(
            nonces_table.c.cert_serial == bindparam("cert_serial"),
            nonces_table.c.used_at.is_(None),
        )
        .order_by(nonces_table.c.issued_at.desc())
        .offset(MAX_OPEN_NONCES_PER_CERT - 1)
        .scalar_subquery()
    )
)
_CLAIM_NONCE: Final = (
    update(nonces_table)
    .where(
        nonces_table.c.nonce == bindparam("n"),
        nonces_table.c.serial == bindparam("s"),
        nonces_table.c.cert_serial == bindparam("c"),
        nonces_table.c.used_at.is_(None),
        nonces_table.c.expires_at > bindparam("now"),
    )
    .values(used_at=bindparam("now"))
    .returning(nonces_table.c.issued_at, nonces_table.c.expires_at)
)
_ATTESTATION_KEY: Final = select(ak_table.c.public_pem).where(
    ak_table.c.serial == bindparam("serial")
)
_INSERT_NONCE: Final = insert(nonces_table)
_INSERT_CHECKIN: Final = insert(checkins_table)


# An accepted check-in on PostgreSQL (accept_checkin): the claim, the record, the device's
# health row and the next nonce in one statement, each write drawing its one row from the
# claim, so an unclaimed nonce writes nothing. Separate statements were as many round trips
# and executions (a third of a worker's SQL time each).
_CLAIMED_PG: Final = """
    WITH claimed AS (
        UPDATE checkin_nonces SET used_at = :now
        WHERE nonce = :n AND serial = :s AND cert_serial = :c
          AND used_at IS NULL AND expires_at > :now
        RETURNING serial
    ), recorded AS (
        INSERT INTO checkins (serial, cert_serial, time, device_time, running_version,
                              target, boot_sha256, attested, reset_count, outcome, detail,
                              manifest)
        SELECT :serial, :cert_serial, :time, :device_time, :running_version, :target,
               :boot_sha256, :attested, :reset_count, :outcome, :detail, :manifest
        FROM claimed
        RETURNING id
    )"""
# The health row (storage/monitoring.py write_health_note): made at the first check-in,
# with the telemetry counters at zero as the table's defaults have them.
_NOTED_PG: Final = """, noted AS (
        INSERT INTO device_health (serial, hardware_id, last_seen, running_version,
                                   instructed_image, instructed_at, release_reports,
                                   base_boot_count, base_rollbacks, base_errors,
                                   rollbacks_now, errors_now)
        SELECT :serial, :v_hardware_id, :v_last_seen, :v_running_version,
               :v_instructed_image, :v_instructed_at, 0, 0, 0, 0, 0, 0
        FROM claimed
        ON CONFLICT (serial) DO UPDATE SET
            hardware_id = EXCLUDED.hardware_id, last_seen = EXCLUDED.last_seen,
            running_version = EXCLUDED.running_version,
            instructed_image = EXCLUDED.instructed_image,
            instructed_at = EXCLUDED.instructed_at
    )"""
_NEXT_PG: Final = """
    INSERT INTO checkin_nonces (nonce, serial, cert_serial, issued_at, expires_at, used_at)
    SELECT :next_nonce, :next_serial, :next_cert_serial, :next_issued_at, :next_expires_at,
           NULL
    FROM claimed, recorded
    RETURNING nonce
    """
_ACCEPT_TYPES: Final = (
    bindparam("now", type_=DateTime(timezone=True)),
    bindparam("time", type_=DateTime(timezone=True)),
    bindparam("next_issued_at", type_=DateTime(timezone=True)),
    bindparam("next_expires_at", type_=DateTime(timezone=True)),
    bindparam("attested", type_=Boolean),
    bindparam("reset_count", type_=BigInteger),
    bindparam("manifest", type_=LargeBinary),
)
_ACCEPT_PG: Final = text(_CLAIMED_PG + _NEXT_PG).bindparams(*_ACCEPT_TYPES)
_ACCEPT_NOTED_PG: Final = text(_CLAIMED_PG + _NOTED_PG + _NEXT_PG).bindparams(
    *_ACCEPT_TYPES,
    bindparam("v_last_seen", type_=DateTime(timezone=True)),
    bindparam("v_instructed_at", type_=DateTime(timezone=True)),
)


def _checkin_params(record: CheckinRecord) -> dict[str, Any]:
    return {
        "serial": record.serial,
        "cert_serial": record.cert_serial,
        "time": record.time,
        "device_time": record.device_time[:64],
        "running_version": record.running_version[:256],
        "target": record.target[:256],
        "boot_sha256": record.boot_sha256,
        "attested": record.attested,
        "reset_count": record.reset_count,
        "outcome": record.outcome,
        "detail": record.detail[:_DETAIL_CHARS],
        "manifest": record.manifest,
    }


def _nonce_params(record: NonceRecord) -> dict[str, Any]:
    return {
        "nonce": record.nonce,
        "serial": record.serial,
        "cert_serial": record.cert_serial,
        "issued_at": record.issued_at,
        "expires_at": record.expires_at,
        "used_at": None,
    }


def _next_nonce_params(record: NonceRecord) -> dict[str, Any]:
    return {f"next_{k}": v for k, v in _nonce_params(record).items() if k != "used_at"}


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; every value stored here was UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _checkin(row: Row[Any]) -> CheckinRecord:
    return CheckinRecord(
        serial=row.serial,
        cert_serial=row.cert_serial,
        time=_utc(row.time),
        device_time=row.device_time,
        running_version=row.running_version,
        target=row.target,
        boot_sha256=row.boot_sha256,
        attested=bool(row.attested),
        reset_count=row.reset_count,
        outcome=row.outcome,
        detail=row.detail,
        manifest=bytes(row.manifest),
    )


class SQLCheckinStore(CheckinStore):
    """:class:`CheckinStore` on any SQLAlchemy 2 database URL."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current.

        Args:
            engine: from :func:`~otaguard.server.storage.migrate.open_database`.
        """
        self._engine = engine
        self._last_purge: dt.datetime | None = None

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"check-in store {what} failed", self._engine)

    def _purge_due(self, now: dt.datetime) -> bool:
        return self._last_purge is None or now - self._last_purge >= NONCE_PURGE_INTERVAL

    def _purge(self, conn: Connection, now: dt.datetime) -> None:
        # Expired nonces can only be refused; forget them so the table stays small. So
        # are spent ones, which are kept a while only to name a replay as one (after that
        # it is refused as unknown): a next-check-in nonce lives a day (ADR 0036), the
        # table about one row per device.
        conn.execute(
            delete(nonces_table).where(
                or_(
                    nonces_table.c.expires_at < now,
                    nonces_table.c.used_at < now - SPENT_NONCE_KEPT,
                )
            )
        )

    def issue_nonce(self, record: NonceRecord) -> None:
        """See :meth:`CheckinStore.issue_nonce`."""
        purge = self._purge_due(record.issued_at)
        try:
            with writing(self._engine) as conn:
                if purge:
                    self._purge(conn, record.issued_at)
                conn.execute(_STALE_NONCES, {"cert_serial": record.cert_serial})
                conn.execute(_INSERT_NONCE, _nonce_params(record))
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        if purge:
            self._last_purge = record.issued_at

    def accept_checkin(
        self,
        record: CheckinRecord,
        *,
        nonce: str,
        next_nonce: NonceRecord,
        health: HealthNote | None,
    ) -> bool:
        """See :meth:`CheckinStore.accept_checkin`.

        PostgreSQL: one statement (the claim, the record, the health row and the next
        nonce as one data-modifying ``WITH``), atomic by itself; elsewhere each in the
        unit.
        """
        if health is not None and health.serial != record.serial:
            raise ValueError("a check-in's health note is its own device's")
        claim = {"n": nonce, "s": record.serial, "c": record.cert_serial, "now": record.time}
        purge = self._purge_due(record.time)
        try:
            with writing(self._engine) as conn:
                if conn.dialect.name == "postgresql":
                    params = {**claim, **_checkin_params(record), **_next_nonce_params(next_nonce)}
                    statement = _ACCEPT_PG
                    if health is not None:
                        statement = _ACCEPT_NOTED_PG
                        params.update({f"v_{k}": v for k, v in health.values().items()})
                    accepted = conn.execute(statement, params).first() is not None
                elif conn.execute(_CLAIM_NONCE, claim).first() is None:
                    accepted = False
                else:
                    conn.execute(_INSERT_CHECKIN, _checkin_params(record))
                    if health is not None:
                        write_health_note(conn, health)
                    conn.execute(_INSERT_NONCE, _nonce_params(next_nonce))
                    accepted = True
                if accepted and purge:  # after the claim: a refusal names an expired nonce
                    self._purge(conn, record.time)
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        if accepted and purge:
            self._last_purge = record.time
        return accepted

    def get_nonce(self, nonce: str) -> NonceRecord | None:
        """See :meth:`CheckinStore.get_nonce`."""
        try:
            with reading(self._engine) as conn:
                row = conn.execute(
                    select(nonces_table).where(nonces_table.c.nonce == nonce)
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        if row is None:
            return None
        return NonceRecord(
            nonce=row.nonce,
            serial=row.serial,
            cert_serial=row.cert_serial,
            issued_at=_utc(row.issued_at),
            expires_at=_utc(row.expires_at),
            used_at=_utc(row.used_at) if row.used_at is not None else None,
        )

    def spend_nonce(self, nonce: str, *, now: dt.datetime) -> bool:
        """See :meth:`CheckinStore.spend_nonce`."""
        try:
            with writing(self._engine) as conn:
                result = conn.execute(
                    update(nonces_table)
                    .where(nonces_table.c.nonce == nonce, nonces_table.c.used_at.is_(None))
                    .values(used_at=now)
                )
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return bool(result.rowcount == 1)

    def claim_nonce(
        self, nonce: str, *, serial: str, cert_serial: str, now: dt.datetime
    ) -> NonceRecord | None:
        """See :meth:`CheckinStore.claim_nonce`."""
        try:
            with writing(self._engine) as conn:
                row = conn.execute(
                    _CLAIM_NONCE, {"n": nonce, "s": serial, "c": cert_serial, "now": now}
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        if row is None:
            return None
        return NonceRecord(
            nonce=nonce,
            serial=serial,
            cert_serial=cert_serial,
            issued_at=_utc(row.issued_at),
            expires_at=_utc(row.expires_at),
            used_at=None,
        )

    def record_checkin(self, record: CheckinRecord) -> None:
        """See :meth:`CheckinStore.record_checkin`."""
        try:
            with writing(self._engine) as conn:
                conn.execute(_INSERT_CHECKIN, _checkin_params(record))
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def history(self, serial: str, *, limit: int) -> list[CheckinRecord]:
        """See :meth:`CheckinStore.history`."""
        try:
            rows = newest_of_device(self._engine, checkins_table, serial, limit=limit)
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [_checkin(r) for r in rows]

    def last_accepted(self, cert_serial: str) -> dt.datetime | None:
        """See :meth:`CheckinStore.last_accepted`."""
        try:
            with reading(self._engine) as conn:
                value = conn.execute(
                    select(func.max(checkins_table.c.time)).where(
                        checkins_table.c.cert_serial == cert_serial,
                        checkins_table.c.outcome == "accepted",
                    )
                ).scalar()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return _utc(value) if value is not None else None

    def attestation_key(self, serial: str) -> str | None:
        """See :meth:`CheckinStore.attestation_key`."""
        try:
            with reading(self._engine) as conn:
                value = conn.execute(_ATTESTATION_KEY, {"serial": serial}).scalar()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return str(value) if value is not None else None

    def register_attestation_key(self, serial: str, public_pem: str, *, now: dt.datetime) -> bool:
        """See :meth:`CheckinStore.register_attestation_key`."""
        try:
            with writing(self._engine) as conn:
                conn.execute(
                    insert(ak_table).values(serial=serial, public_pem=public_pem, registered_at=now)
                )
        except IntegrityError:
            # One key per device, first come: the same key again is fine, another is not.
            return self.attestation_key(serial) == public_pem
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return True

    def last_reset_count(self, serial: str) -> int | None:
        """See :meth:`CheckinStore.last_reset_count`."""
        try:
            with reading(self._engine) as conn:
                value = conn.execute(
                    select(func.max(checkins_table.c.reset_count)).where(
                        checkins_table.c.serial == serial, checkins_table.c.attested.is_(True)
                    )
                ).scalar()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return int(value) if value is not None else None

    def add_alert(self, alert: DeviceAlert) -> None:
        """See :meth:`CheckinStore.add_alert`."""
        try:
            with writing(self._engine) as conn:
                conn.execute(
                    insert(alerts_table).values(
                        serial=alert.serial,
                        time=alert.time,
                        kind=alert.kind[:64],
                        detail=alert.detail[:_DETAIL_CHARS],
                    )
                )
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def alerts(self, serial: str, *, limit: int) -> list[DeviceAlert]:
        """See :meth:`CheckinStore.alerts`."""
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(
                    select(alerts_table)
                    .where(alerts_table.c.serial == serial)
                    .order_by(alerts_table.c.time.desc(), alerts_table.c.id.desc())
                    .limit(limit)
                ).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [DeviceAlert(r.serial, _utc(r.time), r.kind, r.detail) for r in rows]

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._engine.dispose()
