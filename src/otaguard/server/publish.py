"""Publishing a set of signed metadata files as one transaction.

Order of checks (each refusal leaves the served repository untouched):

1. Every name is a known metadata name and every file parses as the role its name says,
   with the version its name says (``timestamp.json`` is the only unversioned role
   accepted; ``root.json`` must equal the versioned root of the same version).
2. Every target listed in new targets metadata already has its blob in the
   :class:`BlobStore`, with the listed length (the sha256 is in the blob's name and was
   verified when the blob was stored).
3. The new timestamp does not roll back the served one, and the snapshot and targets it
   leads to are in this set or already stored, matching the lengths and hashes named.
4. The complete view (new files plus the stored files they refer to) passes
   :func:`otaguard.repo.verify.verify_published` against the newest stored root
   (signatures, thresholds, root chain, expiry).
5. All new rows and the timestamp pointer are written in ONE database transaction, so no
   device can see a timestamp naming a snapshot that is not yet served.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from otaguard.model.errors import VerificationError
from otaguard.repo.verify import verify_published
from otaguard.server._names import blob_name, parse_metadata_name
from otaguard.server.storage.base import (
    BlobStore,
    MetadataRecord,
    MetadataStore,
    PublishOutcome,
)

if TYPE_CHECKING:
    from otaguard.server.online import OnlineSigner

__all__ = [
    "MAX_METADATA_FILE_BYTES",
    "MAX_PUBLISH_FILES",
    "PUBLISHABLE_ROLES",
    "load_role",
    "publish_files",
]

logger = logging.getLogger(__name__)

# A targets file listing thousands of firmware images is a few MiB; more is not metadata.
MAX_METADATA_FILE_BYTES: Final = 16 * 1024 * 1024
# One publication carries the root history plus three current roles; bound the work.
MAX_PUBLISH_FILES: Final = 1100
# Delegated targets roles are not served yet; refusing them keeps the view complete.
PUBLISHABLE_ROLES: Final[dict[str, type[Signed]]] = {
    "root": Root,
    "targets": Targets,
    "snapshot": Snapshot,
}


@dataclass
class _Parsed:
    records: dict[str, MetadataRecord]
    signed: dict[str, Any]
    timestamp: Metadata[Timestamp] | None
    timestamp_record: MetadataRecord | None
    root_alias: bytes | None


def load_role(name: str, data: bytes, cls: type[Signed]) -> Metadata[Any]:
    """Parse ``data`` as metadata of role class ``cls``.

    Raises:
        VerificationError: the bytes are not TUF metadata of that role.
    """
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise VerificationError(f"{name} is not valid TUF metadata: {e}") from e
    if not isinstance(md.signed, cls):
        raise VerificationError(f"{name} is not {cls.type} metadata")
    return md


def _record(filename: str, role: str, version: int, data: bytes) -> MetadataRecord:
    return MetadataRecord(filename, role, version, data, hashlib.sha256(data).hexdigest())


def _parse(files: Mapping[str, bytes]) -> _Parsed:
    """Step 1: names, sizes, roles and versions."""
    if not files:
        raise VerificationError("nothing to publish")
    if len(files) > MAX_PUBLISH_FILES:
        raise VerificationError(f"too many files in one publication ({len(files)})")
    out = _Parsed({}, {}, None, None, None)
    for name, data in files.items():
        parsed = parse_metadata_name(name)
        if parsed is None:
            raise VerificationError(f"{name!r} is not a metadata file name")
        if len(data) > MAX_METADATA_FILE_BYTES:
            raise VerificationError(f"{name} exceeds {MAX_METADATA_FILE_BYTES} bytes")
        if parsed.role == Timestamp.type:
            if parsed.version is not None:
                raise VerificationError("timestamps are published as timestamp.json only")
            ts: Metadata[Timestamp] = load_role(name, data, Timestamp)
            out.timestamp = ts
            out.timestamp_record = _record(
                f"{ts.signed.version}.timestamp.json", Timestamp.type, ts.signed.version, data
            )
            continue
        if parsed.role not in PUBLISHABLE_ROLES:
            raise VerificationError(f"role {parsed.role!r} cannot be published")
        if parsed.version is None:
            if parsed.role != Root.type:
                raise VerificationError(f"{name} needs a version prefix (consistent snapshots)")
            out.root_alias = data
            continue
        md = load_role(name, data, PUBLISHABLE_ROLES[parsed.role])
        if md.signed.version != parsed.version:
            raise VerificationError(f"{name} carries version {md.signed.version}")
        out.records[name] = _record(name, parsed.role, parsed.version, data)
        out.signed[name] = md.signed
    return out


def _check_blobs(blobs: BlobStore, parsed: _Parsed) -> None:
    """Step 2: every target of new targets metadata is already stored."""
    for name, signed in parsed.signed.items():
        if not isinstance(signed, Targets):
            continue
        for path, target in signed.targets.items():
            sha = target.hashes.get("sha256")
            if sha is None:
                raise VerificationError(f"target {path} in {name} has no sha256 hash")
            bname = blob_name(sha, path)
            info = blobs.stat(bname)
            if info is None:
                raise VerificationError(f"target {path} has no uploaded blob {bname}")
            if info.length != target.length:
                raise VerificationError(
                    f"blob {bname} has {info.length} bytes, {name} says {target.length}"
                )


def _lookup(store: MetadataStore, parsed: _Parsed, name: str) -> bytes:
    if name in parsed.records:
        return parsed.records[name].data
    data = store.get(name)
    if data is None:
        raise VerificationError(f"{name} is neither in this publication nor already served")
    return data


def _pinned(meta: MetaFile, name: str, data: bytes, by: str) -> None:
    try:
        meta.verify_length_and_hashes(data)
    except LengthOrHashMismatchError as e:
        raise VerificationError(f"{name} does not match {by}: {e}") from e


def _complete_view(
    store: MetadataStore, parsed: _Parsed, current: MetadataRecord | None
) -> dict[str, bytes]:
    """Step 3: rollback check and the full file view the verifier needs."""
    view = {name: rec.data for name, rec in parsed.records.items()}
    ts = parsed.timestamp
    if ts is None:
        if current is None:
            raise VerificationError("the first publication needs a timestamp.json")
        ts = load_role("served timestamp", current.data, Timestamp)
        view["timestamp.json"] = current.data
    else:
        assert parsed.timestamp_record is not None  # noqa: S101 - set together in _parse
        view["timestamp.json"] = parsed.timestamp_record.data
        if current is not None and ts.signed.version < current.version:
            raise VerificationError(
                f"timestamp version {ts.signed.version} would roll back "
                f"the served version {current.version}"
            )
    snap_name = f"{ts.signed.snapshot_meta.version}.snapshot.json"
    snap_bytes = _lookup(store, parsed, snap_name)
    _pinned(ts.signed.snapshot_meta, snap_name, snap_bytes, "the timestamp")
    view[snap_name] = snap_bytes
    snapshot: Metadata[Snapshot] = load_role(snap_name, snap_bytes, Snapshot)
    for role_file, meta in snapshot.signed.meta.items():
        name = f"{meta.version}.{role_file}"
        data = _lookup(store, parsed, name)
        _pinned(meta, name, data, snap_name)
        view[name] = data
    if parsed.root_alias is not None:
        alias = load_role("root.json", parsed.root_alias, Root)
        versioned = f"{alias.signed.version}.root.json"
        if _lookup(store, parsed, versioned) != parsed.root_alias:
            raise VerificationError(f"root.json differs from {versioned}")
    return view


def _verify(view: Mapping[str, bytes], trusted_root: bytes | None, now: dt.datetime) -> None:
    """Step 4: signatures, thresholds, the root chain and expiry."""
    verify_published(view, trusted_root=trusted_root, now=now)


def publish_files(
    store: MetadataStore,
    blobs: BlobStore,
    metadata_files: Mapping[str, bytes],
    *,
    now: dt.datetime,
    online: OnlineSigner | None = None,
) -> PublishOutcome:
    """Verify a set of signed metadata files and serve them, atomically.

    Args:
        store: where metadata is served from.
        blobs: where target blobs must already be.
        metadata_files: file name (``2.root.json``, ``5.targets.json``,
            ``5.snapshot.json``, ``timestamp.json``) to the exact signed bytes.
            Files already served with identical bytes are accepted and skipped.
        now: reference time for expiry checks and the publication record.
        online: the server's online signer; a publication without a timestamp gets the
            snapshot and timestamp it produces (:mod:`otaguard.server.online`).

    Returns:
        What was added, what was already there and where the timestamp pointer moved.

    Raises:
        VerificationError: any check failed, a blob is missing, a versioned file exists
            with different bytes, or the timestamp would roll back; nothing was changed.
        ServerStorageError: the database failed; nothing was changed.
    """
    if online is not None and "timestamp.json" not in metadata_files:
        # The server signs snapshot and timestamp itself; its lock orders this with re-signing.
        with online.lock:
            completed = online.complete(store, metadata_files, now=now)
            return publish_files(store, blobs, completed, now=now)
    parsed = _parse(metadata_files)
    _check_blobs(blobs, parsed)
    current = store.current_timestamp()
    view = _complete_view(store, parsed, current)
    newest_root = store.newest(Root.type)
    # 1.root.json is trusted on first use, from the operator who owns the server.
    _verify(view, newest_root.data if newest_root is not None else None, now)

    records = list(parsed.records.values())
    ts_filename: str | None = None
    if parsed.timestamp_record is not None:
        records.append(parsed.timestamp_record)
        ts_filename = parsed.timestamp_record.filename
    outcome = store.publish(
        records,
        timestamp=ts_filename,
        now=now,
        expected_timestamp=current.filename if current is not None else None,
    )
    logger.info(
        "published %d new metadata files (%d unchanged)",
        len(outcome.added),
        len(outcome.unchanged),
    )
    return outcome
