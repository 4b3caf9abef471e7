"""Reading the current publication out of a repository directory written by otaguard.repo.

Layout: ``metadata/`` holds ``N.root.json`` and ``N.targets.json``, plus in a local-mode
repository ``N.snapshot.json`` and ``timestamp.json`` (written last); ``targets/`` holds
blobs named ``<sha256>.<path>``. The *current set* is every root version plus what
``timestamp.json`` leads to or, in a server-mode repository (no timestamp: the server
signs snapshot and timestamp), the newest targets.

The directory the server follows must hold no private key: :func:`refuse_private_keys`
scans it (bounded) at start-up and before every import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from otaguard.model.errors import ConfigError, NotReadyError, OperatorError, VerificationError
from otaguard.repo.repository import KEYS_CONFIG_NAME
from otaguard.repo.verify import load_role
from otaguard.server._names import blob_name, parse_metadata_name
from otaguard.server.publish import MAX_METADATA_FILE_BYTES, MAX_PUBLISH_FILES

__all__ = [
    "KEYS_DIR_MARKERS",
    "RepoNotReadyError",
    "RepoSet",
    "publication_fingerprint",
    "read_current_set",
    "refuse_private_keys",
    "timestamp_fingerprint",
]

logger = logging.getLogger(__name__)

TIMESTAMP: Final = "timestamp.json"
#: files that only a keys directory holds (``otaguard repo init --keys-dir``)
KEYS_DIR_MARKERS: Final = frozenset({KEYS_CONFIG_NAME})
# A PEM private key block of any kind: PKCS#8 (plain or ENCRYPTED), PKCS#1, SEC1, OpenSSH.
PRIVATE_KEY_RE: Final = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
# The scan is bounded so a huge repository cannot stall start-up or the sync: keys sit
# at most a few levels deep (REPO_DIR/keys/x.pem) ...
MAX_SCAN_DEPTH: Final = 4
# ... a private key file is a few KiB (ML-DSA-65 PEM: ~5.5 KiB; larger files are blobs) ...
MAX_SCAN_FILE_BYTES: Final = 256 * 1024
# ... and a repository with more entries than this is refused rather than half-checked.
MAX_SCAN_ENTRIES: Final = 100_000


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


def _holds_private_key(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(MAX_SCAN_FILE_BYTES)
    except OSError as e:
        raise ConfigError(
            f"cannot read {path} to check it holds no private key: {e.strerror}"
        ) from e
    return PRIVATE_KEY_RE.search(head) is not None


def refuse_private_keys(repo_dir: Path) -> None:
    """Refuse a directory holding private keys or a keys directory.

    Scans at most :data:`MAX_SCAN_DEPTH` levels and :data:`MAX_SCAN_ENTRIES` entries;
    files up to :data:`MAX_SCAN_FILE_BYTES` are read whole (symlinks to files are
    followed, to directories not).

    Raises:
        ConfigError: a file holds a PEM private key or is a keys-directory config (the
            message names it), or the directory is too large or unreadable to check.
    """
    root = Path(repo_dir)
    entries = 0
    pending: list[tuple[Path, int]] = [(root, 0)]
    while pending:
        directory, depth = pending.pop()
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(f"cannot list {directory}: {e.strerror}") from e
        for entry in children:
            entries += 1
            if entries > MAX_SCAN_ENTRIES:
                raise ConfigError(
                    f"{root} has more than {MAX_SCAN_ENTRIES} entries; cannot check that it "
                    "holds no private key"
                )
            path = Path(entry.path)
            if entry.name in KEYS_DIR_MARKERS:
                raise ConfigError(
                    f"{path} is a keys directory config: the repository the server follows "
                    "must hold no private keys; move the keys directory to the offline machine"
                )
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 < MAX_SCAN_DEPTH:
                        pending.append((path, depth + 1))
                    continue
                st = path.stat()
            except FileNotFoundError:
                continue  # a temp file renamed meanwhile, or a dangling link
            except OSError as e:
                raise ConfigError(f"cannot check {path}: {e.strerror}") from e
            if (
                stat.S_ISREG(st.st_mode)
                and st.st_size <= MAX_SCAN_FILE_BYTES
                and _holds_private_key(path)
            ):
                raise ConfigError(
                    f"{path} holds a private key: the repository the server follows must "
                    "hold no private keys; move it to the offline signing machine"
                )


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


def _newest(names: list[str], role: str) -> str | None:
    versions = [
        p.version
        for n in names
        if (p := parse_metadata_name(n)) is not None and p.role == role and p.version
    ]
    return f"{max(versions)}.{role}.json" if versions else None


def _list(meta_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(meta_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise OperatorError(f"cannot list {meta_dir}: {e.strerror}") from e


def publication_fingerprint(repo_dir: Path) -> tuple[int, int, str] | None:
    """Fingerprint of the repository's current publication, ``None`` if it has none.

    ``(mtime_ns, size, sha256)`` of ``timestamp.json``; in a server-mode repository (no
    timestamp) of the newest targets file, with the newest root's name in the hash.
    """
    meta_dir = Path(repo_dir) / "metadata"
    path = meta_dir / TIMESTAMP
    salt = b""
    if not path.exists():
        names = _list(meta_dir)
        newest_targets = _newest(names, "targets")
        if newest_targets is None:
            return None
        path = meta_dir / newest_targets
        salt = (_newest(names, "root") or "").encode()
    try:
        st = path.stat()
        data = _read(path)
    except (FileNotFoundError, RepoNotReadyError):
        return None
    except OSError as e:
        raise OperatorError(f"cannot read {path}: {e.strerror}") from e
    return st.st_mtime_ns, st.st_size, hashlib.sha256(salt + b"\0" + data).hexdigest()


#: the name :class:`~otaguard.server.sync.RepoSync` uses
timestamp_fingerprint = publication_fingerprint


def _targets_blobs(repo_dir: Path, name: str, data: bytes) -> list[BlobSource]:
    targets: Metadata[Targets] = load_role(name, data, Targets)
    blobs: list[BlobSource] = []
    for path, target in targets.signed.targets.items():
        sha = target.hashes.get("sha256")
        if sha is None:
            raise VerificationError(f"target {path} has no sha256 hash")
        bname = blob_name(sha, path)
        blobs.append(BlobSource(bname, Path(repo_dir) / "targets" / bname, target.length))
    return blobs


def read_current_set(repo_dir: Path) -> RepoSet:
    """Read every root version and the current targets (and what leads to them).

    With a ``timestamp.json`` (local mode): the snapshot it names and the targets that
    names. Without (server mode): the newest ``N.targets.json``; the server signs the
    snapshot and timestamp for it.

    Args:
        repo_dir: repository directory (with ``metadata/`` and ``targets/``).

    Returns:
        Metadata bytes by file name, and the blobs the current targets metadata lists.

    Raises:
        ConfigError: the directory holds a private key (see :func:`refuse_private_keys`).
        RepoNotReadyError: a file the timestamp leads to is missing (mid-write).
        VerificationError: a file is not metadata of the role it should be.
        OperatorError: the directory is unreadable.
    """
    refuse_private_keys(repo_dir)
    meta_dir = Path(repo_dir) / "metadata"
    files: dict[str, bytes] = {}
    blobs: list[BlobSource] = []
    names = _list(meta_dir)
    if TIMESTAMP in names:
        ts_bytes = _read(meta_dir / TIMESTAMP)
        files[TIMESTAMP] = ts_bytes
        ts: Metadata[Timestamp] = load_role(TIMESTAMP, ts_bytes, Timestamp)
        snap_name = f"{ts.signed.snapshot_meta.version}.snapshot.json"
        files[snap_name] = _read(meta_dir / snap_name)
        snapshot: Metadata[Snapshot] = load_role(snap_name, files[snap_name], Snapshot)
        for role_file, meta in snapshot.signed.meta.items():
            name = f"{meta.version}.{role_file}"
            if parse_metadata_name(name) is None:
                raise VerificationError(f"snapshot names an invalid file {name!r}")
            files[name] = _read(meta_dir / name)
            blobs.extend(_targets_blobs(repo_dir, name, files[name]))
    else:
        newest_targets = _newest(names, "targets")
        if newest_targets is None:
            raise RepoNotReadyError(f"{meta_dir} has no targets metadata (yet)")
        files[newest_targets] = _read(meta_dir / newest_targets)
        blobs.extend(_targets_blobs(repo_dir, newest_targets, files[newest_targets]))
    roots = [n for n in names if (p := parse_metadata_name(n)) and p.role == "root" and p.version]
    if len(roots) + len(files) > MAX_PUBLISH_FILES:
        raise VerificationError(f"too many root versions in {meta_dir}")
    for name in roots:
        files[name] = _read(meta_dir / name)
    return RepoSet(files, tuple(blobs))
