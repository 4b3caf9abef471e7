"""The decoders as stream transforms: verified blob chunks in, slot bytes out.

The shape the streaming install (ADR 0017) puts between the verified network stream and
the slot: a callable from chunks to an iterator of bytes, with ``resumable`` telling
whether slot offset equals stream offset. A decoded image's offsets are not the blob's
(``resumable = False``): after an interruption the blob is fetched and decoded from its
first byte again, and only the slot's checkpointed prefix is kept (ADR 0021).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from otaguard.delta.apply import decode_delta
from otaguard.delta.zstd import decode_zstd

__all__ = ["DeltaTransform", "ZstdTransform"]


@dataclass
class ZstdTransform:
    """zstd blob -> image: ``image_length`` bytes, never more than ``slot_size``."""

    image_length: int
    slot_size: int | None = None
    resumable: bool = False

    def __call__(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Decode ``chunks`` (see :func:`otaguard.delta.zstd.decode_zstd`)."""
        return decode_zstd(chunks, image_length=self.image_length, slot_size=self.slot_size)


@dataclass
class DeltaTransform:
    """Delta blob + the active slot -> image."""

    open_base: Callable[[], BinaryIO]
    base_length: int
    image_length: int
    resumable: bool = False

    def __call__(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Apply ``chunks`` to the base (see :func:`otaguard.delta.apply.decode_delta`)."""
        with self.open_base() as base:
            yield from decode_delta(
                chunks, base=base, base_length=self.base_length, image_length=self.image_length
            )
