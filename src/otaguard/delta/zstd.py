"""Decode a zstd-compressed image while it streams, with bounded memory and output.

The compressed blob is a TUF target (its length and hash signed), but it is decoded as it
arrives, before its hash is known, so the decoder treats it as hostile:

- the zstd window (the memory a frame may make the decoder allocate) is capped by
  :data:`MAX_WINDOW_SIZE`; a frame asking more is refused before allocating;
- output leaves the decoder in pieces of at most :data:`WRITE_SIZE` bytes (one input
  chunk of a few bytes can describe gigabytes: a compression bomb never sits in memory);
- the output may not exceed the signed image length (the caller passes the smaller of
  that and the slot size): the first byte beyond it raises :class:`CompressedImageError`;
- fewer bytes than the image length at the end is refused too.

What is written is still only a candidate: the caller hashes it and installs it only when
it matches the image target's signed hashes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

import zstandard

from otaguard.model.errors import VerificationError

__all__ = ["MAX_WINDOW_SIZE", "WRITE_SIZE", "CompressedImageError", "decompress_image"]

#: largest zstd window a frame may use: 8 MiB (window log 23, what the builder writes).
#: The decoder's memory is about the window plus two blocks, so this bounds it.
MAX_WINDOW_SIZE: Final = 8 * 1024 * 1024
#: decoded bytes handed to ``write`` at a time
WRITE_SIZE: Final = 1024 * 1024


class CompressedImageError(VerificationError):
    """The compressed blob is corrupt, expands beyond the image, or ends short of it."""


class _Capped:
    """The decoder's output sink: forwards to ``write`` and refuses past ``limit``."""

    def __init__(self, write: Callable[[bytes], object], limit: int) -> None:
        self._write = write
        self._limit = limit
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        if self.count > self._limit:
            raise CompressedImageError(
                f"compressed image expands beyond its declared {self._limit} bytes "
                "(compression bomb)"
            )
        self._write(bytes(data))
        return len(data)


def decompress_image(
    chunks: Iterable[bytes], *, image_length: int, write: Callable[[bytes], object]
) -> int:
    """Decode a zstd blob arriving as ``chunks`` into ``write``.

    Args:
        chunks: the compressed bytes as they arrive (any split).
        image_length: the most bytes it may expand to, and exactly what it must expand
            to: the signed image length, or the slot size when smaller.
        write: receives decoded pieces of at most :data:`WRITE_SIZE` bytes, in order.

    Returns:
        The number of bytes written (``image_length``).

    Raises:
        CompressedImageError: corrupt data, a window above :data:`MAX_WINDOW_SIZE`,
            output beyond ``image_length`` or short of it.
    """
    sink = _Capped(write, image_length)
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    # the sink is file-like enough for the writer (it only calls write)
    decoder = dctx.stream_writer(sink, write_size=WRITE_SIZE, closefd=False)  # type: ignore[arg-type]
    try:
        for chunk in chunks:
            decoder.write(chunk)
        decoder.flush()  # type: ignore[no-untyped-call]
    except zstandard.ZstdError as e:
        raise CompressedImageError(f"compressed image is corrupt: {e}") from e
    if sink.count != image_length:
        raise CompressedImageError(
            f"compressed image expands to {sink.count} bytes, the image has {image_length}"
        )
    return sink.count
