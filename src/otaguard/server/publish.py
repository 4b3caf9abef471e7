"""Publishing a set of signed metadata files as one transaction.

The server accepts a publication only if devices will: it runs python-tuf's client
workflow (:func:`otaguard.repo.verify.verify_update`) on exactly what it would then
serve, as two simulated devices. Order of checks (each refusal leaves the served
repository untouched):

1. Structure: every name is a known metadata name within the size cap, every file parses
   as the role its name says with the version its name says (``timestamp.json`` is the
   only unversioned role accepted; ``root.json`` must equal the versioned root of the
   same version).
2. Versioned files are immutable: one already served must be byte-identical.
3. Every target listed in new targets metadata already has its blob in the
   :class:`BlobStore`, with the listed length (the sha256 is in the blob's name and was
   verified when the blob was stored).
4. The candidate view (what is served now overlaid with this publication, served the
   way the server serves it) is fetched by two simulated devices, and both must accept:

   a. a device fresh from the factory: it trusts only ``1.root.json`` as served (on the
      first publication: this publication's ``1.root.json``, trusted on first use from
      the operator who owns the server) and has no cache;
   b. a device up to date with what is served now: it trusts the newest served root and
      its cache holds the served timestamp, snapshot and targets, so every rollback
      check of the workflow applies against what devices already trust.

5. Every new file is one the fresh device fetched: nothing is stored that no device
   would ever verify (an unreachable versioned file would otherwise block its name).
6. All new rows and the timestamp pointer are written in ONE database transaction that
   is refused (:class:`ConflictError`) if another publication moved the pointer since
   step 4, so no device can see a timestamp naming a snapshot that is not yet served.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from tuf.api.metadata import Metadata, Root, Signed, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from otaguard.model.errors import ConflictError, VerificationError
from otaguard.repo.verify import VerifiedRepository, load_role, verify_update
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
    "conflict_if_moved",
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
TIMESTAMP_FILE: Final = "timestamp.json"
FIRST_ROOT: Final = "1.root.json"


@dataclass
class _Parsed:
    records: dict[str, MetadataRecord] = field(default_factory=dict)
    signed: dict[str, Any] = field(default_factory=dict)
    timestamp_record: MetadataRecord | None = None
    root_alias: bytes | None = None


def _record(filename: str, role: str, version: int, data: bytes) -> MetadataRecord:
    return MetadataRecord(filename, role, version, data, hashlib.sha256(data).hexdigest())


def _parse(files: Mapping[str, bytes]) -> _Parsed:
    """Step 1: names, sizes, roles and versions."""
    if not files:
        raise VerificationError("nothing to publish")
    if len(files) > MAX_PUBLISH_FILES:
        raise VerificationError(f"too many files in one publication ({len(files)})")
    out = _Parsed()
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
            version = ts.signed.version
            out.timestamp_record = _record(
                f"{version}.timestamp.json", Timestamp.type, version, data
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


def _all_records(parsed: _Parsed) -> list[MetadataRecord]:
    records = list(parsed.records.values())
    if parsed.timestamp_record is not None:
        records.append(parsed.timestamp_record)
    return records


def _new_records(store: MetadataStore, parsed: _Parsed) -> list[MetadataRecord]:
    """Step 2: versioned files are immutable; return the records not yet served."""
    new: list[MetadataRecord] = []
    for rec in _all_records(parsed):
        served = store.get(rec.filename)
        if served is None:
            new.append(rec)
        elif served != rec.data:
            raise VerificationError(
                f"{rec.filename} is already published with different content; "
                "versioned metadata is immutable"
            )
    return new


def _check_root_alias(store: MetadataStore, parsed: _Parsed) -> None:
    """Step 1: ``root.json`` is only an alias of the versioned root of its version."""
    if parsed.root_alias is None:
        return
    alias = load_role("root.json", parsed.root_alias, Root)
    versioned = f"{alias.signed.version}.root.json"
    rec = parsed.records.get(versioned)
    data = rec.data if rec is not None else store.get(versioned)
    if data != parsed.root_alias:
        raise VerificationError(f"root.json differs from {versioned}")


def _check_blobs(blobs: BlobStore, parsed: _Parsed) -> None:
    """Step 3: every target of new targets metadata is already stored."""
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


class _CandidateView:
    """What devices would be served after the publication, by the names they fetch.

    ``timestamp.json`` is the new timestamp (or the served one when the publication has
    none); versioned names come from the publication, else from the database.
    """

    def __init__(
        self, store: MetadataStore, parsed: _Parsed, current: MetadataRecord | None
    ) -> None:
        self._store = store
        self._parsed = parsed
        self._current = current

    def get(self, name: str, /) -> bytes | None:
        if name == TIMESTAMP_FILE:
            rec = self._parsed.timestamp_record or self._current
            return rec.data if rec is not None else None
        if name in self._parsed.records:
            return self._parsed.records[name].data
        parsed_name = parse_metadata_name(name)
        if parsed_name is None or parsed_name.version is None:
            return None  # the server serves no other unversioned name the walk asks for
        return self._store.get(name)


def _parse_quietly(data: bytes) -> Signed | None:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError:
        return None
    signed: Signed = md.signed
    return signed


def _served_cache(store: MetadataStore, current: MetadataRecord) -> dict[str, bytes]:
    """The metadata cache of a device that is up to date with what is served now.

    A file collector, not a verifier: it follows the names the served timestamp and
    snapshot give, as a device's ngclient cache holds those files, and verifies nothing;
    :func:`verify_update` loads the cache exactly as ngclient does (an entry that does not
    verify is ignored there). An entry that does not even parse ends the collection.
    """
    cache = {TIMESTAMP_FILE: current.data}
    ts = _parse_quietly(current.data)
    if not isinstance(ts, Timestamp):
        return cache
    snap_data = store.get(f"{ts.snapshot_meta.version}.snapshot.json")
    snapshot = _parse_quietly(snap_data) if snap_data is not None else None
    if snap_data is None or not isinstance(snapshot, Snapshot):
        return cache
    cache["snapshot.json"] = snap_data
    targets_meta = snapshot.meta.get("targets.json")
    targets_data = store.get(f"{targets_meta.version}.targets.json") if targets_meta else None
    if targets_data is not None:
        cache["targets.json"] = targets_data
    return cache


def _verify_as_devices(
    store: MetadataStore, parsed: _Parsed, current: MetadataRecord | None, now: dt.datetime
) -> VerifiedRepository:
    """Step 4: both simulated devices fetch the candidate view; both must accept it."""
    view = _CandidateView(store, parsed, current)
    factory_root = store.get(FIRST_ROOT)
    if factory_root is None:
        first = parsed.records.get(FIRST_ROOT)
        if first is None:
            raise VerificationError(f"the first publication needs {FIRST_ROOT}")
        factory_root = first.data
    try:
        fresh = verify_update(trusted_root=factory_root, cached=None, remote=view, now=now)
    except VerificationError as e:
        raise VerificationError(
            f"a device fresh from the factory would refuse this publication: {e}"
        ) from e
    newest_root = store.newest(Root.type)
    if current is not None and newest_root is not None:
        try:
            verify_update(
                trusted_root=newest_root.data,
                cached=_served_cache(store, current),
                remote=view,
                now=now,
            )
        except VerificationError as e:
            raise VerificationError(
                f"a device up to date with the served repository would refuse this publication: {e}"
            ) from e
    return fresh


def _check_reachable(new: list[MetadataRecord], fresh: VerifiedRepository) -> None:
    """Step 5: nothing new is stored that no device would fetch and verify."""
    for rec in new:
        name = TIMESTAMP_FILE if rec.role == Timestamp.type else rec.filename
        if name not in fresh.fetched and rec.filename != FIRST_ROOT:
            raise VerificationError(
                f"{rec.filename} is not reached from the published timestamp or the root "
                "chain, so no device would fetch it"
            )


def _pointer(store: MetadataStore) -> str | None:
    current = store.current_timestamp()
    return current.filename if current is not None else None


@contextmanager
def conflict_if_moved(store: MetadataStore, based_on: str | None) -> Iterator[None]:
    """Turn a refusal into a :class:`ConflictError` when the served timestamp moved.

    Several server processes on one database sign and publish the same next versions at
    the same moment (re-signing at half-life, following one repository). The one that
    loses finds the winner's ``N.snapshot.json`` stored with other bytes: that is a race
    lost, not a publication to refuse. A refusal computed against a served state that has
    changed since (``based_on``: the timestamp filename read before signing) is therefore
    a conflict: retrying re-verifies against what is served now.

    Raises:
        ConflictError: the body refused and the served timestamp is no longer ``based_on``.
    """
    try:
        yield
    except VerificationError as e:
        if _pointer(store) != based_on:
            raise ConflictError(
                "another publication changed the repository meanwhile; retry"
            ) from e
        raise


def publish_files(
    store: MetadataStore,
    blobs: BlobStore,
    metadata_files: Mapping[str, bytes],
    *,
    now: dt.datetime,
    online: OnlineSigner | None = None,
) -> PublishOutcome:
    """Verify a set of signed metadata files as devices would, and serve them atomically.

    Args:
        store: where metadata is served from.
        blobs: where target blobs must already be.
        metadata_files: file name (``2.root.json``, ``5.targets.json``,
            ``5.snapshot.json``, ``timestamp.json``) to the exact signed bytes.
            Files already served with identical bytes are accepted and skipped.
        now: reference time for every expiry check and the publication record.
        online: the server's online signer; a publication without a timestamp gets the
            snapshot and timestamp it produces (:mod:`otaguard.server.online`).

    Returns:
        What was added, what was already there and where the timestamp pointer moved.

    Raises:
        VerificationError: a device would refuse the result, a blob is missing, a
            versioned file exists with different bytes, or a file is malformed or
            unreachable; the message names the cause. Nothing was changed.
        ConflictError: another publication changed the repository meanwhile; nothing
            was changed, retrying is safe.
        ServerStorageError: the database failed; nothing was changed.
    """
    if online is not None and "timestamp.json" not in metadata_files:
        # The server signs snapshot and timestamp itself; its lock orders this with re-signing.
        with online.lock:
            based_on = _pointer(store)
            completed = online.complete(store, metadata_files, now=now)
            with conflict_if_moved(store, based_on):
                return publish_files(store, blobs, completed, now=now)
    parsed = _parse(metadata_files)
    current = store.current_timestamp()
    new = _new_records(store, parsed)
    _check_root_alias(store, parsed)
    _check_blobs(blobs, parsed)
    fresh = _verify_as_devices(store, parsed, current, now)
    _check_reachable(new, fresh)

    ts_filename = parsed.timestamp_record.filename if parsed.timestamp_record else None
    outcome = store.publish(
        _all_records(parsed),
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
