"""Decode a zstd-compressed image while it streams, with bounded memory and output.

The compressed blob is a TUF target (its length and hash signed), but it is decoded as it
arrives, before its hash is known, so the decoder treats it as hostile:

- the zstd window (the memory a frame may make the decoder allocate) is capped by
  :data:`MAX_WINDOW_SIZE`; a frame asking more is refused before allocating;
- output leaves the decoder (``read_to_iter``) in pieces of at most :data:`WRITE_SIZE`
  bytes (one input chunk of a few bytes can describe gigabytes: a compression bomb never
  sits in memory);
- the output may not exceed the signed image length nor the slot's size (a device passes
  both): the first byte beyond either raises :class:`CompressedImageError` naming which;
- fewer bytes than the image length at the end is refused too.

What is written is still only a candidate: the caller hashes it and installs it only when
it matches the image target's signed hashes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

import zstandard

from otaguard.model.errors import VerificationError

__all__ = [
    "MAX_WINDOW_SIZE",
    "WRITE_SIZE",
    "CompressedImageError",
    "decode_zstd",
    "decompress_image",
]

#: largest zstd window a frame may use: 8 MiB (window log 23, what the builder writes).
#: The decoder's memory is about the window plus two blocks, so this bounds it.
MAX_WINDOW_SIZE: Final = 8 * 1024 * 1024
#: decoded bytes handed to ``write`` at a time
WRITE_SIZE: Final = 1024 * 1024


class CompressedImageError(VerificationError):
    """The compressed blob is corrupt, expands beyond the image, or ends short of it."""


class _ChunkReader:
    """The compressed chunks as the ``read(size)`` the decoder pulls from.

    ``read`` returns at most ``size`` bytes, keeping the rest of a chunk for the next call:
    python-zstandard's C decoder reads into a buffer of the size it asks for, and a longer
    answer overflowed it (a network read of 1 MiB into its 128 KiB buffer: heap corruption,
    found by the soak, ``tests/unit/test_delta_decoders.py``).
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        """The next at most ``size`` bytes (all that is pending if ``size`` < 0); ``b""``
        at the end."""
        while not self._pending:
            chunk = next(self._it, None)
            if chunk is None:
                return b""
            self._pending = memoryview(chunk)
        n = len(self._pending) if size < 0 else min(size, len(self._pending))
        out = bytes(self._pending[:n])
        self._pending = self._pending[n:]
        return out


def decode_zstd(
    chunks: Iterable[bytes], *, image_length: int, slot_size: int | None = None
) -> Iterator[bytes]:
    """Decode a zstd blob arriving as ``chunks``; yield the image in bounded pieces.

    The generator form (a stream transform: verified chunks in, slot bytes out).

    Args:
        chunks: the compressed bytes as they arrive (any split).
        image_length: the signed image length: the most bytes it may expand to, and
            exactly what it must expand to.
        slot_size: what the slot it is written to holds (``None``: not known here); the
            output may not exceed it either.

    Yields:
        Decoded pieces of at most :data:`WRITE_SIZE` bytes, in order; never a byte past
        ``image_length``.

    Raises:
        CompressedImageError: corrupt data, a window above :data:`MAX_WINDOW_SIZE`,
            output beyond ``image_length`` or ``slot_size``, or short of ``image_length``.
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    limit, what = image_length, f"its declared {image_length} bytes"
    if slot_size is not None and slot_size < image_length:
        limit, what = slot_size, f"the slot's {slot_size} bytes"
    count = 0
    try:
        # the reader is file-like enough for the decoder (it only calls read)
        reader = _ChunkReader(chunks)
        for out in dctx.read_to_iter(reader, write_size=WRITE_SIZE):  # type: ignore[arg-type]
            count += len(out)
            if count > limit:
                raise CompressedImageError(
                    f"compressed image expands beyond {what} (compression bomb)"
                )
            yield bytes(out)
    except zstandard.ZstdError as e:
        raise CompressedImageError(f"compressed image is corrupt: {e}") from e
    if count != image_length:
        raise CompressedImageError(
            f"compressed image expands to {count} bytes, the image has {image_length}"
        )


def decompress_image(
    chunks: Iterable[bytes], *, image_length: int, write: Callable[[bytes], object]
) -> int:
    """Decode a zstd blob arriving as ``chunks`` into ``write`` (see :func:`decode_zstd`).

    Returns:
        The number of bytes written (``image_length``).

    Raises:
        CompressedImageError: as :func:`decode_zstd`.
    """
    n = 0
    for out in decode_zstd(chunks, image_length=image_length):
        write(out)
        n += len(out)
    return n
