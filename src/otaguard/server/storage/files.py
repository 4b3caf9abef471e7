"""Blobs on the local filesystem, content-addressed by their consistent-snapshot name.

A blob ``<sha256>.<target path>`` is written to a hidden temp file in the same directory,
hashed while it streams in, fsynced, compared with the hash in its name and only then
renamed into place. A reader therefore sees either no blob or a complete, verified one.
The writer holds an exclusive ``flock`` on its temp file, so that the start-up clean-up
(:meth:`FileBlobStore.remove_interrupted_uploads`) removes the temp files of interrupted
uploads but never one that another server process sharing the directory is writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Final

from otaguard._fs import fsync_dir
from otaguard.model.errors import ServerStorageError, VerificationError
from otaguard.server._names import parse_blob_name
from otaguard.server.storage.base import BlobInfo, BlobStore, BlobWriter

__all__ = ["UPLOAD_TEMP_GLOB", "FileBlobStore"]

#: the temp files of uploads in progress (hidden, so never a blob name)
UPLOAD_TEMP_GLOB: Final = ".upload.*.tmp"

logger = logging.getLogger(__name__)


class _FileBlobWriter(BlobWriter):
    def __init__(self, directory: Path, filename: str, sha256_hex: str, max_length: int):
        self._directory = directory
        self._filename = filename
        self._expected = sha256_hex
        self._max_length = max_length
        self._hash = hashlib.sha256()
        self._length = 0
        self._done = False
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upload.", suffix=".tmp")
        except OSError as e:
            raise ServerStorageError(
                f"cannot create a temp file for {filename}: {e.strerror}"
            ) from e
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        # Held until the file is closed: marks the upload as alive for the clean-up.
        fcntl.flock(fd, fcntl.LOCK_EX)

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("blob writer already finished")
        self._length += len(chunk)
        if self._length > self._max_length:
            self.abort()
            raise VerificationError(
                f"blob {self._filename} exceeds the size cap of {self._max_length} bytes"
            )
        self._hash.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as e:
            self.abort()
            raise ServerStorageError(f"cannot write blob {self._filename}: {e.strerror}") from e

    def commit(self) -> BlobInfo:
        if self._done:
            raise RuntimeError("blob writer already finished")
        digest = self._hash.hexdigest()
        if digest != self._expected:
            self.abort()
            raise VerificationError(
                f"blob {self._filename} content has sha256 {digest}, not the one in its name"
            )
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._directory / self._filename)
            fsync_dir(self._directory)
        except OSError as e:
            self.abort()
            raise ServerStorageError(f"cannot store blob {self._filename}: {e.strerror}") from e
        self._done = True
        logger.info("stored blob %s (%d bytes)", self._filename, self._length)
        return BlobInfo(self._filename, self._length, digest)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class FileBlobStore(BlobStore):
    """Blobs as files in one directory (``DATA/blobs``)."""

    def __init__(self, directory: Path):
        """Open (and create) the blob directory.

        Raises:
            ServerStorageError: the directory cannot be created.
        """
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            raise ServerStorageError(
                f"cannot create blob directory {directory}: {e.strerror}"
            ) from e

    def remove_interrupted_uploads(self) -> int:
        """Remove the temp files of uploads no process is writing (a crash or a power cut
        mid-upload leaves them); return how many were removed.

        Raises:
            ServerStorageError: the directory cannot be listed.
        """
        removed = 0
        try:
            candidates = sorted(self.directory.glob(UPLOAD_TEMP_GLOB))
        except OSError as e:
            raise ServerStorageError(
                f"cannot list blob directory {self.directory}: {e.strerror}"
            ) from e
        for tmp in candidates:
            try:
                with tmp.open("rb") as f:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # an upload in progress in another process
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # finished or removed meanwhile
            except OSError as e:
                logger.warning("cannot remove interrupted upload %s: %s", tmp.name, e.strerror)
        if removed:
            logger.info("removed %d interrupted upload(s) from %s", removed, self.directory)
        return removed

    def _checked(self, filename: str) -> str:
        parsed = parse_blob_name(filename)
        if parsed is None:
            raise VerificationError(f"{filename!r} is not a blob name (<sha256>.<target path>)")
        return parsed[0]

    def stat(self, filename: str) -> BlobInfo | None:
        """Return the stored blob's info, or ``None`` if absent or the name is invalid."""
        parsed = parse_blob_name(filename)
        if parsed is None:
            return None
        try:
            st = (self.directory / filename).stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ServerStorageError(f"cannot stat blob {filename}: {e.strerror}") from e
        return BlobInfo(filename, st.st_size, parsed[0])

    def local_path(self, filename: str) -> Path | None:
        """Return the blob's path, or ``None`` if absent or the name is invalid."""
        if self.stat(filename) is None:
            return None
        return self.directory / filename

    def writer(self, filename: str, *, max_length: int) -> BlobWriter:
        """Start a verified, atomic write of blob ``filename``.

        Raises:
            VerificationError: the name is not ``<sha256>.<target path>``.
            ServerStorageError: no temp file can be created.
        """
        sha = self._checked(filename)
        return _FileBlobWriter(self.directory, filename, sha, max_length)
