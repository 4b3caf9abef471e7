"""Reading the current publication out of a repository directory written by otaguard.repo.

Layout: ``metadata/`` holds ``N.root.json``, ``N.targets.json``, ``N.snapshot.json`` and
``timestamp.json`` (written last); ``targets/`` holds blobs named ``<sha256>.<path>``.
The *current set* is every root version plus what ``timestamp.json`` leads to.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from otaguard.model.errors import NotReadyError, OperatorError, VerificationError
from otaguard.server._names import blob_name, parse_metadata_name
from otaguard.server.publish import MAX_METADATA_FILE_BYTES, MAX_PUBLISH_FILES, load_role

__all__ = ["RepoNotReadyError", "RepoSet", "read_current_set", "timestamp_fingerprint"]

logger = logging.getLogger(__name__)

TIMESTAMP: Final = "timestamp.json"


class RepoNotReadyError(NotReadyError):
    """The repository is mid-write: the timestamp names a file that is not there yet."""


@dataclass(frozen=True)
class BlobSource:
    """A target blob in the repository directory."""

    name: str
    path: Path
    length: int


@dataclass(frozen=True)
class RepoSet:
    """The files of the current publication of a repository directory."""

    metadata: dict[str, bytes]
    blobs: tuple[BlobSource, ...]


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_METADATA_FILE_BYTES + 1)
    except FileNotFoundError as e:
        raise RepoNotReadyError(f"{path.name} is not in the repository (yet)") from e
    except OSError as e:
        raise OperatorError(f"cannot read {path}: {e.strerror}") from e
    if len(data) > MAX_METADATA_FILE_BYTES:
        raise VerificationError(f"{path.name} exceeds {MAX_METADATA_FILE_BYTES} bytes")
    return data


def timestamp_fingerprint(repo_dir: Path) -> tuple[int, int, str] | None:
    """Return ``(mtime_ns, size, sha256)`` of the repository's timestamp.json, or ``None``."""
    path = Path(repo_dir) / "metadata" / TIMESTAMP
    try:
        st = path.stat()
        data = _read(path)
    except (FileNotFoundError, RepoNotReadyError):
        return None
    except OSError as e:
        raise OperatorError(f"cannot read {path}: {e.strerror}") from e
    return st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest()


def read_current_set(repo_dir: Path) -> RepoSet:
    """Read every root version and the files the current timestamp leads to.

    Args:
        repo_dir: repository directory (with ``metadata/`` and ``targets/``).

    Returns:
        Metadata bytes by file name, and the blobs the current targets metadata lists.

    Raises:
        RepoNotReadyError: a file the timestamp leads to is missing (mid-write).
        VerificationError: a file is not metadata of the role it should be.
        OperatorError: the directory is unreadable.
    """
    meta_dir = Path(repo_dir) / "metadata"
    files: dict[str, bytes] = {}
    ts_bytes = _read(meta_dir / TIMESTAMP)
    files[TIMESTAMP] = ts_bytes
    ts: Metadata[Timestamp] = load_role(TIMESTAMP, ts_bytes, Timestamp)
    snap_name = f"{ts.signed.snapshot_meta.version}.snapshot.json"
    files[snap_name] = _read(meta_dir / snap_name)
    snapshot: Metadata[Snapshot] = load_role(snap_name, files[snap_name], Snapshot)
    blobs: list[BlobSource] = []
    for role_file, meta in snapshot.signed.meta.items():
        name = f"{meta.version}.{role_file}"
        if parse_metadata_name(name) is None:
            raise VerificationError(f"snapshot names an invalid file {name!r}")
        files[name] = _read(meta_dir / name)
        targets: Metadata[Targets] = load_role(name, files[name], Targets)
        for path, target in targets.signed.targets.items():
            sha = target.hashes.get("sha256")
            if sha is None:
                raise VerificationError(f"target {path} has no sha256 hash")
            bname = blob_name(sha, path)
            blobs.append(BlobSource(bname, Path(repo_dir) / "targets" / bname, target.length))
    try:
        names = sorted(os.listdir(meta_dir))
    except OSError as e:
        raise OperatorError(f"cannot list {meta_dir}: {e.strerror}") from e
    roots = [n for n in names if (p := parse_metadata_name(n)) and p.role == "root" and p.version]
    if len(roots) + len(files) > MAX_PUBLISH_FILES:
        raise VerificationError(f"too many root versions in {meta_dir}")
    for name in roots:
        files[name] = _read(meta_dir / name)
    return RepoSet(files, tuple(blobs))
