"""The published repository as a static tree that nginx or any CDN serves unchanged.

``DIR/metadata/`` holds the exact signed bytes under the names a TUF client asks for
(consistent snapshots: ``N.root.json``, ``N.snapshot.json``, ``N.targets.json``, and the
unversioned ``timestamp.json`` and ``root.json``, the newest); ``DIR/targets/`` the blobs
as ``<sha256>.<name>`` (hard links into the blob store where the filesystem allows, else
copies). Mirrors are untrusted by design: the device verifies every byte, so a tampered
tree is refused by the device, not trusted by it.

A publication is written in an order that never lets a reader see a timestamp naming
files that are not there yet: blobs, then roots, targets and snapshot, and
``timestamp.json`` last, each through a temp file and an atomic rename. Versioned files
never change, so an existing one is left alone; files of older publications stay (a
device in the middle of an update may still ask for them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Final

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Targets

from otaguard.model.errors import OtaguardError, ServerStorageError, VerificationError
from otaguard.server._names import blob_name
from otaguard.server._periodic import PeriodicTask
from otaguard.server.served import ServedMetadata, ServedView
from otaguard.server.storage.base import BlobStore

__all__ = ["STATIC_EXPORT_SECONDS", "StaticTreeExporter", "write_static_tree"]

logger = logging.getLogger(__name__)

#: how often the exporter looks for a new publication (a publication in this process or
#: one sharing the data directory is noticed by the change signal at the next look)
STATIC_EXPORT_SECONDS: Final = 1.0
# The tree is world-readable: nginx workers run as another user; nothing in it is secret.
_FILE_MODE: Final = 0o644
_DIR_MODE: Final = 0o755


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.chmod(_FILE_MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _place_blob(source: Path, dest: Path) -> None:
    """Hard-link (no copy, same inode) or copy ``source`` to ``dest`` atomically."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or links not allowed: a copy
            shutil.copyfile(source, tmp)
            tmp.chmod(_FILE_MODE)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _blob_names(view: ServedView) -> list[str]:
    names: list[str] = []
    for rec in view.files.values():
        if rec.role != "targets":
            continue
        try:
            targets = Metadata[Targets].from_bytes(rec.data).signed.targets
        except (RepositoryError, ValueError, KeyError, TypeError) as e:
            raise VerificationError(f"{rec.filename} cannot be parsed: {e}") from e
        for path, target in targets.items():
            names.append(blob_name(target.hashes["sha256"], path))
    return names


def write_static_tree(view: ServedView, blobs: BlobStore, directory: Path) -> int:
    """Write ``view`` (and the blobs its targets list) into ``directory``; return how
    many files were added.

    Raises:
        VerificationError: a served targets file cannot be parsed, or lists a target
            without a servable name.
        ServerStorageError: the tree cannot be written, or a listed blob is missing.
    """
    if view.timestamp is None:
        return 0
    meta_dir, targets_dir = directory / "metadata", directory / "targets"
    added = 0
    try:
        for sub in (directory, meta_dir, targets_dir):
            sub.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        for name in _blob_names(view):
            if (targets_dir / name).exists():
                continue
            source = blobs.local_path(name)
            if source is None:
                raise ServerStorageError(f"blob {name} is listed but not stored")
            _place_blob(source, targets_dir / name)
            added += 1
        # Referenced before referencing: roots, then targets, snapshot, and the timestamp.
        order = {"root": 0, "snapshot": 2}
        records = [*view.roots.values(), *view.files.values()]
        for rec in sorted(records, key=lambda r: (order.get(r.role, 1), r.version)):
            if not (meta_dir / rec.filename).exists():
                _write_atomic(meta_dir / rec.filename, rec.data)
                added += 1
        # The unversioned names, newest root first (a client reads root before timestamp).
        newest = view.roots.get(view.newest_root)
        for name, latest in (("root.json", newest), ("timestamp.json", view.timestamp)):
            current = meta_dir / name
            if latest is not None and (not current.exists() or current.read_bytes() != latest.data):
                _write_atomic(current, latest.data)
                added += 1
    except OSError as e:
        raise ServerStorageError(f"cannot write the static tree {directory}: {e}") from e
    return added


class StaticTreeExporter(PeriodicTask):
    """Keeps ``directory`` equal to what the server serves (``--static-tree``)."""

    def __init__(self, served: ServedMetadata, blobs: BlobStore, directory: Path):
        """Export ``served``'s publications and ``blobs`` into ``directory``."""
        super().__init__(interval=STATIC_EXPORT_SECONDS, name="otaguard-static-tree")
        self._served = served
        self._blobs = blobs
        self.directory = Path(directory)
        self._exported: ServedView | None = None

    def export_now(self) -> int:
        """Export the current publication if it is not yet; return files added.

        Raises:
            OtaguardError: reading the store or writing the tree failed.
        """
        self._served.refresh()
        view = self._served.view
        if view is self._exported:
            return 0
        added = write_static_tree(view, self._blobs, self.directory)
        self._exported = view
        if added:
            logger.info("static tree %s: %d file(s) added", self.directory, added)
        return added

    def _tick(self) -> None:
        try:
            self.export_now()
        except OtaguardError as e:  # retried at the next round
            logger.error("static tree export failed: %s", e.diagnostics())  # noqa: TRY400
