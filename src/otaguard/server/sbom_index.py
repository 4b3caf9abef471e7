"""The server's SBOM index: components of every published release, for "which devices run
a vulnerable X".

When a publication is served (publish API or repository sync), :meth:`SbomIndex.refresh`
indexes each image target of the newest targets metadata not indexed yet: it reads the
SBOM blob the image's signed ``custom`` binds, checks its length and SHA-256 against the
binding (the blob store is not trusted more than a mirror), parses it as CycloneDX and
stores its components (:mod:`otaguard.server.storage.sboms`). A query refreshes first, so
an index that missed a publication (a crash between publish and index) catches up.

The index is derived data: a release that cannot be indexed (blob missing, not the bound
bytes, not CycloneDX) is logged and skipped, never a reason to refuse a publication the
devices themselves accept or refuse by the signed hashes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tuf.api.metadata import Metadata, Targets
from tuf.api.serialization import DeserializationError

from otaguard.model.errors import OtaguardError, VerificationError
from otaguard.model.release import ReleaseInfo
from otaguard.model.sbom import MAX_SBOM_BYTES, parse_sbom
from otaguard.model.transfer import is_auxiliary_target
from otaguard.model.version import Version
from otaguard.server._names import blob_name
from otaguard.server.storage.base import BlobStore, MetadataStore
from otaguard.server.storage.sboms import ComponentHit, RunningDevice, SbomStore

__all__ = ["SbomIndex", "SbomMatches"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SbomMatches:
    """Releases containing a component, and the devices whose newest check-in runs one."""

    releases: list[ComponentHit]
    devices: list[RunningDevice]


class SbomIndex:
    """Indexes published releases' SBOMs and answers component queries."""

    def __init__(
        self,
        *,
        store: SbomStore,
        metadata: MetadataStore,
        blobs: BlobStore,
        clock: Callable[[], dt.datetime],
    ):
        """Index from ``metadata`` and ``blobs`` into ``store``."""
        self._store = store
        self._metadata = metadata
        self._blobs = blobs
        self._clock = clock
        self._lock = threading.Lock()
        self._seen_version = 0

    def _read_sbom(self, target: str, info: ReleaseInfo) -> bytes:
        ref = info.sbom
        assert ref is not None  # noqa: S101 - the caller skips releases without one
        path = self._blobs.local_path(blob_name(ref.sha256, ref.path))
        if path is None:
            raise VerificationError(f"the SBOM blob of {target} is not stored")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SBOM_BYTES + 1)
        except OSError as e:
            raise VerificationError(f"the SBOM blob of {target} is unreadable: {e.strerror}") from e
        if len(data) != ref.length or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise VerificationError(f"the stored SBOM of {target} is not the bytes it binds")
        return data

    def refresh(self) -> int:
        """Index the releases of the newest targets metadata not indexed yet.

        Returns:
            How many releases were indexed now.

        Raises:
            ServerStorageError: the database failed.
        """
        newest = self._metadata.newest(Targets.type)
        if newest is None:
            return 0
        with self._lock:
            if newest.version == self._seen_version:
                return 0
            try:
                targets = Metadata[Targets].from_bytes(newest.data).signed
            except (DeserializationError, ValueError):
                logger.warning("SBOM index: stored %s is unreadable", newest.filename)
                return 0
            done = self._store.indexed()
            added = 0
            for path, tf in targets.targets.items():
                if path in done or is_auxiliary_target(tf.custom):
                    continue
                try:
                    info = ReleaseInfo.from_custom(tf.custom)
                    if info.sbom is None:
                        continue  # published before SBOMs were required: nothing to index
                    sbom = parse_sbom(self._read_sbom(path, info))
                except OtaguardError as e:
                    logger.warning("SBOM index: %s skipped: %s", path, e.diagnostics())
                    continue
                added += self._store.add_release(
                    target=path,
                    version=str(info.version),
                    image_sha256=tf.hashes.get("sha256", ""),
                    sbom_sha256=sbom.sha256,
                    components=sbom.components,
                    now=self._clock(),
                )
            self._seen_version = newest.version
        if added:
            logger.info("SBOM index: indexed %d release(s)", added)
        return added

    def refresh_quietly(self) -> None:
        """:meth:`refresh` after a publication: a failure is logged, the next query retries."""
        try:
            self.refresh()
        except OtaguardError as e:
            logger.warning("SBOM index refresh failed, retried at the next query: %s", e)

    def find(self, query: str, *, version: str | None = None) -> SbomMatches:
        """Releases with a component whose purl or name is ``query`` (optionally at
        ``version``), newest release first, and the devices running them.

        Raises:
            ServerStorageError: the database failed.
        """
        self.refresh()
        hits = self._store.releases_with_component(query, version=version)

        def newest_first(h: ComponentHit) -> tuple[Version, str]:
            try:
                return Version.parse(h.release), h.target
            except ValueError:
                return Version.parse("0.0.0"), h.target

        hits.sort(key=newest_first, reverse=True)
        devices = self._store.devices_running(sorted({h.target for h in hits}))
        return SbomMatches(releases=hits, devices=devices)
