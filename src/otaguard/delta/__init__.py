"""Compressed and delta transfer of firmware images (ADR 0018).

Pure decoders a device runs on bytes as they arrive (:func:`decompress_image`,
:func:`apply_delta`: bounded memory, hostile input refused with one clear error), and
the builders the release tooling runs (:mod:`otaguard.delta.build`).
"""

from otaguard.delta.apply import DeltaError, apply_delta, decode_delta
from otaguard.delta.zstd import CompressedImageError, decode_zstd, decompress_image

__all__ = [
    "CompressedImageError",
    "DeltaError",
    "apply_delta",
    "decode_delta",
    "decode_zstd",
    "decompress_image",
]
