"""Obtain a verified image the cheapest way its target offers: delta, compressed, or full.

The image target's ``custom`` may list a zstd blob and deltas (ADR 0018,
:mod:`otaguard.model.transfer`). The agent tries, in order:

1. the delta whose base is exactly the running image (its recorded sha256 and length);
2. the compressed blob;
3. the full image (always last, and always possible).

Every encoded blob is itself a target of the verified targets metadata, the one the
image's ``custom`` binds (length and sha256). The installer streams it into the slot
through the streaming install's transform seam (ADR 0017): the blob is length-capped and
hashed as it arrives, its decoder (:mod:`otaguard.delta.transforms`) is bounded and
refuses hostile input, and the slot bytes must be the image target's signed length and
sha256. Any failure of an encoded path is logged with its cause by the installer and the
next path is tried, so a device still installs the full image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from tuf.api.metadata import TargetFile

from otaguard.agent.stream import StreamTransform
from otaguard.agent.updater import TufSession
from otaguard.delta.transforms import DeltaTransform, ZstdTransform
from otaguard.model.errors import VerificationError
from otaguard.model.transfer import EncodedRef, Encodings

__all__ = ["EncodedPath", "RunningImage", "encoded_paths"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningImage:
    """The image in the active slot, as the boot environment records it."""

    sha256: str
    length: int
    #: opens the active slot for reading (a delta's base)
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class EncodedPath:
    """One cheaper way to the image: stream ``blob`` through ``transform`` into the slot."""

    kind: str
    blob: TargetFile
    transform: StreamTransform


def _bound_target(session: TufSession, ref: EncodedRef, image: TargetFile) -> TargetFile:
    target = session.find_target(ref.path)
    if target is None:
        raise VerificationError(f"{ref.path} listed by {image.path} is not a target")
    if target.length != ref.length or target.hashes.get("sha256") != ref.sha256:
        raise VerificationError(f"{ref.path} is not the blob {image.path} binds")
    return target


def encoded_paths(
    session: TufSession,
    image: TargetFile,
    *,
    running: RunningImage | None,
    slot_size: int | None = None,
) -> tuple[list[EncodedPath], list[str]]:
    """The encoded paths to try for ``image``, cheapest first, and why others are not.

    Args:
        session: the refreshed TUF session ``image`` was looked up in.
        image: the image target (verified metadata).
        running: the active slot's image, the base a delta may apply to (``None``: none).
        slot_size: the slot's capacity if known; a compressed blob may not expand beyond it.

    Returns:
        The paths (delta from the running image, then compressed) and the causes of
        skipped ones (logged here too). The full image is always the caller's last path.
    """
    causes: list[str] = []
    paths: list[EncodedPath] = []
    try:
        encodings = Encodings.from_custom(image.custom)
    except ValueError as e:
        causes.append(f"encodings unreadable: {e}")
        encodings = Encodings()
    if running is not None and encodings.deltas:
        delta = encodings.delta_for(running.sha256)
        if delta is None or delta.base_length != running.length:
            causes.append(f"no delta from the running image ({running.sha256[:12]})")
        else:
            try:
                blob = _bound_target(session, delta.blob, image)
                transform = DeltaTransform(running.open, delta.base_length, image.length)
                paths.append(EncodedPath("delta", blob, transform))
            except VerificationError as e:
                causes.append(f"delta failed: {e.diagnostics()}")
    if encodings.compressed is not None:
        try:
            blob = _bound_target(session, encodings.compressed, image)
            paths.append(EncodedPath("compressed", blob, ZstdTransform(image.length, slot_size)))
        except VerificationError as e:
            causes.append(f"compressed failed: {e.diagnostics()}")
    for cause in causes:
        logger.info("%s: %s", image.path, cause)
    return paths, causes
