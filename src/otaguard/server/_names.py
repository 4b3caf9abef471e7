"""File names the server accepts, as strict patterns.

Every name that reaches the filesystem or the database passes one of these patterns
first, so a request can never name a path outside the stores (no slashes, no ``..``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from otaguard.model.errors import VerificationError
from otaguard.model.names import TARGET_NAME_PATTERN

__all__ = [
    "BLOB_NAME_RE",
    "METADATA_NAME_RE",
    "MetadataName",
    "blob_name",
    "parse_blob_name",
    "parse_metadata_name",
]

# Target paths follow the one rule the release tool also applies (otaguard.model.names).
_COMPONENT: Final = TARGET_NAME_PATTERN
# Versions are bounded so that an int() of them is cheap and fits a BIGINT column.
METADATA_NAME_RE: Final = re.compile(
    r"^(?:(?P<version>[1-9][0-9]{0,17})\.)?(?P<role>[A-Za-z0-9][A-Za-z0-9_-]{0,63})\.json$"
)
BLOB_NAME_RE: Final = re.compile(rf"^(?P<sha256>[0-9a-f]{{64}})\.(?P<path>{_COMPONENT})$")
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
