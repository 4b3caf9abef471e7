"""Transfer encodings of a release: the compressed blob and the deltas an image offers.

An image target may list, in its ``custom``, smaller ways to obtain the same bytes::

    "compressed": {"path": "fw-1.1.0.img.zst", "format": "zstd",
                   "hashes": {"sha256": "…"}, "length": 1234}
    "deltas": [{"base_version": "1.0.0", "base_sha256": "…", "base_length": 4096,
                "path": "fw-1.1.0.img.from-1.0.0.delta", "format": "detools-lzma",
                "hashes": {"sha256": "…"}, "length": 321}]

Each encoded blob is a TUF target of its own (its length and hash signed by targets, its
``custom`` ``{"transfer_of": <image target>}``), so a device downloads it through the same
verified path as the image, and the image target's hashes still decide what is installed:
an encoding only changes how the bytes travel, never what they must be.

Pure: parsing and validation only, :class:`ValueError` on malformed input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from otaguard.model.names import check_target_name
from otaguard.model.sbom import is_sbom_target
from otaguard.model.version import Version

__all__ = [
    "COMPRESSED_KEY",
    "COMPRESSION_FORMATS",
    "DELTAS_KEY",
    "DELTA_FORMATS",
    "MAX_DELTAS",
    "TRANSFER_OF_KEY",
    "DeltaRef",
    "EncodedRef",
    "Encodings",
    "is_auxiliary_target",
    "is_transfer_target",
]

#: the image target's ``custom`` key naming its compressed blob
COMPRESSED_KEY: Final = "compressed"
#: the image target's ``custom`` key listing its deltas
DELTAS_KEY: Final = "deltas"
#: an encoded blob's ``custom`` key naming the image it encodes
TRANSFER_OF_KEY: Final = "transfer_of"
#: compressed formats a device can decode (zstd frames, streaming, bounded window)
COMPRESSION_FORMATS: Final = ("zstd",)
#: delta formats a device can apply (detools sequential bsdiff, lzma-compressed; chosen
#: by measurement, see docs/adr/0018-compressed-and-delta-updates.md)
DELTA_FORMATS: Final = ("detools-lzma",)
# More bases than this is not a release but a way to make devices parse a long list;
# a fleet runs a handful of versions at once.
MAX_DELTAS: Final = 16
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
# A blob or base beyond this is not a firmware image (1 TiB).
_MAX_LENGTH: Final = 1 << 40


def _sha256(raw: Any, what: str) -> str:
    if not isinstance(raw, str) or _SHA256.fullmatch(raw) is None:
        raise ValueError(f"{what} must be 64 lowercase hex digits")
    return raw


def _length(raw: Any, what: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 < raw <= _MAX_LENGTH:
        raise ValueError(f"{what} must be an integer between 1 and {_MAX_LENGTH}")
    return int(raw)


@dataclass(frozen=True)
class EncodedRef:
    """An encoded blob: which target, which format, which bytes."""

    path: str
    format: str
    sha256: str
    length: int

    def __post_init__(self) -> None:
        check_target_name(self.path)
        _sha256(self.sha256, "encoded blob sha256")
        _length(self.length, "encoded blob length")

    @classmethod
    def _parse(cls, raw: Any, formats: tuple[str, ...], extra: frozenset[str]) -> EncodedRef:
        if (
            not isinstance(raw, Mapping)
            or set(raw) != {"path", "format", "hashes", "length"} | extra
        ):
            raise ValueError("an encoding must be an object of path, format, hashes, length")
        hashes = raw["hashes"]
        if not isinstance(hashes, Mapping):
            raise ValueError("an encoding's hashes must be an object")  # noqa: TRY004 - callers catch ValueError
        if raw["format"] not in formats:
            raise ValueError(f"unknown encoding format {str(raw['format'])[:40]!r}")
        if not isinstance(raw["path"], str):
            raise ValueError("an encoding's path must be a string")  # noqa: TRY004 - as above
        return cls(raw["path"], raw["format"], _sha256(hashes.get("sha256"), "sha256"),
                   _length(raw["length"], "length"))  # fmt: skip

    @classmethod
    def from_custom(cls, raw: Any) -> EncodedRef:
        """Parse the ``compressed`` value of an image target's ``custom``.

        Raises:
            ValueError: malformed or an unknown format.
        """
        return cls._parse(raw, COMPRESSION_FORMATS, frozenset())

    def to_custom(self) -> dict[str, Any]:
        """The value for an image target's ``custom``."""
        return {
            "path": self.path,
            "format": self.format,
            "hashes": {"sha256": self.sha256},
            "length": self.length,
        }


@dataclass(frozen=True)
class DeltaRef:
    """A delta from one base image (by version and exact bytes) to the image."""

    base_version: Version
    base_sha256: str
    base_length: int
    blob: EncodedRef

    def __post_init__(self) -> None:
        _sha256(self.base_sha256, "delta base_sha256")
        _length(self.base_length, "delta base_length")

    @classmethod
    def from_custom(cls, raw: Any) -> DeltaRef:
        """Parse one entry of the ``deltas`` list.

        Raises:
            ValueError: malformed or an unknown format.
        """
        base_keys = frozenset({"base_version", "base_sha256", "base_length"})
        blob = EncodedRef._parse(raw, DELTA_FORMATS, base_keys)
        if not isinstance(raw["base_version"], str):
            raise ValueError("delta base_version must be a string")  # noqa: TRY004 - as above
        return cls(
            Version.parse(raw["base_version"]),
            _sha256(raw["base_sha256"], "delta base_sha256"),
            _length(raw["base_length"], "delta base_length"),
            blob,
        )

    def to_custom(self) -> dict[str, Any]:
        """The entry for an image target's ``deltas`` list."""
        return {
            "base_version": str(self.base_version),
            "base_sha256": self.base_sha256,
            "base_length": self.base_length,
            **self.blob.to_custom(),
        }


@dataclass(frozen=True)
class Encodings:
    """What an image target offers besides its full bytes."""

    compressed: EncodedRef | None = None
    deltas: tuple[DeltaRef, ...] = ()

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any] | None) -> Encodings:
        """Parse the transfer fields of an image target's ``custom`` (absent: none).

        Raises:
            ValueError: a field is present but malformed (a device then ignores the
                encodings and downloads the full image).
        """
        if not isinstance(custom, Mapping):
            return cls()
        raw_c = custom.get(COMPRESSED_KEY)
        raw_d = custom.get(DELTAS_KEY, [])
        if not isinstance(raw_d, list) or len(raw_d) > MAX_DELTAS:
            raise ValueError(f"deltas must be a list of at most {MAX_DELTAS}")
        return cls(
            None if raw_c is None else EncodedRef.from_custom(raw_c),
            tuple(DeltaRef.from_custom(d) for d in raw_d),
        )

    def to_custom(self) -> dict[str, Any]:
        """The transfer fields to merge into an image target's ``custom``."""
        out: dict[str, Any] = {}
        if self.compressed is not None:
            out[COMPRESSED_KEY] = self.compressed.to_custom()
        if self.deltas:
            out[DELTAS_KEY] = [d.to_custom() for d in self.deltas]
        return out

    def delta_for(self, base_sha256: str) -> DeltaRef | None:
        """The delta whose base is exactly the image ``base_sha256``, if any."""
        return next((d for d in self.deltas if d.base_sha256 == base_sha256), None)


def is_transfer_target(custom: Any) -> bool:
    """True when a target's ``custom`` marks it as an encoded blob of an image."""
    return isinstance(custom, Mapping) and TRANSFER_OF_KEY in custom


def is_auxiliary_target(custom: Any) -> bool:
    """True for targets that travel with an image but are not one (SBOM, encodings)."""
    return is_sbom_target(custom) or is_transfer_target(custom)
