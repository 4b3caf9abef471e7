"""The SQL stores, announcing their committed changes to the serving caches.

The device routes' fast path (:mod:`otaguard.server.fastpath`) keeps admitted devices and
the served metadata in memory; these subclasses call ``on_change`` after every write that
could make a cached answer wrong (a device's status or certificates, a publication),
whether it succeeded or not (a failed write changes nothing, a spurious refresh is cheap).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from sqlalchemy.engine import Engine

from otaguard.server.storage.base import DeviceRecord, DeviceState, MetadataRecord, PublishOutcome
from otaguard.server.storage.devices import SQLDeviceStore
from otaguard.server.storage.sql import SQLMetadataStore
from otaguard.server.storage.unit import after_commit

__all__ = ["NotifyingDeviceStore", "NotifyingMetadataStore"]


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
    """:class:`SQLMetadataStore` calling ``on_change`` after each publication."""

    def __init__(self, engine: Engine, *, on_change: Callable[[], None]):
        """Use ``engine``; ``on_change`` runs after each publication attempt."""
        super().__init__(engine)
        self._on_change = on_change

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
