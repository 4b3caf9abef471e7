"""A release's transfer encodings: its zstd blob and its deltas from published versions.

``release add|stage --compress zstd --delta-from VERSION`` build them after the image is
stored and before targets is signed. Each encoded blob becomes a target of its own (length
and sha256 signed, ``custom`` ``{"transfer_of": <image>}``) and the image target's
``custom`` lists them (:class:`otaguard.model.transfer.Encodings`), so the one targets
signature covers every byte a device may download. A delta's base is a published image
of a hardware id the new release shares, read from this repository's blob store and
checked against its signed hash first; each built blob is decoded once here (as a device
would) before it is listed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otaguard._fs import fsync_dir
from otaguard.delta.build import build_delta, check_zstd, compress_zstd
from otaguard.model.errors import OperatorError, OtaguardError
from otaguard.model.names import check_target_name
from otaguard.model.release import ReleaseInfo
from otaguard.model.transfer import (
    COMPRESSION_FORMATS,
    DELTA_FORMATS,
    MAX_DELTAS,
    TRANSFER_OF_KEY,
    DeltaRef,
    EncodedRef,
    Encodings,
)
from otaguard.model.version import Version

if TYPE_CHECKING:
    from tuf.api.metadata import Metadata, Targets

    from otaguard.repo.repository import ImageRepository

__all__ = ["TransferRequest", "store_encodings"]

logger = logging.getLogger(__name__)
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class TransferRequest:
    """What encodings to publish with a release (the CLI's ``--compress``, ``--delta-from``)."""

    compress: str | None = None
    delta_from: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.compress is not None and self.compress not in COMPRESSION_FORMATS:
            raise OperatorError(f"--compress must be one of {', '.join(COMPRESSION_FORMATS)}")
        if len(self.delta_from) > MAX_DELTAS:
            raise OperatorError(f"at most {MAX_DELTAS} --delta-from versions")

    def __bool__(self) -> bool:
        return self.compress is not None or bool(self.delta_from)


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _name(name: str) -> str:
    try:
        return check_target_name(name)
    except ValueError as e:
        raise OperatorError(f"encoded blob name {name!r}: {e}") from e


def _store(repo: ImageRepository, built: Path, path: str, fmt: str) -> EncodedRef:
    """Move a built blob into targets/ under its hash name."""
    length, digest = _sha256(built)
    os.replace(built, repo.targets_dir / f"{digest}.{path}")
    fsync_dir(repo.targets_dir)
    return EncodedRef(path, fmt, digest, length)


def _bases(
    repo: ImageRepository, versions: Sequence[str], info: ReleaseInfo
) -> list[tuple[Version, Path, int, str]]:
    """The published images to build deltas from: (version, blob, length, sha256)."""
    releases = repo.releases()
    out = []
    for raw in dict.fromkeys(versions):
        try:
            version = Version.parse(raw)
        except ValueError as e:
            raise OperatorError(f"--delta-from {raw}: {e}") from e
        found = [
            r
            for r in releases
            if r.info.version == version and set(r.info.hardware_ids) & set(info.hardware_ids)
        ]
        if not found or version >= info.version:
            raise OperatorError(
                f"--delta-from {raw}: no published release below {info.version} "
                "with that version for these hardware ids"
            )
        base = found[0]
        blob = repo.blob_path(base)
        try:
            length, digest = _sha256(blob)
        except OSError as e:
            raise OperatorError(f"cannot read the image of {base.path}: {e.strerror}") from e
        if (length, digest) != (base.length, base.sha256):
            raise OperatorError(f"the stored image of {base.path} is not the signed one")
        out.append((version, blob, length, digest))
    return out


def store_encodings(
    repo: ImageRepository,
    targets_md: Metadata[Targets],
    image: Path,
    name: str,
    *,
    info: ReleaseInfo,
    request: TransferRequest,
) -> Encodings:
    """Build, check and store the encodings ``request`` asks for; list them in ``targets_md``.

    The image target ``name`` must already be in ``targets_md``; its ``custom`` gains the
    encodings. Nothing is signed.

    Raises:
        OperatorError: an unknown base version, a base whose stored blob is not the
            signed one, a read or write failure, or a built blob that does not decode to
            the image (names the problem).
    """
    from tuf.api.metadata import TargetFile

    bases = _bases(repo, request.delta_from, info)
    compressed: EncodedRef | None = None
    deltas: list[DeltaRef] = []
    try:
        with tempfile.TemporaryDirectory(dir=repo.targets_dir, prefix=".encode.") as tmp:
            if request.compress is not None:
                path = _name(f"{name}.zst")
                built = Path(tmp) / "blob"
                compress_zstd(image, built)
                check_zstd(image, built)
                compressed = _store(repo, built, path, COMPRESSION_FORMATS[0])
            for version, blob, length, digest in bases:
                path = _name(f"{name}.from-{version}.delta")
                built = Path(tmp) / "blob"
                build_delta(blob, image, built)
                ref = _store(repo, built, path, DELTA_FORMATS[0])
                deltas.append(DeltaRef(version, digest, length, ref))
    except OSError as e:
        raise OperatorError(f"cannot build the encodings of {name}: {e.strerror}") from e
    except OtaguardError as e:
        raise OperatorError(f"an encoding of {name} failed its check: {e}") from e
    encodings = Encodings(compressed, tuple(deltas))
    for ref in ([compressed] if compressed else []) + [d.blob for d in deltas]:
        if ref.path in targets_md.signed.targets:
            raise OperatorError(f"target {ref.path} already exists")
        targets_md.signed.targets[ref.path] = TargetFile(
            ref.length,
            {"sha256": ref.sha256},
            ref.path,
            unrecognized_fields={"custom": {TRANSFER_OF_KEY: name, "format": ref.format}},
        )
    custom: dict[str, Any] = targets_md.signed.targets[name].unrecognized_fields["custom"]
    custom.update(encodings.to_custom())
    for ref in ([compressed] if compressed else []) + [d.blob for d in deltas]:
        logger.info("encoding %s: %s bytes", ref.path, ref.length)
    return encodings
