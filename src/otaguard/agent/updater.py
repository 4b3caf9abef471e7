"""Metadata verification and image download through python-tuf's ngclient.

ngclient does the TUF client workflow (root rotation, rollback and freeze protection,
thresholds, expiry, mix-and-match, length caps). This module adds what otaguard needs on
top: choosing the image for this hardware, the anti-rollback checks against the running
image, and translation of tuf's exceptions into otaguard's.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from otaguard.agent.fetcher import Fetcher
from otaguard.agent.hybrid_gate import HybridGate, check_trusted_files
from otaguard.agent.monotonic import Floor
from otaguard.model.errors import (
    AccessDeniedError,
    DeviceStorageError,
    TransportError,
    VerificationError,
)
from otaguard.model.limits import MAX_ROOT_ROTATIONS, METADATA_MAX_LENGTHS
from otaguard.model.release import ReleaseInfo
from otaguard.model.transfer import is_auxiliary_target
from otaguard.model.version import Version

__all__ = [
    "Offer",
    "RepositoryUrls",
    "Selection",
    "TufSession",
    "select_update",
    "tuf_errors",
    "updater_config",
]

logger = logging.getLogger(__name__)


@contextmanager
def tuf_errors(action: str) -> Iterator[None]:
    """Translate python-tuf and OS exceptions raised inside the block."""
    try:
        yield
    except tuf_exc.DownloadLengthMismatchError as e:
        raise VerificationError(f"{action}: {e}") from e
    except tuf_exc.DownloadHTTPError as e:
        if e.status_code == HTTPStatus.FORBIDDEN:
            # The server names the reason in its answer and its log; the device learns
            # only that it is refused (quarantined, revoked, or an unknown certificate).
            raise AccessDeniedError(
                f"{action}: the server refused this device (HTTP 403: quarantined, revoked "
                "or certificate not issued to it)"
            ) from e
        raise TransportError(f"{action}: {e}") from e
    except tuf_exc.DownloadError as e:
        raise TransportError(f"{action}: {e}") from e
    except tuf_exc.RepositoryError as e:
        raise VerificationError(f"{action}: {type(e).__name__}: {e}") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            raise DeviceStorageError(f"{action}: {e.strerror}") from e
        raise


@dataclass(frozen=True)
class Offer:
    """A target from verified metadata that names this device's hardware."""

    target: TargetFile
    info: ReleaseInfo

    @property
    def path(self) -> str:
        """Target path in the repository."""
        return self.target.path

    @property
    def sha256(self) -> str:
        """Expected SHA-256 of the image."""
        return self.target.hashes["sha256"]


@dataclass
class Selection:
    """What to install, and what was offered but refused (attack indicators)."""

    chosen: Offer | None
    refused: list[tuple[str, str]] = field(default_factory=list)
    #: True when a refusal is a rollback attempt (older version or lower counter)
    downgrade: bool = False
    #: why nothing was chosen when nothing was refused either (for the operator)
    why_none: str = ""
    #: True when everything offered is older than what runs (and the floor is not the
    #: limit): the device is ahead of the repository, e.g. after a release was withdrawn.
    #: Not an attack by itself; a director that *names* such an image is (the caller decides).
    behind: bool = False


def select_update(
    offers: list[Offer],
    *,
    running: Version | None,
    floor: Floor,
    max_length: int,
    rejected: frozenset[str],
) -> Selection:
    """Pick the newest acceptable offer. Pure: every input is passed in.

    Acceptable: a version above both the running version and the anti-rollback floor's
    version (in recovery, ``running`` is ``None`` and a version *equal* to the floor is
    acceptable too: it re-installs what the device last committed), and a security
    counter not below the floor's. Offers older than that are ignored unless nothing at
    least as new is offered, which means the repository tries to move the device
    backwards: that is reported as refused (a downgrade attempt). Images in ``rejected``
    (sha256 of images that already failed on this device and were rolled back) are
    skipped, so a bad release does not loop install, fail, roll back on every poll.
    """
    sel = Selection(chosen=None)
    base = floor.version if running is None else max(running, floor.version)

    def new_enough(v: Version) -> bool:
        return v >= base if running is None else v > base

    for o in sorted(offers, key=lambda o: o.info.version, reverse=True):
        if not new_enough(o.info.version):
            continue
        if o.info.security_counter < floor.security_counter:
            sel.refused.append(
                (o.path, f"security counter {o.info.security_counter} < {floor.security_counter}")
            )
            sel.downgrade = True
            continue
        if o.sha256 in rejected:
            sel.refused.append((o.path, "rolled back on this device before"))
            continue
        if o.target.length > max_length:
            sel.refused.append((o.path, f"image of {o.target.length} bytes exceeds the slot"))
            continue
        if sel.chosen is None:
            sel.chosen = o
    if offers and not any(o.info.version >= base for o in offers):
        newest = max(offers, key=lambda o: o.info.version)
        if running is None or base > running:  # below the floor: only an attack offers that
            sel.refused.append(
                (newest.path, f"version {newest.info.version} < the anti-rollback floor {base}")
            )
            sel.downgrade = True
        else:
            sel.behind = True
            sel.why_none = (
                f"running {running} is ahead of the repository (newest offered: "
                f"{newest.info.version})"
            )
    return sel


def updater_config() -> UpdaterConfig:
    """The ngclient limits every device uses (the server's verifier applies the same)."""
    return UpdaterConfig(
        max_root_rotations=MAX_ROOT_ROTATIONS,
        root_max_length=METADATA_MAX_LENGTHS["root"],
        timestamp_max_length=METADATA_MAX_LENGTHS["timestamp"],
        snapshot_max_length=METADATA_MAX_LENGTHS["snapshot"],
        targets_max_length=METADATA_MAX_LENGTHS["targets"],
    )


@dataclass(frozen=True)
class RepositoryUrls:
    """Where a repository serves its metadata and its targets (each ends with ``/``)."""

    metadata: str
    targets: str

    def __post_init__(self) -> None:
        # ngclient joins file names to these prefixes; a missing slash names other files.
        for name in ("metadata", "targets"):
            if not getattr(self, name).endswith("/"):
                object.__setattr__(self, name, getattr(self, name) + "/")

    @classmethod
    def of_server(cls, server_url: str) -> RepositoryUrls:
        """An otaguard server's layout: ``/metadata/`` and ``/targets/`` under its URL."""
        base = server_url.rstrip("/")
        return cls(metadata=f"{base}/metadata/", targets=f"{base}/targets/")


class TufSession:
    """One update session against the image repository (one ngclient ``Updater``).

    Args:
        metadata_dir: ngclient's metadata cache (what the device trusts).
        trusted_root: the provisioned root: ngclient's bootstrap, whatever the cache holds.
        server_url: an otaguard server's URL, or the two base URLs of any TUF repository
            (``otaguard-conformance``).
        fetcher: the network seam (:class:`~otaguard.agent.fetcher.TlsFetcher`).
    """

    def __init__(
        self,
        *,
        metadata_dir: Path,
        trusted_root: bytes,
        server_url: str | RepositoryUrls,
        fetcher: Fetcher,
    ):
        self._metadata_dir = metadata_dir
        self.fetcher = fetcher
        urls = (
            server_url
            if isinstance(server_url, RepositoryUrls)
            else RepositoryUrls.of_server(server_url)
        )
        self._target_base_url = urls.targets
        config = updater_config()
        with tuf_errors("loading trusted metadata"):
            # ngclient sees metadata only through the hybrid policy check (ADR 0014).
            gate = HybridGate(
                fetcher,
                metadata_base_url=urls.metadata,
                metadata_dir=metadata_dir,
                trusted_root=trusted_root,
            )
            self._updater = Updater(
                metadata_dir=str(metadata_dir),
                metadata_base_url=urls.metadata,
                target_base_url=urls.targets,
                fetcher=gate,
                config=config,
                bootstrap=trusted_root,
            )

    def refresh(self) -> None:
        """Run the TUF client workflow: root, timestamp, snapshot, targets.

        Raises:
            VerificationError: metadata is forged, rolled back, expired or mismatched;
                :class:`HybridPolicyError` when a role root marks hybrid lacks a valid
                classical or ML-DSA signature.
            TransportError: the server could not be reached.
        """
        with tuf_errors("metadata refresh"):
            self._updater.refresh()
        # What ngclient took from its cache never passed the gate.
        check_trusted_files(self._metadata_dir)

    def offers(self, hardware_id: str) -> tuple[list[Offer], list[tuple[str, str]]]:
        """Targets for ``hardware_id`` from the freshly verified top-level targets.

        Returns the offers and the targets skipped for malformed custom fields.
        """
        # ngclient only caches metadata that verified; the cached targets.json is the one
        # refresh() just accepted. Each candidate is then re-read through get_targetinfo().
        listing = Metadata[Targets].from_file(str(self._metadata_dir / "targets.json"))
        offers: list[Offer] = []
        bad: list[tuple[str, str]] = []
        for path in listing.signed.targets:
            with tuf_errors(f"looking up {path}"):
                target = self._updater.get_targetinfo(path)
            if target is None or is_auxiliary_target(target.custom):
                continue  # an SBOM is fetched with the image whose custom binds it
            try:
                info = ReleaseInfo.from_custom(target.custom)
            except VerificationError as e:
                bad.append((path, str(e)))
                continue
            if hardware_id in info.hardware_ids:
                offers.append(Offer(target, info))
        return offers, bad

    def download(self, target: TargetFile, dest: Path) -> Path:
        """Download ``target`` to ``dest``, verifying length and hashes as python-tuf does.

        Raises:
            VerificationError: wrong length or hash (tampered or truncated image).
            TransportError: network failure or deadline exceeded.
            DeviceStorageError: the staging area is full or unwritable.
        """
        with tuf_errors(f"download of {target.path}"):
            return Path(self._updater.download_target(target, str(dest)))

    def is_cached(self, target: TargetFile, path: Path) -> bool:
        """True when ``path`` holds ``target`` already (its length and hashes match)."""
        return self._updater.find_cached_target(target, str(path)) is not None

    def target_url(self, target: TargetFile) -> str:
        """The URL ngclient's ``download_target`` would fetch ``target`` from.

        Consistent snapshots name a target blob ``<first hash>.<name>``, as ngclient does
        with ``prefix_targets_with_hash`` (the default).
        """
        path = target.path
        # refresh() accepted and cached this root (ngclient caches only what verified).
        root = Metadata[Root].from_file(str(self._metadata_dir / "root.json"))
        if root.signed.consistent_snapshot and self._updater.config.prefix_targets_with_hash:
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{next(iter(target.hashes.values()))}.{basename}"
        return f"{self._target_base_url}{path}"

    def find_target(self, path: str) -> TargetFile | None:
        """Look up ``path`` in verified metadata."""
        with tuf_errors(f"looking up {path}"):
            return self._updater.get_targetinfo(path)
