"""Device tags and groups in a SQL database through SQLAlchemy 2 Core (next to the registry).

Tables::

    device_tags(serial -> devices, key, value; PK (serial, key))
    device_groups(name PK, where_filter NULL = static, created_at)
    group_members(group_name -> device_groups, serial -> devices; PK both)

A dynamic group stores only its canonical filter; its members are computed at query time
(one ``serial IN (SELECT serial FROM device_tags WHERE key = ? AND value = ?)`` per term),
so a device joins or leaves it the moment its tags change. The built-in ``all`` is not a
row: it is every registered device.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    null,
    select,
    union_all,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import (
    OperatorError,
    ServerStorageError,
    StateConflictError,
    UnknownDeviceError,
)
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.devices import devices_table
from otaguard.server.storage.fleet_base import (
    DeviceView,
    GroupRecord,
    InventoryStore,
    NameExistsError,
    UnknownNameError,
)
from otaguard.server.storage.rollouts import channel_settings_table
from otaguard.server.storage.schema import SCHEMA
from otaguard.server.storage.unit import reading
from otaguard.server.tags import (
    BUILTIN_GROUP,
    MAX_TAGS_PER_DEVICE,
    TagFilter,
    format_filter,
    matches,
    parse_filter,
)

__all__ = ["SQLInventoryStore"]

logger = logging.getLogger(__name__)

_schema = SCHEMA
tags_table = Table(
    "device_tags",
    _schema,
    Column("serial", String(64), ForeignKey("devices.serial"), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
    Index("ix_device_tags_key_value", "key", "value"),
)
groups_table = Table(
    "device_groups",
    _schema,
    Column("name", String(64), primary_key=True),
    Column("where_filter", String(1024), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
members_table = Table(
    "group_members",
    _schema,
    Column("group_name", String(64), ForeignKey("device_groups.name"), primary_key=True),
    Column("serial", String(64), ForeignKey("devices.serial"), primary_key=True),
    Index("ix_group_members_serial", "serial"),
)


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _group(row: Row[Any]) -> GroupRecord:
    where = parse_filter(row.where_filter) if row.where_filter is not None else None
    return GroupRecord(name=row.name, where=where, created_at=_utc(row.created_at))


_ALL: GroupRecord = GroupRecord(name=BUILTIN_GROUP, where=None, created_at=None)


# Every check-in's policy reads it (device_view), so it is built once.
_DEVICE_VIEW: Final = union_all(
    select(literal("d").label("kind"), devices_table.c.serial.label("a"), null().label("b")).where(
        devices_table.c.serial == bindparam("serial")
    ),
    select(literal("t"), tags_table.c.key, tags_table.c.value).where(
        tags_table.c.serial == bindparam("serial")
    ),
    select(literal("s"), members_table.c.group_name, null()).where(
        members_table.c.serial == bindparam("serial")
    ),
    select(literal("g"), groups_table.c.name, groups_table.c.where_filter).where(
        groups_table.c.where_filter.is_not(None)
    ),
    select(literal("n"), channel_settings_table.c.name, null()).where(
        channel_settings_table.c.scope == "device",
        channel_settings_table.c.name == bindparam("serial"),
        channel_settings_table.c.no_features.is_(True),
    ),
)


class SQLInventoryStore(InventoryStore):
    """:class:`InventoryStore` on any SQLAlchemy 2 database URL."""

    def __init__(self, engine: Engine):
        """Use ``engine``, whose schema the migrations made current.

        Args:
            engine: from :func:`~otaguard.server.storage.migrate.open_database`.
        """
        self._engine = engine

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"inventory {what} failed", self._engine)

    @staticmethod
    def _require_device(conn: Connection, serial: str) -> None:
        found = conn.execute(
            select(devices_table.c.serial).where(devices_table.c.serial == serial)
        ).first()
        if found is None:
            raise UnknownDeviceError(f"no device {serial!r} in the registry")

    @staticmethod
    def _group_row(conn: Connection, name: str) -> Row[Any]:
        row = conn.execute(select(groups_table).where(groups_table.c.name == name)).first()
        if row is None:
            raise UnknownNameError(f"no group named {name!r}")
        return row

    def change_tags(
        self, serial: str, *, set_tags: Mapping[str, str], remove: Sequence[str]
    ) -> dict[str, str]:
        """See :meth:`InventoryStore.change_tags`."""
        try:
            with self._engine.begin() as conn:
                self._require_device(conn, serial)
                keys = list(remove) + list(set_tags)
                if keys:
                    conn.execute(
                        delete(tags_table).where(
                            tags_table.c.serial == serial, tags_table.c.key.in_(keys)
                        )
                    )
                for key, value in set_tags.items():
                    conn.execute(insert(tags_table).values(serial=serial, key=key, value=value))
                count = conn.execute(
                    select(func.count()).where(tags_table.c.serial == serial)
                ).scalar_one()
                if count > MAX_TAGS_PER_DEVICE:
                    raise StateConflictError(
                        f"device {serial} would have {count} tags; the limit is "
                        f"{MAX_TAGS_PER_DEVICE}"
                    )
                rows = conn.execute(
                    select(tags_table.c.key, tags_table.c.value)
                    .where(tags_table.c.serial == serial)
                    .order_by(tags_table.c.key)
                ).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return {r.key: r.value for r in rows}

    def all_tags(self) -> dict[str, dict[str, str]]:
        """See :meth:`InventoryStore.all_tags`."""
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(
                    select(tags_table).order_by(tags_table.c.serial, tags_table.c.key)
                ).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        tags: dict[str, dict[str, str]] = {}
        for r in rows:
            tags.setdefault(r.serial, {})[r.key] = r.value
        return tags

    def create_group(self, name: str, *, where: TagFilter | None, now: dt.datetime) -> GroupRecord:
        """See :meth:`InventoryStore.create_group`."""
        if name == BUILTIN_GROUP:
            raise NameExistsError(f"group {BUILTIN_GROUP!r} is built in")
        text = format_filter(where) if where is not None else None
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(groups_table).values(name=name, where_filter=text, created_at=now)
                )
        except IntegrityError as e:
            raise NameExistsError(f"a group named {name!r} exists") from e
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return GroupRecord(name=name, where=where, created_at=now)

    def delete_group(self, name: str) -> None:
        """See :meth:`InventoryStore.delete_group`."""
        if name == BUILTIN_GROUP:
            raise StateConflictError(f"group {BUILTIN_GROUP!r} is built in; it cannot be deleted")
        try:
            with self._engine.begin() as conn:
                self._group_row(conn, name)
                conn.execute(delete(members_table).where(members_table.c.group_name == name))
                conn.execute(delete(groups_table).where(groups_table.c.name == name))
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def groups(self) -> list[GroupRecord]:
        """See :meth:`InventoryStore.groups`."""
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(select(groups_table).order_by(groups_table.c.name)).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [_ALL, *(_group(r) for r in rows)]

    def group(self, name: str) -> GroupRecord:
        """See :meth:`InventoryStore.group`."""
        if name == BUILTIN_GROUP:
            return _ALL
        try:
            with reading(self._engine) as conn:
                return _group(self._group_row(conn, name))
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e

    def change_members(self, name: str, *, add: Sequence[str], remove: Sequence[str]) -> None:
        """See :meth:`InventoryStore.change_members`."""
        if name == BUILTIN_GROUP:
            raise StateConflictError(
                f"group {BUILTIN_GROUP!r} holds every device; it is not edited"
            )
        try:
            with self._engine.begin() as conn:
                row = self._group_row(conn, name)
                if row.where_filter is not None:
                    raise OperatorError(
                        f"group {name!r} is dynamic ({row.where_filter}): change the devices' "
                        "tags instead"
                    )
                if remove:
                    conn.execute(
                        delete(members_table).where(
                            members_table.c.group_name == name,
                            members_table.c.serial.in_(list(remove)),
                        )
                    )
                for serial in dict.fromkeys(add):
                    self._require_device(conn, serial)
                    present = conn.execute(
                        select(members_table.c.serial).where(
                            members_table.c.group_name == name, members_table.c.serial == serial
                        )
                    ).first()
                    if present is None:
                        conn.execute(insert(members_table).values(group_name=name, serial=serial))
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def static_memberships(self) -> dict[str, list[str]]:
        """See :meth:`InventoryStore.static_memberships`."""
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(
                    select(members_table).order_by(
                        members_table.c.serial, members_table.c.group_name
                    )
                ).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        groups: dict[str, list[str]] = {}
        for r in rows:
            groups.setdefault(r.serial, []).append(r.group_name)
        return groups

    def device_view(self, serial: str) -> DeviceView | None:
        """See :meth:`InventoryStore.device_view`.

        One statement, indexed by serial: the device's registry row, its tags, its
        static memberships, its own opt-out of feature releases, and the dynamic groups'
        filters (a few rows an operator made, however large the fleet); the filters are
        matched here. The check-in's policy reads all it needs of the device in it.
        """
        try:
            with reading(self._engine) as conn:
                found = conn.execute(_DEVICE_VIEW, {"serial": serial}).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        if not any(r.kind == "d" for r in found):
            return None
        tags = {r.a: r.b for r in found if r.kind == "t"}
        groups = {r.a for r in found if r.kind == "s"}
        groups.update(r.a for r in found if r.kind == "g" and matches(parse_filter(r.b), tags))
        return DeviceView(
            tags=tags,
            groups=(BUILTIN_GROUP, *sorted(groups)),
            no_features=any(r.kind == "n" for r in found),
        )

    def members(self, name: str) -> list[str]:
        """See :meth:`InventoryStore.members`."""
        group = self.group(name)
        stmt = select(devices_table.c.serial)
        if group.name == BUILTIN_GROUP:
            pass
        elif group.where is None:
            stmt = stmt.where(
                devices_table.c.serial.in_(
                    select(members_table.c.serial).where(members_table.c.group_name == name)
                )
            )
        else:
            for key, value in group.where:
                stmt = stmt.where(
                    devices_table.c.serial.in_(
                        select(tags_table.c.serial).where(
                            tags_table.c.key == key, tags_table.c.value == value
                        )
                    )
                )
        try:
            with reading(self._engine) as conn:
                return list(conn.execute(stmt.order_by(devices_table.c.serial)).scalars())
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._engine.dispose()
