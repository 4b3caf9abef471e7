"""The simulated fleet's verified view of the image repository and the director root.

Every simulated device was provisioned with the same trusted roots, so each would reach
the same verified state from the same server: the fleet keeps **one** view, refreshed
through python-tuf's :class:`TrustedMetadataSet` (root rotations, timestamp, snapshot,
targets: the checks ngclient runs, in memory instead of a metadata directory per
device), and the director root followed with the agent's
:func:`~otaguard.agent.director.follow_director_root`. A refresh goes over the
connection of a device that has just checked in (the server serves metadata only to a
recently checked-in certificate) and at most once per :data:`REFRESH_INTERVAL_S`, or at
once when the director names a target the view does not list yet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Final

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from otaguard.agent.device import DIRECTOR_ROOT_PATH
from otaguard.agent.director import follow_director_root
from otaguard.model.director import MAX_DIRECTOR_ROOT_BYTES
from otaguard.model.errors import DirectorMetadataError, TransportError, VerificationError
from otaguard.model.limits import MAX_ROOT_ROTATIONS
from otaguard.sim._http import AsyncConnection

__all__ = ["MAX_METADATA_BYTES", "REFRESH_INTERVAL_S", "RepositoryView"]

logger = logging.getLogger(__name__)

#: a fleet polls far more often than releases are published: once a second is fresh
#: enough, and a target the director names but the view lacks forces a refresh anyway
REFRESH_INTERVAL_S: Final = 1.0
#: one metadata file of the image repository; a simulated fleet's repository holds tens
#: of releases (a few KiB each); more is a hostile or broken server
MAX_METADATA_BYTES: Final = 4 * 1024 * 1024


class RepositoryView:
    """Verified image repository targets and director root, shared by the fleet."""

    def __init__(self, *, trusted_root: bytes, director_root: bytes) -> None:
        self._root = trusted_root
        self._director_trusted = director_root
        self._director: Root | None = None
        self._targets: dict[str, TargetFile] = {}
        self._refreshed = float("-inf")
        self._director_checked = float("-inf")
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def targets(self) -> dict[str, TargetFile]:
        """The verified image repository targets (empty before the first refresh)."""
        return dict(self._targets)

    def _lock(self) -> asyncio.Lock:
        """One refresh at a time, per event loop (a library user may run several)."""
        loop = asyncio.get_running_loop()
        if loop not in self._locks:
            self._locks = {loop: asyncio.Lock()}
        return self._locks[loop]

    def fresh(self, *, needs: str | None = None) -> bool:
        """Whether the image repository view is recent and lists ``needs``, if given."""
        if time.monotonic() - self._refreshed > REFRESH_INTERVAL_S:
            return False
        return needs is None or needs in self._targets

    async def ensure_director(self, conn: AsyncConnection) -> Root:
        """The director root, followed through ``conn`` (a device's) unless recently done.

        Raises:
            DirectorMetadataError: a rotation failed verification, or the root expired.
            TransportError: a root could not be fetched.
        """
        async with self._lock():
            stale = time.monotonic() - self._director_checked > REFRESH_INTERVAL_S
            if self._director is None or stale:
                await self._refresh_director(conn)
                self._director_checked = time.monotonic()
            assert self._director is not None  # noqa: S101 - set by the refresh or raised
            return self._director

    async def ensure_images(self, conn: AsyncConnection, *, needs: str | None = None) -> None:
        """Refresh the image repository view through ``conn`` unless another device just did.

        Raises:
            VerificationError: the image repository's metadata failed verification.
            TransportError: a file could not be fetched.
        """
        if self.fresh(needs=needs):
            return
        async with self._lock():
            if not self.fresh(needs=needs):
                await self._refresh(conn)

    async def _get(self, conn: AsyncConnection, path: str, *, max_body: int) -> bytes | None:
        status, data = await conn.request("GET", path, max_body=max_body)
        if status == 404:
            return None
        if status != 200:
            raise TransportError(f"GET {path}: server answered {status}")
        return data

    async def _refresh_director(self, conn: AsyncConnection) -> None:
        """Follow the director root with the agent's own (pure) check of each rotation."""
        fetched: dict[int, bytes] = {}
        try:
            version = Metadata[Root].from_bytes(self._director_trusted).signed.version
        except (DeserializationError, ValueError) as e:
            raise DirectorMetadataError("the trusted director root is not root metadata") from e
        for _ in range(MAX_ROOT_ROTATIONS):
            path = DIRECTOR_ROOT_PATH.format(version=version + 1)
            data = await self._get(conn, path, max_body=MAX_DIRECTOR_ROOT_BYTES + 1)
            if data is None:
                break
            version += 1
            fetched[version] = data
        self._director_trusted, self._director = follow_director_root(
            self._director_trusted, fetched.get, now=dt.datetime.now(dt.UTC)
        )

    async def _refresh(self, conn: AsyncConnection) -> None:
        # Then the image repository, as ngclient: root rotations, timestamp, snapshot,
        # targets, each verified against the previous.
        try:
            tms = TrustedMetadataSet(self._root, EnvelopeType.METADATA)
            for _ in range(MAX_ROOT_ROTATIONS):
                nxt = tms.root.version + 1
                data = await self._get(
                    conn, f"/metadata/{nxt}.root.json", max_body=MAX_METADATA_BYTES
                )
                if data is None:
                    break
                tms.update_root(data)
                self._root = data
            tms.update_timestamp(await self._need(conn, "timestamp.json"))
            snapshot = tms.timestamp.snapshot_meta.version
            tms.update_snapshot(await self._need(conn, self._name(tms, snapshot, "snapshot")))
            targets = tms.snapshot.meta["targets.json"].version
            tms.update_targets(await self._need(conn, self._name(tms, targets, "targets")))
        except (tuf_exc.RepositoryError, DeserializationError, KeyError, ValueError) as e:
            raise VerificationError(f"image repository metadata: {type(e).__name__}: {e}") from e
        self._targets = dict(tms.targets.targets)
        self._refreshed = time.monotonic()
        logger.debug("image repository view: targets version %d", tms.targets.version)

    @staticmethod
    def _name(tms: TrustedMetadataSet, version: int, role: str) -> str:
        return f"{version}.{role}.json" if tms.root.consistent_snapshot else f"{role}.json"

    async def _need(self, conn: AsyncConnection, name: str) -> bytes:
        data = await self._get(conn, f"/metadata/{name}", max_body=MAX_METADATA_BYTES)
        if data is None:
            raise TransportError(f"the server has no metadata/{name}")
        return data
