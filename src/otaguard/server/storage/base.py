"""Storage interfaces of the update server.

Routes and the publishing logic speak only to these interfaces; adapters
(:mod:`.sql`, :mod:`.files`) are the only modules that import a database or storage
library, and they translate foreign exceptions into :mod:`otaguard.model.errors` types.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = [
    "MAX_BLOB_BYTES",
    "BlobInfo",
    "BlobStore",
    "BlobWriter",
    "MetadataRecord",
    "MetadataStore",
    "PublishOutcome",
]

# Largest target blob accepted, upload or import: bounds disk use per request and keeps
# one hostile upload from filling the server. Firmware images are far below this.
MAX_BLOB_BYTES: Final = 4 * 1024**3


@dataclass(frozen=True)
class MetadataRecord:
    """One signed metadata file, stored as its exact bytes.

    ``filename`` is the versioned name (``3.snapshot.json``); timestamps are stored under
    ``<version>.timestamp.json`` and served as ``timestamp.json`` through the pointer.
    """

    filename: str
    role: str
    version: int
    data: bytes
    sha256: str


@dataclass(frozen=True)
class PublishOutcome:
    """What one publish transaction changed."""

    added: tuple[str, ...]
    unchanged: tuple[str, ...]
    timestamp_filename: str | None
    published_at: dt.datetime


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its name, length and verified sha256."""

    filename: str
    length: int
    sha256: str


class MetadataStore(ABC):
    """Signed metadata, immutable per versioned filename, plus the timestamp pointer."""

    @abstractmethod
    def get(self, filename: str) -> bytes | None:
        """Return the stored bytes of a versioned metadata file, or ``None``."""

    @abstractmethod
    def get_record(self, filename: str) -> MetadataRecord | None:
        """Return the stored record of a versioned metadata file, or ``None``."""

    @abstractmethod
    def current_timestamp(self) -> MetadataRecord | None:
        """Return the timestamp devices are served now, or ``None`` before the first publish."""

    @abstractmethod
    def newest(self, role: str) -> MetadataRecord | None:
        """Return the highest-version record of ``role`` (e.g. the newest root)."""

    @abstractmethod
    def publish(
        self,
        records: Sequence[MetadataRecord],
        *,
        timestamp: str | None,
        now: dt.datetime,
        expected_timestamp: str | None,
    ) -> PublishOutcome:
        """Insert ``records`` and move the timestamp pointer in one transaction.

        Args:
            records: metadata to insert; a record identical to a stored one is a no-op.
            timestamp: filename (one of ``records`` or already stored) the pointer moves to;
                ``None`` leaves the pointer alone.
            now: publication time recorded on new rows.
            expected_timestamp: the pointer value the caller based its checks on; the
                transaction is refused when another publish moved it meanwhile.

        Raises:
            ConflictError: the pointer moved concurrently (it is not
                ``expected_timestamp``); nothing was changed, the caller may re-check.
            VerificationError: a versioned file exists with different bytes (versioned
                metadata is immutable).
            ServerStorageError: the database failed; nothing was changed.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


class BlobWriter(ABC):
    """An in-progress blob upload; nothing is visible until :meth:`commit`."""

    @abstractmethod
    def write(self, chunk: bytes) -> None:
        """Append ``chunk``.

        Raises:
            VerificationError: the blob grew past its size cap.
            ServerStorageError: the storage failed.
        """

    @abstractmethod
    def commit(self) -> BlobInfo:
        """Verify the content against the hash in the name and make it visible.

        Raises:
            VerificationError: the content does not match its name; nothing is stored.
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard the upload (safe to call after :meth:`commit`)."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class BlobStore(ABC):
    """Target blobs, content-addressed by their consistent-snapshot name."""

    @abstractmethod
    def stat(self, filename: str) -> BlobInfo | None:
        """Return the stored blob's info, or ``None`` if absent."""

    @abstractmethod
    def local_path(self, filename: str) -> Path | None:
        """Return a local file path to serve the blob from, or ``None`` if absent."""

    @abstractmethod
    def writer(self, filename: str, *, max_length: int) -> BlobWriter:
        """Start storing a blob named ``<sha256>.<target path>``.

        Raises:
            VerificationError: the name is not a valid blob name.
        """

    def put_chunks(self, filename: str, chunks: Iterable[bytes], *, max_length: int) -> BlobInfo:
        """Store a blob from an iterable of chunks, verified against its name."""
        with self.writer(filename, max_length=max_length) as w:
            for chunk in chunks:
                w.write(chunk)
            return w.commit()
