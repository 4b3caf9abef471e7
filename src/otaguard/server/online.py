"""The server's online roles: it signs snapshot and timestamp itself and keeps them fresh.

TUF splits trust by role. Root and targets are signed offline (hybrid keys, threshold 2)
and decide *what* a device may install; snapshot and timestamp only say what is *current*
and expire quickly, so their key must be online. That key belongs to the server, and it
is the only key the server ever holds:

* :func:`ensure_online_key` creates it on first start (Ed25519, ``DATA/online-key.pem``,
  mode 0600 in the 0700 data directory, loaded through a ``file2:`` URI) and writes its
  public half to ``DATA/online-key.pub.json`` for ``otaguard repo init --online-key``.
* :meth:`OnlineSigner.complete` finishes a publication that brings new root or targets
  metadata but no timestamp (the hook in :func:`~otaguard.server.publish.publish_files`):
  the next snapshot names the new targets version, the next timestamp pins the
  snapshot's length and sha256.
* :class:`ResignLoop` re-signs the timestamp (same snapshot) when less than half of its
  lifetime is left, and the snapshot (with a timestamp) likewise.

The builders (:func:`snapshot_for_targets`, :func:`refreshed`) are pure: the served
records in, signed bytes out. The server signs only while the newest root names its key
as the one snapshot and timestamp key; for any other repository (a self-contained
local-mode one) it serves the signed bytes as they are.
"""

from __future__ import annotations

import datetime as dt
import logging
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from securesystemslib.signer import CryptoSigner, Key, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Timestamp

from otaguard._fs import atomic_write_bytes
from otaguard.crypto.hsm import hsm_public_key, is_hsm_uri
from otaguard.crypto.signers import (
    PLAINTEXT_FILE_SCHEME,
    load_signer,
    read_public_key,
    write_public_key,
)
from otaguard.model.errors import ConfigError, ConflictError, OtaguardError, VerificationError
from otaguard.model.unsafe import Unsafe
from otaguard.repo.verify import load_role
from otaguard.server._names import parse_metadata_name
from otaguard.server._periodic import PeriodicTask
from otaguard.server.publish import conflict_if_moved, publish_files
from otaguard.server.storage.base import BlobStore, MetadataStore

__all__ = [
    "ONLINE_KEY_FILE",
    "ONLINE_PUBLIC_KEY_FILE",
    "OnlineKeyFiles",
    "OnlineLifetimes",
    "OnlineSigner",
    "ResignLoop",
    "Served",
    "ensure_online_key",
    "load_online_signer",
    "refreshed",
    "snapshot_for_targets",
]

logger = logging.getLogger(__name__)

ONLINE_KEY_FILE: Final = "online-key.pem"
ONLINE_PUBLIC_KEY_FILE: Final = "online-key.pub.json"
# The loop looks at the served metadata eight times per shortest lifetime, so a re-sign
# due at half-life happens with at least 3/8 of the lifetime left (slack for a slow
# tick); never busier than this (tests use lifetimes of seconds) ...
CHECKS_PER_LIFETIME: Final = 8
MIN_CHECK_SECONDS: Final = 0.2
# ... and never lazier than this (a clock jump or a failed attempt is retried soon).
MAX_CHECK_SECONDS: Final = 60.0

_S = TypeVar("_S", Root, Timestamp, Snapshot)


@dataclass(frozen=True)
class OnlineLifetimes:
    """How long a server-signed timestamp and snapshot stay valid."""

    timestamp: dt.timedelta
    snapshot: dt.timedelta


@dataclass(frozen=True)
class OnlineKeyFiles:
    """The server's online key in its data directory.

    Attributes:
        private_key: ``DATA/online-key.pem`` (unencrypted PKCS#8, mode 0600).
        public_key_file: ``DATA/online-key.pub.json`` (TUF key JSON with its keyid).
        public_key: the public key.
    """

    private_key: Path
    public_key_file: Path
    public_key: Key

    @property
    def uri(self) -> str:
        """The ``file2:`` signer URI of the private key."""
        return f"{PLAINTEXT_FILE_SCHEME}:{self.private_key.absolute()}"


def ensure_online_key(
    data_dir: Path,
    *,
    private_name: str = ONLINE_KEY_FILE,
    public_name: str = ONLINE_PUBLIC_KEY_FILE,
) -> OnlineKeyFiles:
    """Return the server's online key files, creating the key on first use.

    Args:
        data_dir: the server's data directory.
        private_name: file name of the private key (the director's key has its own).
        public_name: file name of its public half.

    Raises:
        ConfigError: the key file is readable by other users, or a file is unusable.
    """
    data_dir = Path(data_dir)
    private, public = data_dir / private_name, data_dir / public_name
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not private.exists():
            signer = CryptoSigner.generate_ed25519()
            atomic_write_bytes(private, signer.private_bytes, mode=0o600)
            write_public_key(public, signer.public_key)
            logger.info("created the server's online key %s", private)
        mode = private.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot create the online key in {data_dir}: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{private} is accessible by other users; chmod 600 it")
    if data_dir.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("data directory %s is accessible by other users; chmod 700 it", data_dir)
    if not public.exists():
        raise ConfigError(f"{public} is missing; restore it or remove {private} to start anew")
    return OnlineKeyFiles(private, public, read_public_key(public))


def load_online_signer(
    data_dir: Path,
    *,
    uri: str | None = None,
    private_name: str = ONLINE_KEY_FILE,
    public_name: str = ONLINE_PUBLIC_KEY_FILE,
    name: str = "online",
    what: str = "online (snapshot/timestamp)",
    pin: str | None = None,
) -> Signer:
    """Load one of the server's online signers (by default the snapshot/timestamp key).

    Args:
        data_dir: the server's data directory.
        uri: a signer URI (e.g. an HSM's) whose public key is ``DATA/<public_name>``;
            ``None`` uses (and on first start creates) the file key in the data directory,
            with a warning that production keys belong in an HSM.
        private_name: file name of the file key (the director key has its own).
        public_name: file name of its public half.
        name: the key's name (passphrase prompts, messages).
        what: what the key signs, for the warning.
        pin: the token's user PIN when ``uri`` is an ``hsm:`` key.

    Raises:
        ConfigError: the key is unusable or does not match its public key file.
        KeyAccessError: the key needs a secret the server cannot give.
    """
    if uri is not None:
        public_path = Path(data_dir) / public_name
        if is_hsm_uri(uri) and not public_path.exists():
            # first start with a token key: its public half comes from the token, once
            write_public_key(public_path, hsm_public_key(uri))
        public = read_public_key(public_path)
        secrets = None if pin is None else (lambda _name: pin.encode())
        return load_signer(uri, public, name=name, secrets=secrets)
    files = ensure_online_key(data_dir, private_name=private_name, public_name=public_name)
    return load_signer(
        files.uri,
        files.public_key,
        name=name,
        secrets=Unsafe.PLAINTEXT_KEYS,
        plaintext_warning=(
            f"the server's {what} key {files.private_key} is an "
            "unencrypted file; production should keep it in an HSM"
        ),
    )


# -- pure builders ---------------------------------------------------------------------------
def _expiry(now: dt.datetime, lifetime: dt.timedelta) -> dt.datetime:
    """``now + lifetime``, rounded up to the second TUF metadata can express."""
    at = now + lifetime
    return at.replace(microsecond=0) + (
        dt.timedelta(seconds=1) if at.microsecond else dt.timedelta()
    )


def _due(expires: dt.datetime, lifetime: dt.timedelta, now: dt.datetime) -> bool:
    """True when less than half of ``lifetime`` is left before ``expires``."""
    return expires - now < lifetime / 2


@dataclass(frozen=True)
class Served:
    """What the server serves now, as the builders need it.

    Attributes:
        timestamp: bytes of the served timestamp (``None`` before the first publication).
        snapshot: bytes of the snapshot that timestamp names.
        newest_timestamp_version: highest timestamp version stored (never reused).
        newest_snapshot_version: highest snapshot version stored (never reused).
    """

    timestamp: bytes | None
    snapshot: bytes | None
    newest_timestamp_version: int
    newest_snapshot_version: int

    @classmethod
    def from_store(cls, store: MetadataStore) -> Served:
        """Read the served records from ``store``."""
        ts_rec = store.current_timestamp()
        snapshot: bytes | None = None
        if ts_rec is not None:
            ts = load_role(ts_rec.filename, ts_rec.data, Timestamp)
            snapshot = store.get(f"{ts.signed.snapshot_meta.version}.snapshot.json")
        newest_ts, newest_snap = store.newest(Timestamp.type), store.newest(Snapshot.type)
        return cls(
            ts_rec.data if ts_rec is not None else None,
            snapshot,
            newest_ts.version if newest_ts is not None else 0,
            newest_snap.version if newest_snap is not None else 0,
        )

    def targets_version(self) -> int | None:
        """Version of targets the served snapshot names, ``None`` before the first one."""
        if self.snapshot is None:
            return None
        meta = load_role("served snapshot", self.snapshot, Snapshot).signed.meta.get("targets.json")
        return meta.version if meta is not None else None


def _sign(md: Metadata[Any], signer: Signer) -> bytes:
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes()


def _timestamp(
    served: Served,
    snapshot_version: int,
    snapshot_bytes: bytes,
    *,
    signer: Signer,
    expires: dt.datetime,
) -> bytes:
    ts = Timestamp(
        version=served.newest_timestamp_version + 1,
        expires=expires,
        # Length and hash pin the exact snapshot bytes, not just its version.
        snapshot_meta=MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"]),
    )
    return _sign(Metadata(ts), signer)


def _snapshot_and_timestamp(
    served: Served,
    meta: dict[str, MetaFile],
    *,
    signer: Signer,
    now: dt.datetime,
    lifetimes: OnlineLifetimes,
) -> dict[str, bytes]:
    served_version = 0
    if served.snapshot is not None:
        served_version = load_role("served snapshot", served.snapshot, Snapshot).signed.version
    version = max(served.newest_snapshot_version, served_version) + 1
    snap = Snapshot(version=version, expires=_expiry(now, lifetimes.snapshot), meta=meta)
    snap_bytes = _sign(Metadata(snap), signer)
    ts_bytes = _timestamp(
        served, version, snap_bytes, signer=signer, expires=_expiry(now, lifetimes.timestamp)
    )
    return {f"{version}.snapshot.json": snap_bytes, "timestamp.json": ts_bytes}


def snapshot_for_targets(
    served: Served,
    targets_version: int,
    *,
    signer: Signer,
    now: dt.datetime,
    lifetimes: OnlineLifetimes,
) -> dict[str, bytes]:
    """Sign the next snapshot naming ``targets_version`` and the next timestamp.

    Returns:
        ``{"N.snapshot.json": ..., "timestamp.json": ...}``, versions one above the
        highest stored.

    Raises:
        VerificationError: ``targets_version`` is below the served one (the server never
            signs a rollback).
    """
    current = served.targets_version()
    if current is not None and targets_version < current:
        raise VerificationError(
            f"targets version {targets_version} is older than the served version {current}; "
            "the server does not sign a rollback"
        )
    meta: dict[str, MetaFile] = {}
    if served.snapshot is not None:
        meta = dict(load_role("served snapshot", served.snapshot, Snapshot).signed.meta)
    meta["targets.json"] = MetaFile(version=targets_version)
    return _snapshot_and_timestamp(served, meta, signer=signer, now=now, lifetimes=lifetimes)


def refreshed(
    served: Served, *, signer: Signer, now: dt.datetime, lifetimes: OnlineLifetimes
) -> dict[str, bytes]:
    """Re-sign what is due: nothing, the timestamp, or the snapshot and a timestamp.

    A role is due when less than half of its lifetime is left. A new snapshot keeps the
    served snapshot's content; a new timestamp names the same snapshot.

    Returns:
        The files to publish (``{}`` when nothing is due or nothing is served yet).
    """
    if served.timestamp is None or served.snapshot is None:
        return {}
    snap = load_role("served snapshot", served.snapshot, Snapshot)
    if _due(snap.signed.expires, lifetimes.snapshot, now):
        return _snapshot_and_timestamp(
            served, dict(snap.signed.meta), signer=signer, now=now, lifetimes=lifetimes
        )
    ts = load_role("served timestamp", served.timestamp, Timestamp)
    if _due(ts.signed.expires, lifetimes.timestamp, now):
        return {
            "timestamp.json": _timestamp(
                served,
                snap.signed.version,
                served.snapshot,
                signer=signer,
                expires=_expiry(now, lifetimes.timestamp),
            )
        }
    return {}


# -- the signer the server uses --------------------------------------------------------------
def _versions(files: Mapping[str, bytes], role: str) -> list[int]:
    out = []
    for name in files:
        parsed = parse_metadata_name(name)
        if parsed is not None and parsed.role == role and parsed.version is not None:
            out.append(parsed.version)
    return out


class OnlineSigner:
    """The server's snapshot and timestamp signing, with one lock for every publication.

    The lock orders publications that need new online metadata with the re-signing loop,
    so neither builds on a timestamp the other is replacing.
    """

    def __init__(self, signer: Signer, *, lifetimes: OnlineLifetimes):
        """Use ``signer`` (the online key) with the given lifetimes."""
        self._signer = signer
        self.lifetimes = lifetimes
        self.lock = threading.RLock()

    @property
    def keyid(self) -> str:
        """Key id of the online key."""
        return self._signer.public_key.keyid

    def signs_for(self, root: Root) -> bool:
        """True when ``root`` names this key as the one snapshot and timestamp key."""
        for role in (Snapshot.type, Timestamp.type):
            r = root.roles.get(role)
            if r is None or r.threshold != 1 or self.keyid not in r.keyids:
                return False
        return True

    def _newest_root(self, store: MetadataStore, files: Mapping[str, bytes]) -> Root | None:
        stored = store.newest(Root.type)
        versions = _versions(files, Root.type)
        if versions and (stored is None or max(versions) > stored.version):
            name = f"{max(versions)}.root.json"
            return load_role(name, files[name], Root).signed
        return load_role(stored.filename, stored.data, Root).signed if stored is not None else None

    def complete(
        self, store: MetadataStore, files: Mapping[str, bytes], *, now: dt.datetime
    ) -> dict[str, bytes]:
        """Add the snapshot and timestamp a publication without a timestamp needs.

        Unchanged when the publication has a timestamp, when the newest root (of the
        publication or the store) does not name this key, or when its newest targets
        version is already served. Call it holding :attr:`lock`.

        Raises:
            VerificationError: the publication's targets are older than the served ones.
        """
        out = dict(files)
        if "timestamp.json" in files:
            return out
        root = self._newest_root(store, files)
        if root is None or not self.signs_for(root):
            return out
        versions = _versions(files, "targets")
        served = Served.from_store(store)
        # A new root naming this key where the served one named another: the online key
        # was rotated (ADR 0014); what is served was signed by the old key, so sign the
        # served targets version anew even though targets did not change.
        stored = store.newest(Root.type)
        rotated = stored is not None and not self.signs_for(
            load_role(stored.filename, stored.data, Root).signed
        )
        version = max(versions) if versions else served.targets_version()
        if version is None or (version == served.targets_version() and not rotated):
            return out
        out.update(
            snapshot_for_targets(
                served, version, signer=self._signer, now=now, lifetimes=self.lifetimes
            )
        )
        logger.info("signed snapshot and timestamp for targets version %d", version)
        return out

    def refresh(self, store: MetadataStore, *, now: dt.datetime) -> dict[str, bytes]:
        """What to publish to keep the served online metadata fresh (``{}``: nothing).

        Call it holding :attr:`lock`.
        """
        root = store.newest(Root.type)
        if root is None or not self.signs_for(load_role(root.filename, root.data, Root).signed):
            return {}
        return refreshed(
            Served.from_store(store), signer=self._signer, now=now, lifetimes=self.lifetimes
        )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ResignLoop(PeriodicTask):
    """Re-signs the served timestamp and snapshot before they expire, in a thread."""

    def __init__(
        self,
        online: OnlineSigner,
        *,
        store: MetadataStore,
        blobs: BlobStore,
        clock: Callable[[], dt.datetime] = _utcnow,
        interval: float | None = None,
    ):
        """Prepare (but do not start) the loop.

        Args:
            online: the server's online signer.
            store: metadata store to read and publish into.
            blobs: blob store (publications are verified against it).
            clock: reference time.
            interval: seconds between checks; default an eighth of the shortest
                lifetime, within [:data:`MIN_CHECK_SECONDS`, :data:`MAX_CHECK_SECONDS`].
        """
        shortest = min(online.lifetimes.timestamp, online.lifetimes.snapshot).total_seconds()
        super().__init__(
            interval=interval
            if interval is not None
            else min(MAX_CHECK_SECONDS, max(MIN_CHECK_SECONDS, shortest / CHECKS_PER_LIFETIME)),
            name="otaguard-resign",
        )
        self._online = online
        self._store = store
        self._blobs = blobs
        self._clock = clock

    def resign_once(self) -> tuple[str, ...]:
        """Re-sign and publish what is due now.

        Returns:
            The metadata files newly served (empty when nothing was due).

        Raises:
            VerificationError: the result did not verify (e.g. targets expired offline).
            ServerStorageError: the store failed.
        """
        with self._online.lock:
            now = self._clock()
            current = self._store.current_timestamp()
            files = self._online.refresh(self._store, now=now)
            if not files:
                return ()
            try:
                with conflict_if_moved(self._store, current.filename if current else None):
                    outcome = publish_files(self._store, self._blobs, files, now=now)
            except ConflictError:
                # Another server process on the same database re-signed first; what it
                # serves is fresh, and the next tick re-checks.
                logger.info("another server process re-signed first")
                return ()
        logger.info("re-signed %s", ", ".join(outcome.added))
        return outcome.added

    def _tick(self) -> None:
        try:
            self.resign_once()
        except OtaguardError as e:
            logger.error("re-signing online metadata failed: %s", e.diagnostics())  # noqa: TRY400 - one line, no traceback
        except Exception:  # thread boundary: keep serving, record the bug
            logger.exception("unexpected error while re-signing online metadata")
