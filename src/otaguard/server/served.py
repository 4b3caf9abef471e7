"""The published metadata in memory, as the exact signed bytes, for serving.

Devices poll ``timestamp.json`` and ask for the next root (a 404 for almost every poll);
both, and the snapshot and targets the current timestamp names, are answered from a
:class:`ServedView` built once per publication, without a database query. A publication
by this process or any other sharing the data directory is seen on the next request
(:class:`~otaguard.server._signal.ChangeSignal`); a re-check in a background thread
(:data:`METADATA_RECHECK_SECONDS`) covers processes that share only the database. A
request never waits on the database except right after a publication.

Versioned files outside the view (an older snapshot a device is still walking to) are
read from the store once and kept (:data:`MAX_KEPT_FILES`): versioned metadata never
changes once published.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Snapshot, Timestamp

from otaguard.model.errors import OtaguardError
from otaguard.server._names import parse_metadata_name
from otaguard.server._periodic import PeriodicTask
from otaguard.server._signal import ChangeSignal
from otaguard.server.storage.base import MetadataRecord, MetadataStore

__all__ = ["MAX_KEPT_FILES", "METADATA_RECHECK_SECONDS", "ServedMetadata", "ServedView"]

logger = logging.getLogger(__name__)

#: a process that shares only the database with the publisher (not the data directory)
#: serves a new timestamp at most this late; the device's TUF client verifies whichever
#: it gets, so a late one is merely late
METADATA_RECHECK_SECONDS: Final = 1.0
#: versioned files kept besides the current view (a few past snapshots and targets);
#: bounded so that requests for many old versions cannot grow memory
MAX_KEPT_FILES: Final = 64


@dataclass(frozen=True)
class ServedView:
    """What one publication serves: immutable, swapped whole (readers take no lock).

    Attributes:
        timestamp: the current timestamp, or ``None`` before the first publication.
        roots: every root by version.
        files: the versioned snapshot and targets files the timestamp leads to.
        newest_root: the highest root version (0: none).
    """

    timestamp: MetadataRecord | None = None
    roots: dict[int, MetadataRecord] = field(default_factory=dict)
    files: dict[str, MetadataRecord] = field(default_factory=dict)
    newest_root: int = 0


class _Unknown:
    """The view cannot say: the store must be asked."""


UNKNOWN: Final = _Unknown()


def _load_view(store: MetadataStore, previous: ServedView) -> ServedView:
    """Read the view of the current publication from the store: two queries when it is
    ``previous``'s, a few more for a new one."""
    timestamp = store.current_timestamp()
    newest = store.newest("root")
    if timestamp == previous.timestamp and (newest.version if newest else 0) == (
        previous.newest_root
    ):
        return previous
    roots: dict[int, MetadataRecord] = {}
    if newest is not None:
        roots[newest.version] = newest
        for version in range(1, newest.version):
            rec = store.get_record(f"{version}.root.json")
            if rec is not None:
                roots[version] = rec
    files: dict[str, MetadataRecord] = {}
    if timestamp is not None:
        try:
            snap_meta = Metadata[Timestamp].from_bytes(timestamp.data).signed.snapshot_meta
            snapshot = store.get_record(f"{snap_meta.version}.snapshot.json")
            if snapshot is not None:
                files[snapshot.filename] = snapshot
                meta = Metadata[Snapshot].from_bytes(snapshot.data).signed.meta
                for name, info in meta.items():
                    rec = store.get_record(f"{info.version}.{name}")
                    if rec is not None:
                        files[rec.filename] = rec
        except (RepositoryError, ValueError, KeyError, TypeError) as e:
            # Stored metadata was verified when published; if it cannot be parsed now the
            # view is partial and the store answers the rest.
            logger.warning("cannot preload the files the timestamp names: %s", e)
    return ServedView(
        timestamp=timestamp,
        roots=roots,
        files=files,
        newest_root=newest.version if newest is not None else 0,
    )


class ServedMetadata:
    """The served metadata in memory (module docstring)."""

    def __init__(
        self,
        store: MetadataStore,
        *,
        signal: ChangeSignal,
    ):
        """Serve from ``store``'s current publication.

        Args:
            store: where publications land.
            signal: touched by every publisher sharing the data directory.
        """
        self._store = store
        self._signal = signal
        self._lock = threading.Lock()
        self._view = ServedView()
        self._loaded_under: object = UNKNOWN  # signal token the view was loaded under
        self._kept: OrderedDict[str, MetadataRecord] = OrderedDict()

    @property
    def view(self) -> ServedView:
        """The view being served now."""
        return self._view

    def stale(self) -> bool:
        """Whether a publication was signalled since the view was loaded (one ``stat``)."""
        return self._signal.token() != self._loaded_under

    def refresh(self, *, recheck: bool = False) -> None:
        """Reload the view from the store if a publication was signalled, or always with
        ``recheck`` (blocking: call it from a worker thread).

        Raises:
            ServerStorageError: the store failed; the previous view stays.
        """
        with self._lock:
            token = self._signal.token()  # before reading: a later publication re-triggers
            if token == self._loaded_under and not recheck:
                return  # another request refreshed meanwhile
            view = _load_view(self._store, self._view)
            if view is not self._view:
                logger.debug(
                    "serving %s, root %d",
                    view.timestamp.filename if view.timestamp else "nothing",
                    view.newest_root,
                )
            self._view = view
            self._loaded_under = token

    def rechecker(self) -> PeriodicTask:
        """The background re-check (start it with the server, stop it at shutdown)."""
        return _Recheck(self)

    def lookup(self, filename: str) -> MetadataRecord | _Unknown | None:  # noqa: PLR0911 - one answer per kind of name
        """Answer from memory: the record, ``None`` (404), or :data:`UNKNOWN`.

        ``timestamp.json`` is the current timestamp, ``root.json`` the newest root;
        ``N.root.json`` is known for every N (the 404 of the next root included).
        """
        name = parse_metadata_name(filename)
        if name is None:
            return None
        view = self._view
        if name.version is None:
            if name.role == "timestamp":
                return view.timestamp
            if name.role == "root":
                return view.roots.get(view.newest_root)
            return None
        if name.role == "timestamp":
            return None  # the timestamp is served under its unversioned name only
        if name.role == "root":
            return view.roots.get(name.version)
        found = view.files.get(filename)
        if found is not None:
            return found
        kept = self._kept.get(filename)
        return kept if kept is not None else UNKNOWN

    def load(self, filename: str) -> MetadataRecord | None:
        """Read a versioned file :meth:`lookup` did not know from the store, and keep it
        (blocking: call it from a worker thread).

        Raises:
            ServerStorageError: the store failed.
        """
        rec = self._store.get_record(filename)
        if rec is not None:
            with self._lock:
                self._kept[filename] = rec
                while len(self._kept) > MAX_KEPT_FILES:
                    self._kept.popitem(last=False)
        return rec


class _Recheck(PeriodicTask):
    def __init__(self, served: ServedMetadata):
        super().__init__(interval=METADATA_RECHECK_SECONDS, name="otaguard-served-recheck")
        self._served = served

    def _tick(self) -> None:
        try:
            self._served.refresh(recheck=True)
        except OtaguardError as e:  # the previous view stays; the next round retries
            logger.warning("re-reading the served metadata failed: %s", e.diagnostics())
