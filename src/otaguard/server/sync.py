"""Serving what the release tooling writes into a repository directory, without a restart.

A background thread polls ``REPO_DIR/metadata/timestamp.json``. When its fingerprint
(mtime, size, sha256) changes, the current set is imported: blobs first (each verified
against the hash in its name while it is copied), then the metadata through the same
verified, single-transaction :func:`~otaguard.server.publish.publish_files` the operator
API uses.

Outcomes of one check, by fault:

* refused (:class:`VerificationError`, from reading the set, copying blobs or
  publishing): logged once at ERROR, one line, and not retried until the timestamp
  changes again - the same bytes would be refused the same way;
* not now (:class:`RetryLaterError`: the repository is mid-write, or a concurrent
  publication won): retried quietly at the next interval;
* anything else of ours (unreadable directory, database down): retried at the next
  interval, logged at WARNING when the failure changes (not every interval).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

from otaguard.model.errors import (
    OtaguardError,
    RetryLaterError,
    ServerStorageError,
    VerificationError,
)
from otaguard.server._periodic import PeriodicTask
from otaguard.server._repo_dir import (
    BlobSource,
    RepoNotReadyError,
    read_current_set,
    timestamp_fingerprint,
)
from otaguard.server.publish import publish_files
from otaguard.server.storage.base import MAX_BLOB_BYTES, BlobStore, MetadataStore

if TYPE_CHECKING:
    from otaguard.server.online import OnlineSigner

__all__ = ["RepoSync"]

logger = logging.getLogger(__name__)

# Copy blobs in chunks so a multi-GiB image never sits in memory.
COPY_CHUNK_BYTES: Final = 1024 * 1024


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK_BYTES):
            yield chunk


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RepoSync(PeriodicTask):
    """Imports a repository directory into the stores whenever its timestamp changes."""

    def __init__(
        self,
        repo_dir: Path,
        *,
        store: MetadataStore,
        blobs: BlobStore,
        interval: float,
        clock: Callable[[], dt.datetime] = _utcnow,
        online: OnlineSigner | None = None,
        on_published: Callable[[], None] | None = None,
    ):
        """Prepare (but do not start) syncing ``repo_dir``.

        Args:
            repo_dir: repository directory written by :mod:`otaguard.repo`.
            store: metadata store to publish into.
            blobs: blob store to copy target blobs into.
            interval: seconds between polls.
            clock: reference time source for verification.
            online: the server's online signer, passed to
                :func:`~otaguard.server.publish.publish_files`.
            on_published: called after each imported publication (the SBOM index);
                it must not raise.
        """
        super().__init__(interval=interval, name="otaguard-repo-sync")
        self.repo_dir = Path(repo_dir)
        self._store = store
        self._blobs = blobs
        self._clock = clock
        self._online = online
        self._on_published = on_published
        self._last: tuple[int, int, str] | None = None
        self._last_failure: str | None = None
        self._lock = threading.Lock()

    def _copy_blob(self, src: BlobSource) -> None:
        have = self._blobs.stat(src.name)
        if have is not None and have.length == src.length:
            return
        if src.length > MAX_BLOB_BYTES:
            raise VerificationError(f"blob {src.name} exceeds {MAX_BLOB_BYTES} bytes")
        try:
            self._blobs.put_chunks(src.name, _chunks(src.path), max_length=src.length)
        except FileNotFoundError as e:
            raise RepoNotReadyError(f"blob {src.name} is not in the repository (yet)") from e
        except OSError as e:
            raise ServerStorageError(f"cannot read blob {src.path}: {e.strerror}") from e

    def check_once(self) -> bool:
        """Import the repository if its timestamp changed since the last import.

        Returns:
            True when a new publication was imported.

        Raises:
            VerificationError: the repository's current set was refused; it is not
                retried until the timestamp changes again.
            OtaguardError: anything else (unreadable directory, the stores failed);
                retried at the next check.
        """
        with self._lock:
            fingerprint = timestamp_fingerprint(self.repo_dir)
            if fingerprint is None or fingerprint == self._last:
                return False
            try:
                current = read_current_set(self.repo_dir)
                for blob in current.blobs:
                    self._copy_blob(blob)
                outcome = publish_files(
                    self._store,
                    self._blobs,
                    current.metadata,
                    now=self._clock(),
                    online=self._online,
                )
            except RetryLaterError as e:
                logger.debug("repository not ready, retrying later: %s", e.diagnostics())
                return False
            except VerificationError:
                # Same bytes will be refused the same way; wait for the next release.
                self._last = fingerprint
                raise
            self._last = fingerprint
            if outcome.added:
                logger.info("imported %s from %s", ", ".join(outcome.added), self.repo_dir)
                if self._on_published is not None:
                    self._on_published()
            return bool(outcome.added)

    def _tick(self) -> None:
        try:
            self.check_once()
        except VerificationError as e:
            logger.error(  # noqa: TRY400 - one line, no traceback for refused data
                "repository %s refused: %s", self.repo_dir, e.diagnostics()
            )
        except OtaguardError as e:
            # Retried every interval: say it again only when the failure changes.
            message = e.diagnostics()
            log = logger.debug if message == self._last_failure else logger.warning
            log("repository sync failed, will retry: %s", message)
            self._last_failure = message
            return
        except Exception:  # thread boundary: keep serving, record the bug
            logger.exception("unexpected error while syncing %s", self.repo_dir)
        self._last_failure = None
