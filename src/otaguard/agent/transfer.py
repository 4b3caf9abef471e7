"""Obtain a verified image the cheapest way its target offers: delta, compressed, or full.

The image target's ``custom`` may list a zstd blob and deltas (ADR 0018,
:mod:`otaguard.model.transfer`). The agent tries, in order:

1. the delta whose base is exactly the running image (its recorded sha256 and length);
2. the compressed blob;
3. the full image (always last, and always possible).

Every encoded blob is itself a target of the verified targets metadata, downloaded by
python-tuf with its signed length and hash, and the same binding the image's ``custom``
gives; its decoder (:mod:`otaguard.delta`) is bounded and refuses hostile input. The
decoded bytes are hashed and must be the image target's signed length and sha256. Any
failure of an encoded path (blob absent or different, corrupt, a running image that is
not the delta's base, a decoded image that differs) is logged with its cause and the next
path is tried, so a device still installs the full image.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from tuf.api.metadata import TargetFile

from otaguard.agent.updater import TufSession
from otaguard.delta import apply_delta, decompress_image
from otaguard.model.errors import (
    DeviceStorageError,
    OtaguardError,
    StopRequestedError,
    VerificationError,
)
from otaguard.model.transfer import DeltaRef, EncodedRef, Encodings

__all__ = ["READ_CHUNK", "RunningImage", "TransferResult", "obtain_image"]

logger = logging.getLogger(__name__)

#: read size of a downloaded blob fed to its decoder
READ_CHUNK: Final = 256 * 1024


@dataclass(frozen=True)
class RunningImage:
    """The image in the active slot, as the boot environment records it."""

    sha256: str
    length: int
    #: opens the active slot for reading (a delta's base)
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class TransferResult:
    """How the image was obtained: ``delta``, ``compressed`` or ``full``."""

    kind: str
    #: bytes downloaded for the image (the blob's length, plus any failed attempt's)
    downloaded: int
    #: why cheaper paths were not used (empty when the first one worked)
    fallbacks: list[str] = field(default_factory=list)


def _bound_target(session: TufSession, ref: EncodedRef, image: TargetFile) -> TargetFile:
    target = session.find_target(ref.path)
    if target is None:
        raise VerificationError(f"{ref.path} listed by {image.path} is not a target")
    if target.length != ref.length or target.hashes.get("sha256") != ref.sha256:
        raise VerificationError(f"{ref.path} is not the blob {image.path} binds")
    return target


def _decode(
    blob: Path,
    dest: Path,
    image: TargetFile,
    decode: Callable[[Callable[[bytes], object], BinaryIO], int],
) -> None:
    """Run ``decode`` from ``blob`` into ``dest``; keep it only if it is the image."""
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".decode")
    try:
        with open(blob, "rb") as src, open(tmp, "wb") as out:

            def write(data: bytes) -> None:
                h.update(data)
                out.write(data)

            decode(write, src)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != image.hashes.get("sha256"):
            raise VerificationError(f"the decoded image is not {image.path} (sha256 differs)")
        os.replace(tmp, dest)
    except OSError as e:
        raise DeviceStorageError(f"cannot decode into {dest.parent}: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _via_delta(
    session: TufSession,
    image: TargetFile,
    dest: Path,
    delta: DeltaRef,
    running: RunningImage,
) -> None:
    target = _bound_target(session, delta.blob, image)
    blob = dest.with_name(f"{delta.blob.sha256}.{delta.blob.path}")
    try:
        session.download(target, blob)
        with running.open() as base:
            _decode(
                blob,
                dest,
                image,
                lambda write, src: apply_delta(
                    iter(lambda: src.read(READ_CHUNK), b""),
                    base=base,
                    base_length=delta.base_length,
                    image_length=image.length,
                    write=write,
                ),
            )
    except OSError as e:
        raise DeviceStorageError(f"cannot read the running image: {e.strerror}") from e
    finally:
        blob.unlink(missing_ok=True)


def _via_compressed(
    session: TufSession, image: TargetFile, dest: Path, ref: EncodedRef, slot_size: int | None
) -> None:
    target = _bound_target(session, ref, image)
    limit = image.length if slot_size is None else min(image.length, slot_size)
    blob = dest.with_name(f"{ref.sha256}.{ref.path}")
    try:
        session.download(target, blob)
        _decode(
            blob,
            dest,
            image,
            lambda write, src: decompress_image(
                iter(lambda: src.read(READ_CHUNK), b""), image_length=limit, write=write
            ),
        )
    finally:
        blob.unlink(missing_ok=True)


def obtain_image(
    session: TufSession,
    image: TargetFile,
    dest: Path,
    *,
    running: RunningImage | None,
    slot_size: int | None = None,
) -> TransferResult:
    """Put the verified bytes of ``image`` at ``dest``, by delta, compressed or in full.

    Args:
        session: the refreshed TUF session ``image`` was looked up in.
        image: the image target (verified metadata).
        dest: where the image goes (the staging file the slot write reads).
        running: the active slot's image, the base a delta may apply to (``None``: none).
        slot_size: the slot's capacity if known; a compressed blob may not expand beyond it.

    Returns:
        Which path worked, what it downloaded, and why cheaper ones were skipped.

    Raises:
        VerificationError, TransportError, DeviceStorageError: the full image failed too.
        StopRequestedError: the agent is stopping (no fallback).
    """
    fallbacks: list[str] = []
    try:
        encodings = Encodings.from_custom(image.custom)
    except ValueError as e:
        fallbacks.append(f"encodings of {image.path} unreadable: {e}")
        encodings = Encodings()
    attempts: list[tuple[str, int, Callable[[], None]]] = []
    if running is not None and encodings.deltas:
        delta = encodings.delta_for(running.sha256)
        if delta is None or delta.base_length != running.length:
            cause = f"no delta from the running image ({running.sha256[:12]})"
            logger.info("%s: %s", image.path, cause)
            fallbacks.append(cause)
        else:
            attempts.append(
                ("delta", delta.blob.length,
                 lambda: _via_delta(session, image, dest, delta, running))
            )  # fmt: skip
    comp = encodings.compressed
    if comp is not None:
        attempts.append(
            ("compressed", comp.length,
             lambda: _via_compressed(session, image, dest, comp, slot_size))
        )  # fmt: skip
    downloaded = 0
    for kind, length, attempt in attempts:
        try:
            attempt()
        except StopRequestedError:
            raise
        except OtaguardError as e:
            downloaded += length
            cause = f"{kind} failed: {e.diagnostics()}"
            logger.warning("%s: %s; falling back", image.path, cause)
            fallbacks.append(cause)
            continue
        logger.info("%s obtained by %s (%d bytes downloaded)", image.path, kind, length)
        return TransferResult(kind, downloaded + length, fallbacks)
    if fallbacks:
        logger.info("%s: downloading the full image (%s)", image.path, "; ".join(fallbacks))
    session.download(image, dest)
    return TransferResult("full", downloaded + image.length, fallbacks)
