"""Rollouts and channel settings in SQL, next to the registry and the inventory.

Tables::

    rollouts(name PK, version, group_name, phases, success_threshold, failure_threshold,
             window, state, phase, reason, created_at, updated_at)
    channel_settings(scope, name; PK both, no_features, security_delay_seconds, window)
    release_first_seen(target PK, first_seen)

A rollout's evaluation reads the check-in history (``checkins``, the check-in store's
table) set-based: :meth:`RolloutStore.last_reports` is one query for every device whose
last check-in bears on a release, however large the group (ADR 0011, "Cost").

``channel_settings`` holds a group's settings (scope ``group``) and a device's feature
opt-out (scope ``device``). ``release_first_seen`` is when the server first saw a
release in the newest targets metadata: a group's security delay counts from there.
A state change is compare-and-set on the state the change was decided from, so two
server processes evaluating one rollout never undo each other's halt.
"""

from __future__ import annotations

import builtins
import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from threading import Lock
from typing import Any, Final

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    case,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from otaguard.model.errors import ServerStorageError
from otaguard.model.version import Version
from otaguard.server.channels import GroupPolicy, Rollout, Window
from otaguard.server.storage.checkins import checkins_table
from otaguard.server.storage.database import storage_failure
from otaguard.server.storage.fleet_base import NameExistsError, UnknownNameError
from otaguard.server.storage.schema import SCHEMA
from otaguard.server.storage.unit import reading, writing

__all__ = [
    "MAX_REASON_CHARS",
    "LastReport",
    "RolloutStore",
    "SQLRolloutStore",
    "channel_settings_table",
    "release_first_seen_table",
    "rollouts_table",
]

#: a halt reason lists failing devices and their errors; bounded so a row stays small
MAX_REASON_CHARS: Final = 4000

_schema = SCHEMA
rollouts_table = Table(
    "rollouts",
    _schema,
    Column("name", String(64), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("group_name", String(64), nullable=False),
    Column("phases", String(64), nullable=False),
    Column("success_threshold", Integer, nullable=False),
    Column("failure_threshold", Integer, nullable=False),
    Column("window", String(64), nullable=True),
    Column("state", String(16), nullable=False),
    Column("phase", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
channel_settings_table = Table(
    "channel_settings",
    _schema,
    Column("scope", String(8), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("no_features", Boolean, nullable=False),
    Column("security_delay_seconds", Integer, nullable=False),
    Column("window", String(64), nullable=True),
)
release_first_seen_table = Table(
    "release_first_seen",
    _schema,
    Column("target", String(256), primary_key=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class LastReport:
    """A device's last check-in, as far as a rollout of one release cares.

    Attributes:
        serial: the device.
        running_version: what it reported running.
        manifest: the stored signed manifest when the device does not run the release
            (its last install result may be a failure of it); ``None`` when it runs it
            (a success: nothing to parse).
    """

    serial: str
    running_version: str
    manifest: bytes | None


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class RolloutStore(ABC):
    """Rollouts, channel settings and first-seen times of releases."""

    @abstractmethod
    def create(self, rollout: Rollout, *, now: dt.datetime) -> None:
        """Store a new rollout. Raises :class:`NameExistsError` if the name is taken."""

    @abstractmethod
    def get(self, name: str) -> Rollout:
        """One rollout. Raises :class:`UnknownNameError`."""

    @abstractmethod
    def list(self) -> list[Rollout]:
        """Every rollout, by name."""

    @abstractmethod
    def change(self, new: Rollout, *, expect_state: str, now: dt.datetime) -> bool:
        """Set state, phase and reason if the stored state is still ``expect_state``."""

    @abstractmethod
    def group_policies(self) -> dict[str, GroupPolicy]:
        """Every group's channel settings that were set."""

    @abstractmethod
    def set_group_policy(self, policy: GroupPolicy) -> None:
        """Replace a group's channel settings."""

    @abstractmethod
    def device_no_features(self, serial: str) -> bool:
        """Whether the device opted out of feature releases."""

    @abstractmethod
    def set_device_no_features(self, serial: str, no_features: bool) -> None:
        """Opt a device out of feature releases, or back in."""

    @abstractmethod
    def first_seen(self, targets: Iterable[str], *, now: dt.datetime) -> dict[str, dt.datetime]:
        """When each target was first seen, recording ``now`` for new ones."""

    @abstractmethod
    def last_reports(self, version: Version) -> builtins.list[LastReport]:
        """The last check-in of every device that bears on ``version``: it runs it, or its
        manifest names it (a superset of the failed installs of it). Devices whose last
        check-in does neither are pending for a rollout of ``version`` and not returned.
        """


def _rollout(row: Row[Any]) -> Rollout:
    return Rollout(
        name=row.name,
        version=Version.parse(row.version),
        group=row.group_name,
        phases=tuple(int(p) for p in row.phases.split(",")),
        success_threshold=row.success_threshold,
        failure_threshold=row.failure_threshold,
        window=Window.parse(row.window) if row.window else None,
        state=row.state,
        phase=row.phase,
        reason=row.reason,
    )


def _policy(row: Row[Any]) -> GroupPolicy:
    return GroupPolicy(
        name=row.name,
        no_features=bool(row.no_features),
        security_delay=dt.timedelta(seconds=row.security_delay_seconds),
        window=Window.parse(row.window) if row.window else None,
    )


class SQLRolloutStore(RolloutStore):
    """:class:`RolloutStore` on the server's shared engine."""

    def __init__(self, engine: Engine):
        """Use ``engine`` (schema made current by the migrations)."""
        self._engine = engine
        # first-seen times read back from the table. A row is never changed or deleted
        # once inserted, so what was read stays true in every process: a check-in asks
        # the database only about targets this process has not seen recorded yet.
        self._seen: dict[str, dt.datetime] = {}
        self._seen_lock = Lock()

    def _fail(self, e: SQLAlchemyError, what: str) -> ServerStorageError:
        return storage_failure(e, f"rollout store {what} failed", self._engine)

    def create(self, rollout: Rollout, *, now: dt.datetime) -> None:
        """See :meth:`RolloutStore.create`."""
        r = rollout
        try:
            with writing(self._engine) as conn:
                conn.execute(
                    insert(rollouts_table).values(
                        name=r.name,
                        version=str(r.version),
                        group_name=r.group,
                        phases=",".join(str(p) for p in r.phases),
                        success_threshold=r.success_threshold,
                        failure_threshold=r.failure_threshold,
                        window=r.window.text if r.window else None,
                        state=r.state,
                        phase=r.phase,
                        reason=r.reason[:MAX_REASON_CHARS],
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError as e:
            raise NameExistsError(f"a rollout named {r.name!r} exists") from e
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def get(self, name: str) -> Rollout:
        """See :meth:`RolloutStore.get`."""
        try:
            with reading(self._engine) as conn:
                row = conn.execute(
                    select(rollouts_table).where(rollouts_table.c.name == name)
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        if row is None:
            raise UnknownNameError(f"no rollout named {name!r}")
        return _rollout(row)

    def list(self) -> list[Rollout]:
        """See :meth:`RolloutStore.list`."""
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(select(rollouts_table).order_by(rollouts_table.c.name)).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [_rollout(r) for r in rows]

    def change(self, new: Rollout, *, expect_state: str, now: dt.datetime) -> bool:
        """See :meth:`RolloutStore.change`."""
        t = rollouts_table
        try:
            with writing(self._engine) as conn:
                res = conn.execute(
                    update(t)
                    .where(t.c.name == new.name, t.c.state == expect_state)
                    .values(
                        state=new.state,
                        phase=new.phase,
                        reason=new.reason[:MAX_REASON_CHARS],
                        updated_at=now,
                    )
                )
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return bool(res.rowcount)

    def _settings(self, scope: str) -> builtins.list[Row[Any]]:
        t = channel_settings_table
        try:
            with reading(self._engine) as conn:
                return list(conn.execute(select(t).where(t.c.scope == scope)).all())
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e

    def _put(self, scope: str, name: str, **values: Any) -> None:
        t = channel_settings_table
        try:
            with writing(self._engine) as conn:
                done = conn.execute(
                    update(t).where(t.c.scope == scope, t.c.name == name).values(**values)
                )
                if not done.rowcount:
                    conn.execute(insert(t).values(scope=scope, name=name, **values))
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e

    def group_policies(self) -> dict[str, GroupPolicy]:
        """See :meth:`RolloutStore.group_policies`."""
        return {r.name: _policy(r) for r in self._settings("group")}

    def set_group_policy(self, policy: GroupPolicy) -> None:
        """See :meth:`RolloutStore.set_group_policy`."""
        self._put(
            "group",
            policy.name,
            no_features=policy.no_features,
            security_delay_seconds=int(policy.security_delay.total_seconds()),
            window=policy.window.text if policy.window else None,
        )

    def device_no_features(self, serial: str) -> bool:
        """See :meth:`RolloutStore.device_no_features`."""
        t = channel_settings_table
        try:
            with reading(self._engine) as conn:
                row = conn.execute(
                    select(t.c.no_features).where(t.c.scope == "device", t.c.name == serial)
                ).first()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return bool(row.no_features) if row is not None else False

    def set_device_no_features(self, serial: str, no_features: bool) -> None:
        """See :meth:`RolloutStore.set_device_no_features`."""
        self._put("device", serial, no_features=no_features, security_delay_seconds=0, window=None)

    def first_seen(self, targets: Iterable[str], *, now: dt.datetime) -> dict[str, dt.datetime]:
        """See :meth:`RolloutStore.first_seen`.

        Only the targets asked for, and only those this process has not read back yet:
        after a publication's first check-in here, no statement at all.
        """
        t = release_first_seen_table
        wanted = set(targets)
        with self._seen_lock:
            seen = {k: v for k, v in self._seen.items() if k in wanted}
        unknown = wanted - set(seen)
        if not unknown:
            return seen
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(select(t).where(t.c.target.in_(sorted(unknown)))).all()
            read = {r.target: _utc(r.first_seen) for r in rows}
            with self._seen_lock:  # read before this call inserted anything: committed
                self._seen.update(read)
            seen.update(read)
            missing = unknown - set(read)
            if missing:
                with writing(self._engine) as conn:
                    for name in sorted(missing):
                        try:
                            with conn.begin_nested():
                                conn.execute(insert(t).values(target=name, first_seen=now))
                            seen[name] = now  # cached once a later call reads it back
                        except IntegrityError:  # another process recorded it first
                            continue
        except SQLAlchemyError as e:
            raise self._fail(e, "write") from e
        return seen

    def last_reports(self, version: Version) -> builtins.list[LastReport]:
        """See :meth:`RolloutStore.last_reports`.

        One query, whatever the number of devices: the newest row per serial (the
        highest id, the order check-ins were recorded in), kept when it runs ``version``
        or when its manifest bytes contain ``"<version>"`` — every last install result
        about ``version`` does, so no failure is missed; the caller parses those few
        manifests. A success costs no manifest transfer and no parse.
        """
        c = checkins_table
        text = str(version)
        if any(ch in text for ch in "%_\\"):  # semver has none; a LIKE pattern must not either
            raise ValueError(f"version {text!r} cannot be matched")
        quoted = f'"{text}"'.encode()
        latest = select(func.max(c.c.id)).group_by(c.c.serial)
        runs = c.c.running_version == text
        # a byte search in the raw manifest: no JSON parsing in SQL, which one hostile
        # manifest (a NUL escape, a NaN) could make fail for every evaluation.
        # SQLite's LIKE does not match BLOBs (instr does); PostgreSQL's bytea has LIKE.
        if self._engine.dialect.name == "sqlite":
            mentions = func.instr(c.c.manifest, literal(quoted, LargeBinary)) > 0
        else:
            mentions = c.c.manifest.op("LIKE", is_comparison=True)(b"%" + quoted + b"%")
        query = select(
            c.c.serial,
            c.c.running_version,
            case((runs, null()), else_=c.c.manifest).label("manifest"),
        ).where(c.c.id.in_(latest), or_(runs, mentions))
        try:
            with reading(self._engine) as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as e:
            raise self._fail(e, "read") from e
        return [
            LastReport(
                r.serial, r.running_version, bytes(r.manifest) if r.manifest is not None else None
            )
            for r in rows
        ]
