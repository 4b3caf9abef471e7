"""The SQL stores, announcing their committed changes to the serving caches.

The device routes' fast path (:mod:`otaguard.server.fastpath`) keeps admitted devices and
the served metadata in memory; these subclasses call ``on_change`` after every write that
could make a cached answer wrong (a device's status or certificates, a publication),
whether it succeeded or not (a failed write changes nothing, a spurious refresh is cheap).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, TypeVar

from sqlalchemy.engine import Engine

from otaguard.server.channels import GroupPolicy, Rollout
from otaguard.server.storage.assignments import Assignment, SQLAssignmentStore
from otaguard.server.storage.base import DeviceRecord, DeviceState, MetadataRecord, PublishOutcome
from otaguard.server.storage.devices import SQLDeviceStore
from otaguard.server.storage.rollouts import SQLRolloutStore
from otaguard.server.storage.sql import SQLMetadataStore
from otaguard.server.storage.unit import after_commit

__all__ = [
    "ASSIGNMENTS_SECONDS",
    "MAX_KEPT_ASSIGNMENTS",
    "NEWEST_VERSION_SECONDS",
    "ROLLOUT_LIST_SECONDS",
    "NotifyingAssignmentStore",
    "NotifyingDeviceStore",
    "NotifyingMetadataStore",
    "NotifyingRolloutStore",
]

T = TypeVar("T")

#: a role's newest version is read again at least this often even when no publication was
#: announced: the bound for a writer that does not announce (ADR 0009 has every server
#: process share the data directory, and so the announcement)
NEWEST_VERSION_SECONDS: Final = 1.0
#: the same bound for the rollout list every check-in asks for (a halt or pause by any
#: process sharing the data directory is announced, and seen at the next check-in)
ROLLOUT_LIST_SECONDS: Final = 1.0
#: the same bound for the operators' per-device assignments (every check-in's answer asks)
ASSIGNMENTS_SECONDS: Final = 1.0
#: assignments kept in memory at most: operators pin a few devices (a hold, a version);
#: past this many (read again every ASSIGNMENTS_SECONDS at the most) each check-in reads
#: its own row instead
MAX_KEPT_ASSIGNMENTS: Final = 10_000


def _still_good(
    kept: tuple[object, Any, float] | None, *, token: object, now: float, seconds: float
) -> bool:
    """Whether a value kept as (announcement token, value, monotonic time) may be used: the
    announcement is the same, it is younger than ``seconds``, and there is an announcement
    at all (no signal file: always read)."""
    return token is not None and kept is not None and kept[0] == token and now - kept[2] < seconds


class _Kept(Generic[T]):
    """One value read again only after an announcement (``changes``' token differs) or
    ``seconds``, or once :meth:`drop` was called (this process wrote)."""

    def __init__(self, changes: Callable[[], object], *, seconds: float):
        self._changes = changes
        self._seconds = seconds
        self._kept: tuple[object, T, float] | None = None

    def get(self, read: Callable[[], T]) -> T:
        token = self._changes()  # before the read: a write during it reads again
        kept = self._kept
        now = time.monotonic()
        if kept is not None and _still_good(kept, token=token, now=now, seconds=self._seconds):
            return kept[1]
        value = read()
        self._kept = (token, value, now)
        return value

    def drop(self) -> None:
        self._kept = None


class _Announcer:
    """A notifying store's write: what it keeps is dropped at once (its own unit reads
    its write), the announcement made once the write is committed."""

    def __init__(self, engine: Engine, announce: Callable[[], None], *kept: _Kept[Any]):
        self._engine = engine
        self._announce = announce
        self._kept = kept

    def __call__(self) -> None:
        for k in self._kept:
            k.drop()
        after_commit(self._engine, self._announce)


class NotifyingDeviceStore(SQLDeviceStore):
    """:class:`SQLDeviceStore` calling ``on_change`` after status and certificate writes
    (inside a unit of work: once the unit committed)."""

    def __init__(self, engine: Engine, *, on_change: Callable[[], None]):
        """Use ``engine``; ``on_change`` runs after each status or certificate write."""
        super().__init__(engine)
        self._notify_engine = engine
        self._announce = on_change

    def _on_change(self) -> None:
        after_commit(self._notify_engine, self._announce)

    def set_status(
        self, serial: str, status: DeviceState, *, reason: str, now: dt.datetime
    ) -> DeviceRecord:
        """See :meth:`SQLDeviceStore.set_status`; announced even when it raises."""
        try:
            return super().set_status(serial, status, reason=reason, now=now)
        finally:
            self._on_change()

    def record_certificate(
        self, serial: str, cert_serial: str, *, not_after: dt.datetime, now: dt.datetime
    ) -> DeviceRecord:
        """See :meth:`SQLDeviceStore.record_certificate`; announced even when it raises."""
        try:
            return super().record_certificate(serial, cert_serial, not_after=not_after, now=now)
        finally:
            self._on_change()


class NotifyingMetadataStore(SQLMetadataStore):
    """:class:`SQLMetadataStore` calling ``on_change`` after each publication.

    With ``changes`` (what identifies the last announcement, e.g. a
    :class:`~otaguard.server._signal.ChangeSignal`'s token), :meth:`newest_version` is
    kept per role until the next announcement, at most :data:`NEWEST_VERSION_SECONDS`:
    every check-in asks it (twice), and it changes only when a release lands (ADR 0036).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        on_change: Callable[[], None],
        changes: Callable[[], object] | None = None,
    ):
        """Use ``engine``; ``on_change`` runs after each publication attempt."""
        super().__init__(engine)
        self._on_change = on_change
        self._changes = changes
        self._versions: dict[str, _Kept[int | None]] = {}

    def newest_version(self, role: str) -> int | None:
        """See :meth:`SQLMetadataStore.newest_version`; kept until the next announcement."""
        if self._changes is None:
            return super().newest_version(role)
        kept = self._versions.get(role)
        if kept is None:  # a few roles: a lost race makes one more read, nothing worse
            kept = self._versions[role] = _Kept(self._changes, seconds=NEWEST_VERSION_SECONDS)
        return kept.get(lambda: super(NotifyingMetadataStore, self).newest_version(role))

    def publish(
        self,
        records: Sequence[MetadataRecord],
        *,
        timestamp: str | None,
        now: dt.datetime,
        expected_timestamp: str | None,
    ) -> PublishOutcome:
        """See :meth:`SQLMetadataStore.publish`; announced even when it raises."""
        try:
            return super().publish(
                records, timestamp=timestamp, now=now, expected_timestamp=expected_timestamp
            )
        finally:
            self._on_change()


class NotifyingRolloutStore(SQLRolloutStore):
    """:class:`SQLRolloutStore` announcing rollout and group-policy writes, and keeping
    the rollout list and the groups' channel settings.

    Every check-in reads both (the channel policy, ADR 0011); the list changes when an
    operator creates a rollout or a phase advances, halts or pauses, the settings when an
    operator sets a group's (``group set``). Each is kept until
    an announcement (``changes``' token differs), at most :data:`ROLLOUT_LIST_SECONDS`, and
    dropped at once in this process when it writes one (its own unit reads its write).
    Other processes sharing the data directory see the announcement after the commit
    (ADR 0036).
    """

    def __init__(
        self, engine: Engine, *, on_change: Callable[[], None], changes: Callable[[], object]
    ):
        """Use ``engine``; ``on_change`` announces a committed write, ``changes`` reads
        what identifies the last announcement."""
        super().__init__(engine)
        self._list: _Kept[list[Rollout]] = _Kept(changes, seconds=ROLLOUT_LIST_SECONDS)
        self._policies: _Kept[dict[str, GroupPolicy]] = _Kept(changes, seconds=ROLLOUT_LIST_SECONDS)
        self._changed = _Announcer(engine, on_change, self._list, self._policies)

    def create(self, rollout: Rollout, *, now: dt.datetime) -> None:
        """See :meth:`SQLRolloutStore.create`; announced even when it raises."""
        try:
            super().create(rollout, now=now)
        finally:
            self._changed()

    def change(self, new: Rollout, *, expect_state: str, now: dt.datetime) -> bool:
        """See :meth:`SQLRolloutStore.change`; announced even when it refuses."""
        try:
            return super().change(new, expect_state=expect_state, now=now)
        finally:
            self._changed()

    def set_group_policy(self, policy: GroupPolicy) -> None:
        """See :meth:`SQLRolloutStore.set_group_policy`; announced even when it raises."""
        try:
            super().set_group_policy(policy)
        finally:
            self._changed()

    def group_policies(self) -> dict[str, GroupPolicy]:
        """See :meth:`SQLRolloutStore.group_policies`; kept until the next announcement
        (every check-in's policy asks; an operator changes them)."""
        return dict(self._policies.get(super().group_policies))

    def list(self) -> list[Rollout]:
        """See :meth:`SQLRolloutStore.list`; kept until the next announcement."""
        return list(self._list.get(super().list))


class NotifyingAssignmentStore(SQLAssignmentStore):
    """:class:`SQLAssignmentStore` announcing its writes, and keeping every assignment.

    Every check-in's answer asks for the device's assignment, and almost every device has
    none: the whole table (a few rows an operator made) is kept until an announcement, at
    most :data:`ASSIGNMENTS_SECONDS`, so a check-in reads none. Past
    :data:`MAX_KEPT_ASSIGNMENTS` rows each check-in reads its own row.
    """

    def __init__(
        self, engine: Engine, *, on_change: Callable[[], None], changes: Callable[[], object]
    ):
        """Use ``engine``; ``on_change`` announces a committed write, ``changes`` reads
        what identifies the last announcement."""
        super().__init__(engine)
        # {serial: assignment}, or None when there are too many to keep
        self._table: _Kept[dict[str, Assignment] | None] = _Kept(
            changes, seconds=ASSIGNMENTS_SECONDS
        )
        self._changed = _Announcer(engine, on_change, self._table)

    def set(self, assignment: Assignment) -> None:
        """See :meth:`SQLAssignmentStore.set`; announced even when it raises."""
        try:
            super().set(assignment)
        finally:
            self._changed()

    def clear(self, serial: str) -> None:
        """See :meth:`SQLAssignmentStore.clear`; announced even when it raises."""
        try:
            super().clear(serial)
        finally:
            self._changed()

    def get(self, serial: str) -> Assignment | None:
        """See :meth:`SQLAssignmentStore.get`; from the kept table when it is kept."""
        table = self._table.get(self._read_table)
        return super().get(serial) if table is None else table.get(serial)

    def _read_table(self) -> dict[str, Assignment] | None:
        rows = self.all(limit=MAX_KEPT_ASSIGNMENTS + 1)
        return {a.serial: a for a in rows} if len(rows) <= MAX_KEPT_ASSIGNMENTS else None
