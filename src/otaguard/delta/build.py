"""Build the encoded blobs of a release: a zstd-compressed image and deltas from bases.

Release tooling only (the device never imports this): it runs detools' suffix-array
bsdiff for bases up to :data:`BSDIFF_MAX_BASE` (memory about 5 bytes per base byte,
mmap-backed) and detools' ``match-blocks`` search above it, and zstd at a high level.
Both searches write the same sequential format, which the device's parser reads
(ADR 0022). The output is what :mod:`otaguard.delta.apply` and
:mod:`otaguard.delta.zstd` decode within their limits; a built delta is applied once here
before it is published, so a builder bug never reaches a device.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

import detools
import zstandard

from otaguard.delta.apply import DeltaError, apply_delta
from otaguard.delta.zstd import MAX_WINDOW_SIZE, decompress_image

__all__ = ["BSDIFF_MAX_BASE", "ZSTD_LEVEL", "build_delta", "compress_zstd"]

#: zstd level for published images: 19 is the highest before the "ultra" levels, whose
#: larger windows devices refuse (:data:`MAX_WINDOW_SIZE`); built once, fetched by many
ZSTD_LEVEL: Final = 19
_CHUNK: Final = 1024 * 1024
#: largest base diffed with bsdiff's suffix-array search. It finds the smallest deltas
#: (libcrypto.so.3, 4.7 MB: 189 KB, against 855 KB by match-blocks) but its match loop
#: degrades on long runs of equal bytes: on a 128 MiB ext4 image (118 MiB of zero
#: blocks) it had not finished after 30 minutes, where match-blocks took 23 CPU-seconds
#: for a 1.6 % delta. Filesystem and whole-disk images are that shape; single binaries
#: are small.
BSDIFF_MAX_BASE: Final = 32 * 1024 * 1024


def compress_zstd(image: Path, out: Path) -> None:
    """Write ``image`` zstd-compressed to ``out`` (window within the device's cap).

    Raises:
        OSError: reading or writing failed.
    """
    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, window_log=MAX_WINDOW_SIZE.bit_length() - 1
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    with open(image, "rb") as src, open(out, "wb") as dst:
        cctx.copy_stream(src, dst, read_size=_CHUNK, write_size=_CHUNK)


def build_delta(base: Path, image: Path, out: Path) -> None:
    """Write a delta from ``base`` to ``image`` to ``out`` and check it rebuilds ``image``.

    Raises:
        OSError: reading or writing failed.
        DeltaError: the delta does not rebuild the image (a builder bug; nothing to publish).
    """
    algorithm = "bsdiff" if base.stat().st_size <= BSDIFF_MAX_BASE else "match-blocks"
    with open(base, "rb") as fb, open(image, "rb") as fi, open(out, "wb") as fo:
        detools.create_patch(
            fb, fi, fo, compression="lzma", patch_type="sequential", algorithm=algorithm
        )
    _check_rebuilds(base, image, out)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_rebuilds(base: Path, image: Path, delta: Path) -> None:
    h = hashlib.sha256()
    with open(base, "rb") as fb, open(delta, "rb") as fd:
        apply_delta(
            iter(lambda: fd.read(_CHUNK), b""),
            base=fb,
            base_length=base.stat().st_size,
            image_length=image.stat().st_size,
            write=h.update,
        )
    if h.hexdigest() != _file_sha256(image):
        raise DeltaError(f"the delta {delta.name} does not rebuild {image.name}")


def check_zstd(image: Path, blob: Path) -> None:
    """Decode ``blob`` as a device would and check it is ``image``.

    Raises:
        CompressedImageError: it is not.
    """
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        decompress_image(
            iter(lambda: f.read(_CHUNK), b""), image_length=image.stat().st_size, write=h.update
        )
    if h.hexdigest() != _file_sha256(image):
        from otaguard.delta.zstd import CompressedImageError

        raise CompressedImageError(f"{blob.name} does not decode to {image.name}")
