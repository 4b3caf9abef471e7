"""Apply a delta (detools sequential bsdiff, lzma) from a base image, streaming and bounded.

The delta arrives from the network as chunks and is parsed before its hash can be known
(the hash is checked when the last chunk arrived), so this parser treats every byte as
hostile: each size is checked against the declared image and base lengths, every limit
is a named constant, and any breach raises :class:`DeltaError` with one line naming it.
The result is never trusted either: the caller hashes what :func:`apply_delta` writes and
installs it only when it matches the signed image target.

Format (detools 0.53 "sequential", written by :mod:`otaguard.delta.build`)::

    header   1 byte: 0x01 (patch type sequential = 0 in bits 6-4, compression lzma = 1)
    to_size  varint: the new image's length
    lzma     an LZMA-alone stream of:
        dfsize   varint 0 (no data-format section: we never write one)
        repeat until to_size bytes were produced:
            diff_size  varint; diff_size bytes added bytewise (mod 256) to the base's
            extra_size varint; extra_size literal bytes
            adjust     signed varint; moves the base position

A varint is detools' "size": 6 value bits and a sign bit in the first byte, 7 value bits
in each following one, the top bit meaning "more".

Memory: one block of output, one of base, the LZMA decoder (its dictionary is capped by
:data:`LZMA_MEMLIMIT`): under 16 MiB whatever the image size. detools is not imported
here: the device needs only this module. Pure apart from reading
the base through the file object it is given.
"""

from __future__ import annotations

import lzma
import os
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Final

from otaguard.model.errors import VerificationError

__all__ = [
    "BLOCK",
    "DELTA_HEADER",
    "LZMA_MEMLIMIT",
    "MAX_IDLE_STEPS",
    "MAX_VARINT_BYTES",
    "DeltaError",
    "apply_delta",
    "decode_delta",
]

#: the only header byte accepted: sequential patch, lzma compression. Other detools
#: types (in-place, hdiffpatch) and compressions are never produced here and not parsed.
DELTA_HEADER: Final = 0x01
#: a size takes at most this many bytes (6 + 9 * 7 = 69 bits >= 64): a longer run of
#: continuation bytes is an attempt to build huge integers byte by byte
MAX_VARINT_BYTES: Final = 10
#: the LZMA decoder may use this much memory; the builder's preset 6 uses an 8 MiB
#: dictionary (about 9 MiB to decode). A delta asking more is refused before allocating.
LZMA_MEMLIMIT: Final = 16 * 1024 * 1024
#: consecutive steps that only move the base position. detools writes such steps (one at
#: a time, as a seek); a run of them produces nothing, and unbounded it lets a tiny
#: compressed delta keep a device parsing for hours
MAX_IDLE_STEPS: Final = 2
#: bytes produced per step (and read from the base): bounds the buffers held at once
BLOCK: Final = 64 * 1024


# Bytewise addition mod 256 of whole blocks as big integers (SWAR): add the low 7 bits of
# every byte (no carry crosses a byte), then set each top bit to the xor of the operands'.
# Linear in the block, no per-byte Python loop, and the device needs no detools import.
_LOW: Final = int.from_bytes(b"\x7f" * BLOCK, "little")
_HIGH: Final = int.from_bytes(b"\x80" * BLOCK, "little")


def _add_bytes(patch: bytes, old: bytes) -> bytes:
    """``(patch[i] + old[i]) % 256`` for each i (equal lengths, at most BLOCK)."""
    n = len(patch)
    low, high = _LOW, _HIGH
    if n != BLOCK:
        mask = (1 << (8 * n)) - 1
        low, high = low & mask, high & mask
    x, y = int.from_bytes(patch, "little"), int.from_bytes(old, "little")
    return (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(n, "little")


class DeltaError(VerificationError):
    """The delta is malformed, does not fit its base or image, or breaks a limit."""


class _Stream:
    """The decompressed delta, pulled in bounded pieces from the compressed chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT)
        self._pending = b""
        self._buf = b""
        self._pos = 0

    def _fill(self, want: int) -> None:
        while len(self._buf) - self._pos < want:
            if self._dec.eof:
                raise DeltaError("delta ends before the image is complete")
            data = b""
            if self._dec.needs_input:
                data = next(self._chunks, b"")
                if not data:
                    raise DeltaError("delta is truncated")
            try:
                # max_length bounds what one call may return (a decompression bomb
                # expands here, never in memory all at once)
                out = self._dec.decompress(data, max_length=BLOCK)
            except lzma.LZMAError as e:
                raise DeltaError(f"delta is corrupt: {e}") from e
            self._buf = self._buf[self._pos :] + out
            self._pos = 0

    def read(self, n: int) -> bytes:
        """Exactly ``n`` (<= BLOCK) decompressed bytes."""
        self._fill(n)
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def varint(self) -> int:
        return _varint(self.read, "delta")

    def finish(self) -> None:
        """The compressed stream must end here, with nothing after it."""
        if self._pos != len(self._buf):
            raise DeltaError("delta has data after the image is complete")
        try:
            while not self._dec.eof:
                data = next(self._chunks, b"") if self._dec.needs_input else b""
                if self._dec.needs_input and not data:
                    raise DeltaError("delta is truncated (no end of stream)")
                if self._dec.decompress(data, max_length=1):
                    raise DeltaError("delta has data after the image is complete")
        except lzma.LZMAError as e:
            raise DeltaError(f"delta is corrupt: {e}") from e
        if self._dec.unused_data or next(self._chunks, b""):
            raise DeltaError("delta has bytes after its compressed stream")


def _varint(read: Callable[[int], bytes], what: str) -> int:
    byte = read(1)[0]
    negative = byte & 0x40
    value = byte & 0x3F
    shift = 6
    count = 1
    while byte & 0x80:
        count += 1
        if count > MAX_VARINT_BYTES:
            raise DeltaError(f"{what} has a size longer than {MAX_VARINT_BYTES} bytes")
        byte = read(1)[0]
        value |= (byte & 0x7F) << shift
        shift += 7
    return -value if negative else value


def _header(chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """Parse the uncompressed header; return the declared length and what followed it."""
    data = b""
    while len(data) < 1 + MAX_VARINT_BYTES:
        chunk = next(chunks, b"")
        if not chunk:
            break
        data += chunk
    if not data:
        raise DeltaError("delta is empty")
    if data[0] != DELTA_HEADER:
        raise DeltaError(f"not a detools sequential lzma delta (header 0x{data[0]:02x})")
    pos = 1

    def read(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise DeltaError("delta header is truncated")
        pos += n
        return data[pos - n : pos]

    to_size = _varint(read, "delta header")
    return to_size, data[pos:]


def decode_delta(
    chunks: Iterable[bytes],
    *,
    base: BinaryIO,
    base_length: int,
    image_length: int,
) -> Iterator[bytes]:
    """Rebuild an image from ``base`` and a delta streamed as ``chunks``; yield it.

    The generator form (a stream transform: verified chunks in, slot bytes out).

    Args:
        chunks: the delta's bytes as they arrive (any split).
        base: the base image, seekable; only its first ``base_length`` bytes are read.
        base_length: the base's verified length (the delta's signed ``base_length``).
        image_length: the new image's signed length: the delta must declare exactly this
            and produce exactly this many bytes.

    Yields:
        The image in blocks of at most :data:`BLOCK` bytes, in order.

    Raises:
        DeltaError: malformed, truncated or trailing data, a size beyond the image or
            base, an LZMA stream needing more than :data:`LZMA_MEMLIMIT`, a run of steps
            that makes no progress. Nothing yielded is valid then.
        OSError: reading the base failed (the caller's storage).
    """
    it = iter(chunks)
    to_size, rest = _header(it)
    if to_size != image_length:
        raise DeltaError(f"delta builds {to_size} bytes, the image has {image_length}")
    stream = _Stream(_prepend(rest, it))
    if stream.varint() != 0:
        raise DeltaError("delta has a data-format section (not produced by otaguard)")
    to_pos = 0
    from_pos = 0
    idle = 0
    base.seek(0)
    while to_pos < to_size:
        diff_size = stream.varint()
        if not 0 <= diff_size <= to_size - to_pos:
            raise DeltaError(f"delta diff of {diff_size} bytes at {to_pos} overruns the image")
        if from_pos + diff_size > base_length:
            raise DeltaError(f"delta reads past the base's end at {from_pos + diff_size}")
        done = 0
        while done < diff_size:
            n = min(BLOCK, diff_size - done)
            patch = stream.read(n)
            old = base.read(n)
            if len(old) != n:
                raise DeltaError(f"the base is shorter than its {base_length} bytes")
            yield _add_bytes(patch, old)
            done += n
        from_pos += diff_size
        to_pos += diff_size
        extra_size = stream.varint()
        if not 0 <= extra_size <= to_size - to_pos:
            raise DeltaError(f"delta extra of {extra_size} bytes at {to_pos} overruns the image")
        idle = idle + 1 if diff_size == extra_size == 0 else 0
        if idle > MAX_IDLE_STEPS:
            raise DeltaError(f"delta makes no progress at byte {to_pos}")
        done = 0
        while done < extra_size:
            n = min(BLOCK, extra_size - done)
            yield stream.read(n)
            done += n
        to_pos += extra_size
        adjust = stream.varint()
        if not 0 <= from_pos + adjust <= base_length:
            raise DeltaError(f"delta moves outside the base (to {from_pos + adjust})")
        from_pos += adjust
        base.seek(from_pos, os.SEEK_SET)
    stream.finish()


def apply_delta(
    chunks: Iterable[bytes],
    *,
    base: BinaryIO,
    base_length: int,
    image_length: int,
    write: Callable[[bytes], object],
) -> int:
    """Rebuild an image into ``write`` (see :func:`decode_delta` for the arguments).

    Returns:
        The number of bytes written (``image_length``).

    Raises:
        DeltaError, OSError: as :func:`decode_delta`.
    """
    n = 0
    for out in decode_delta(chunks, base=base, base_length=base_length, image_length=image_length):
        write(out)
        n += len(out)
    return n


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest
