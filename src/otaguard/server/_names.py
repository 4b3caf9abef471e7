"""File names the server accepts, as strict patterns.

Every name that reaches the filesystem or the database passes one of these patterns
first, so a request can never name a path outside the stores (no slashes, no ``..``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from otaguard.model.errors import VerificationError
from otaguard.model.names import MAX_TARGET_NAME, TARGET_NAME_PATTERN

__all__ = [
    "BLOB_NAME_PATTERN",
    "BLOB_NAME_RE",
    "MAX_BLOB_NAME",
    "MAX_METADATA_NAME",
    "METADATA_NAME_PATTERN",
    "METADATA_NAME_RE",
    "MetadataName",
    "blob_name",
    "parse_blob_name",
    "parse_metadata_name",
]

# Target paths follow the one rule the release tool also applies (otaguard.model.names).
_COMPONENT: Final = TARGET_NAME_PATTERN
# Versions are bounded so that an int() of them is cheap and fits a BIGINT column.
_MAX_VERSION_DIGITS: Final = 18
_MAX_ROLE: Final = 64
METADATA_NAME_RE: Final = re.compile(
    rf"^(?:(?P<version>[1-9][0-9]{{0,{_MAX_VERSION_DIGITS - 1}}})\.)?"
    rf"(?P<role>[A-Za-z0-9][A-Za-z0-9_-]{{0,{_MAX_ROLE - 1}}})\.json$"
)
#: the longest metadata name: "<18 digits>.<64-character role>.json"
MAX_METADATA_NAME: Final = _MAX_VERSION_DIGITS + 1 + _MAX_ROLE + len(".json")
BLOB_NAME_RE: Final = re.compile(rf"^(?P<sha256>[0-9a-f]{{64}})\.(?P<path>{_COMPONENT})$")
#: the longest blob name: "<64 hex digits>.<target name>"
MAX_BLOB_NAME: Final = 64 + 1 + MAX_TARGET_NAME


def _ecma(pattern: re.Pattern[str]) -> str:
    """``pattern`` without Python's named groups: the dialect JSON Schema uses (ECMA 262)."""
    return re.sub(r"\(\?P<\w+>", "(", pattern.pattern)


# The same rules as the OpenAPI schema states them, so a client learns from the schema
# exactly which names the server can answer.
METADATA_NAME_PATTERN: Final = _ecma(METADATA_NAME_RE)
BLOB_NAME_PATTERN: Final = _ecma(BLOB_NAME_RE)
TARGET_PATH_RE: Final = re.compile(rf"^{_COMPONENT}$")


@dataclass(frozen=True)
class MetadataName:
    """A parsed metadata file name: ``[<version>.]<role>.json``."""

    filename: str
    role: str
    version: int | None


def parse_metadata_name(filename: str) -> MetadataName | None:
    """Parse ``filename`` as a metadata file name; ``None`` when it is not one."""
    m = METADATA_NAME_RE.fullmatch(filename)
    if m is None:
        return None
    version = m.group("version")
    return MetadataName(filename, m.group("role"), int(version) if version else None)


def parse_blob_name(filename: str) -> tuple[str, str] | None:
    """Split a consistent-snapshot blob name into ``(sha256 hex, target path)``."""
    m = BLOB_NAME_RE.fullmatch(filename)
    if m is None:
        return None
    return m.group("sha256"), m.group("path")


def blob_name(sha256_hex: str, target_path: str) -> str:
    """Return the blob name of a target, checking both parts.

    Raises:
        VerificationError: the hash or the path cannot be served (e.g. a path with a slash).
    """
    name = f"{sha256_hex.lower()}.{target_path}"
    if BLOB_NAME_RE.fullmatch(name) is None:
        raise VerificationError(f"target {target_path!r} has no servable name")
    return name
