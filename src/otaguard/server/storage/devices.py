"""The fleet registry in a SQL database through SQLAlchemy 2 Core (next to the metadata).

Tables::

    devices(serial PK, hardware_id, status, reason, created_at, updated_at)
    device_certs(cert_serial PK, serial -> devices.serial, not_after, issued_at)
    enrollment_tokens(token_hash PK, serial -> devices.serial, expires_at, used_at)

Enrollment tokens are stored only as their SHA-256; redeeming one is a conditional
``UPDATE ... WHERE used_at IS NULL`` inside a transaction, so two concurrent enrollments
with the same token cannot both succeed, whichever server processes they reach. Status
changes are conditional too (``... WHERE status <> 'revoked'``): a revocation racing a
release or a certificate issue is never overwritten.
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    String,
    Table,
    bindparam,
    case,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import (
    AccessDeniedError,
    DeviceExistsError,
    OperatorError,
    StateConflictError,
    UnknownDeviceError,
)
from otaguard.server.storage.base import DeviceRecord, DeviceStanding, DeviceState, DeviceStore
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.schema import SCHEMA
from otaguard.server.storage.unit import reading, writing

__all__ = ["MAX_REASON_CHARS", "SQLDeviceStore", "ak_table", "certs_table", "devices_table"]

logger = logging.getLogger(__name__)

# A reason is a short operator note shown in listings; longer text is a mistake.
MAX_REASON_CHARS: Final = 500

_schema = SCHEMA
devices_table = Table(
    "devices",
    _schema,
    Column("serial", String(64), primary_key=True),
    Column("hardware_id", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(MAX_REASON_CHARS), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
certs_table = Table(
    "device_certs",
    _schema,
    Column("cert_serial", String(64), primary_key=True),
    Column("serial", String(64), ForeignKey("devices.serial"), nullable=False),
    Column("not_after", DateTime(timezone=True), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Index("ix_device_certs_serial", "serial"),
)
tokens_table = Table(
    "enrollment_tokens",
    _schema,
    Column("token_hash", String(64), primary_key=True),
    Column("serial", String(64), ForeignKey("devices.serial"), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    Index("ix_enrollment_tokens_serial", "serial"),
)
#: a device's TPM attestation key (registered once; read with the device's standing)
ak_table = Table(
    "attestation_keys",
    _schema,
    Column("serial", String(64), ForeignKey("devices.serial"), primary_key=True),
    Column("public_pem", String(1024), nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False),
)


# The device gate's read on every device request (built once): the device row, whether
# the presented certificate was issued to it, and its attestation key. One statement and
# one row, however many certificates the device was issued: with day-long certificates
# that is one more a day, and reading them all made a check-in's cost grow with the
# device's age.
_STANDING: Final = select(
    devices_table.c.serial,
    devices_table.c.hardware_id,
    devices_table.c.status,
    devices_table.c.reason,
    exists()
    .where(
        certs_table.c.cert_serial == bindparam("cert_serial"),
        certs_table.c.serial == devices_table.c.serial,
    )
    .label("cert_issued"),
    select(ak_table.c.public_pem)
    .where(ak_table.c.serial == devices_table.c.serial)
    .scalar_subquery()
    .label("ak"),
).where(devices_table.c.serial == bindparam("serial"))


# One statement (fleet show, enrollment: built once):
# the device row joined with its certificates, oldest first; a device without a
# certificate yet gives one row with NULL certificate columns.
_READ_DEVICE: Final = (
    select(
        devices_table,
        certs_table.c.cert_serial.label("c_serial"),
        certs_table.c.not_after.label("c_not_after"),
    )
    .select_from(devices_table.outerjoin(certs_table))
    .where(devices_table.c.serial == bindparam("serial"))
    .order_by(certs_table.c.issued_at, certs_table.c.cert_serial)
)


_LIST_DEVICES: Final = (
    select(
        devices_table,
        certs_table.c.cert_serial.label("c_serial"),
        certs_table.c.not_after.label("c_not_after"),
    )
    .select_from(devices_table.outerjoin(certs_table))
    .order_by(devices_table.c.serial, certs_table.c.issued_at, certs_table.c.cert_serial)
)

#: the hardware ids the fleet has: what the rollout evaluator's orphan check needs, read
#: without materialising every device (it runs every few seconds in every worker)
_HARDWARE_IDS: Final = select(devices_table.c.hardware_id).distinct()


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; every value stored here was UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _from_rows(rows: Sequence[Row[Any]]) -> DeviceRecord:
    """One device from its rows of the device-joined-with-certificates statements."""
    row = rows[0]
    certs = [(r.c_serial, _utc(r.c_not_after)) for r in rows if r.c_serial is not None]
    return DeviceRecord(
        serial=row.serial,
        hardware_id=row.hardware_id,
        status=DeviceState(row.status),
        reason=row.reason,
        cert_serials=tuple(c for c, _ in certs),
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
        certs_valid_until=max((n for _, n in certs), default=None),
    )


class SQLDeviceStore(DeviceStore):
    """:class:`DeviceStore` on any SQLAlchemy 2 database URL."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current.

        Args:
            engine: from :func:`~otaguard.server.storage.migrate.open_database`.
        """
        self._engine = engine

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def _record(conn: Connection, row: Row[Any]) -> DeviceRecord:
        certs = conn.execute(
            select(certs_table.c.cert_serial, certs_table.c.not_after)
            .where(certs_table.c.serial == row.serial)
            .order_by(certs_table.c.issued_at, certs_table.c.cert_serial)
        ).all()
        return DeviceRecord(
            serial=row.serial,
            hardware_id=row.hardware_id,
            status=DeviceState(row.status),
            reason=row.reason,
            cert_serials=tuple(c.cert_serial for c in certs),
            created_at=_utc(row.created_at),
            updated_at=_utc(row.updated_at),
            certs_valid_until=max((_utc(c.not_after) for c in certs), default=None),
        )

    @staticmethod
    def _row(conn: Connection, serial: str) -> Row[Any]:
        row = conn.execute(select(devices_table).where(devices_table.c.serial == serial)).first()
        if row is None:
            raise UnknownDeviceError(f"no device {serial!r} in the registry")
        return row

    def _read(self, serial: str) -> DeviceRecord:
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(_READ_DEVICE, {"serial": serial}).all()
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry read failed", self._engine) from e
        if not rows:
            raise UnknownDeviceError(f"no device {serial!r} in the registry")
        return _from_rows(rows)

    # -- DeviceStore ------------------------------------------------------------------
    def standing(self, serial: str, *, cert_serial: str) -> DeviceStanding | None:
        """See :meth:`DeviceStore.standing`."""
        try:
            with reading(self._engine) as conn:
                row = conn.execute(
                    _STANDING, {"serial": serial, "cert_serial": cert_serial}
                ).first()
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry read failed", self._engine) from e
        if row is None:
            return None
        return DeviceStanding(
            serial=row.serial,
            hardware_id=row.hardware_id,
            status=DeviceState(row.status),
            reason=row.reason,
            cert_issued=bool(row.cert_issued),
            attestation_key=row.ak,
        )

    def add(
        self,
        serial: str,
        hardware_id: str,
        *,
        token_hash: str,
        token_expires: dt.datetime,
        now: dt.datetime,
    ) -> DeviceRecord:
        """See :meth:`DeviceStore.add`."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(devices_table).values(
                        serial=serial,
                        hardware_id=hardware_id,
                        status=DeviceState.REGISTERED.value,
                        reason="",
                        created_at=now,
                        updated_at=now,
                    )
                )
                conn.execute(
                    insert(tokens_table).values(
                        token_hash=token_hash, serial=serial, expires_at=token_expires
                    )
                )
        except IntegrityError as e:
            raise DeviceExistsError(f"device {serial!r} is already registered") from e
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry write failed", self._engine) from e
        logger.info("registered device %s (hardware id %s)", serial, hardware_id)
        return self._read(serial)

    def get(self, serial: str) -> DeviceRecord | None:
        """See :meth:`DeviceStore.get`."""
        try:
            return self._read(serial)
        except UnknownDeviceError:
            return None

    def hardware_ids(self) -> set[str]:
        """See :meth:`DeviceStore.hardware_ids`."""
        try:
            with reading(self._engine) as conn:
                return {str(r.hardware_id) for r in conn.execute(_HARDWARE_IDS)}
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry read failed", self._engine) from e

    def status_counts(self) -> dict[DeviceState, int]:
        """See :meth:`DeviceStore.status_counts`."""
        status = devices_table.c.status
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(select(status, func.count()).group_by(status)).all()
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry read failed", self._engine) from e
        return {DeviceState(r[0]): int(r[1]) for r in rows}

    def list(self) -> builtins.list[DeviceRecord]:
        """See :meth:`DeviceStore.list`."""
        # One statement, not one per device: the rollout evaluator lists the fleet every
        # few seconds in each worker (10,000 devices were 10,001 statements each time).
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(_LIST_DEVICES).all()
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry read failed", self._engine) from e
        out: builtins.list[DeviceRecord] = []
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i].serial != rows[start].serial:
                out.append(_from_rows(rows[start:i]))
                start = i
        return out

    def set_status(
        self, serial: str, status: DeviceState, *, reason: str, now: dt.datetime
    ) -> DeviceRecord:
        """See :meth:`DeviceStore.set_status`."""
        if len(reason) > MAX_REASON_CHARS:
            raise OperatorError(f"the reason exceeds {MAX_REASON_CHARS} characters")
        try:
            with writing(self._engine) as conn:
                self._row(conn, serial)
                # Conditional: a revocation committed by another request (or process)
                # between a read and this write must win, never be overwritten.
                changed = conn.execute(
                    update(devices_table)
                    .where(
                        devices_table.c.serial == serial,
                        devices_table.c.status != DeviceState.REVOKED.value,
                    )
                    .values(status=status.value, reason=reason, updated_at=now)
                ).rowcount
                if changed != 1:
                    raise StateConflictError(f"device {serial!r} is revoked; revocation is final")
                if status is DeviceState.REVOKED:
                    # A revoked device can never enroll again: its open tokens die with it.
                    conn.execute(
                        update(tokens_table)
                        .where(tokens_table.c.serial == serial, tokens_table.c.used_at.is_(None))
                        .values(used_at=now)
                    )
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry write failed", self._engine) from e
        logger.info("device %s is now %s", serial, status.value)
        return self._read(serial)

    def new_token(
        self, serial: str, *, token_hash: str, token_expires: dt.datetime, now: dt.datetime
    ) -> DeviceRecord:
        """See :meth:`DeviceStore.new_token`."""
        try:
            with self._engine.begin() as conn:
                row = self._row(conn, serial)
                if row.status == DeviceState.REVOKED.value:
                    raise StateConflictError(
                        f"device {serial!r} is revoked; it cannot enroll again"
                    )
                conn.execute(
                    update(tokens_table)
                    .where(tokens_table.c.serial == serial, tokens_table.c.used_at.is_(None))
                    .values(used_at=now)
                )
                conn.execute(
                    insert(tokens_table).values(
                        token_hash=token_hash, serial=serial, expires_at=token_expires
                    )
                )
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry write failed", self._engine) from e
        return self._read(serial)

    def redeem_token(self, serial: str, token_hash: str, *, now: dt.datetime) -> DeviceRecord:
        """See :meth:`DeviceStore.redeem_token`."""
        try:
            with self._engine.begin() as conn:
                token = conn.execute(
                    select(tokens_table).where(tokens_table.c.token_hash == token_hash)
                ).first()
                if token is None:
                    raise AccessDeniedError("unknown enrollment token")
                if token.serial != serial:
                    raise AccessDeniedError(f"the enrollment token is not for device {serial!r}")
                if token.used_at is not None:
                    raise AccessDeniedError("the enrollment token was already used")
                if _utc(token.expires_at) <= now:
                    raise AccessDeniedError("the enrollment token has expired")
                row = self._row(conn, serial)
                if row.status == DeviceState.REVOKED.value:
                    raise AccessDeniedError(f"device {serial!r} is revoked")
                used = conn.execute(
                    update(tokens_table)
                    .where(
                        tokens_table.c.token_hash == token_hash, tokens_table.c.used_at.is_(None)
                    )
                    .values(used_at=now)
                )
                if used.rowcount != 1:
                    raise AccessDeniedError("the enrollment token was already used")
                return self._record(conn, row)
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry write failed", self._engine) from e

    def record_certificate(
        self, serial: str, cert_serial: str, *, not_after: dt.datetime, now: dt.datetime
    ) -> DeviceRecord:
        """See :meth:`DeviceStore.record_certificate`."""
        try:
            with self._engine.begin() as conn:
                self._row(conn, serial)
                conn.execute(
                    insert(certs_table).values(
                        cert_serial=cert_serial, serial=serial, not_after=not_after, issued_at=now
                    )
                )
                # Only a device still registered becomes enrolled, decided by the row as it
                # is when written: a concurrent quarantine or revocation stays.
                conn.execute(
                    update(devices_table)
                    .where(devices_table.c.serial == serial)
                    .values(
                        updated_at=now,
                        status=case(
                            (
                                devices_table.c.status == DeviceState.REGISTERED.value,
                                DeviceState.ENROLLED.value,
                            ),
                            else_=devices_table.c.status,
                        ),
                    )
                )
        except SQLAlchemyError as e:
            raise storage_failure(e, "device registry write failed", self._engine) from e
        logger.info("issued certificate %s to device %s", cert_serial, serial)
        return self._read(serial)

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._engine.dispose()
