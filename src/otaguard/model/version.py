"""Semantic versions (https://semver.org), compared by precedence."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering
from typing import Final

__all__ = ["MAX_VERSION_LENGTH", "VERSION_PATTERN", "Version"]

# ASCII digits only (Python's \d also matches other scripts' digits), and the pattern is
# what the server's OpenAPI schema states for version fields (ECMA 262 reads it the same).
VERSION_PATTERN: Final = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SEMVER = re.compile(VERSION_PATTERN)
# Versions are compared component-wise; bound their size so a hostile string cannot
# make comparisons expensive.
MAX_VERSION_LENGTH: Final = 64


@total_ordering
@dataclass(frozen=True)
class Version:
    """A parsed semantic version; build metadata is ignored for precedence."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``X.Y.Z[-pre][+build]``.

        Raises:
            ValueError: ``text`` is not a semantic version.
        """
        if not isinstance(text, str) or len(text) > MAX_VERSION_LENGTH:
            raise ValueError(f"invalid version {text!r}: expected X.Y.Z")
        m = _SEMVER.fullmatch(text)
        if not m:
            raise ValueError(f"invalid version {text!r}: expected X.Y.Z")
        pre = tuple(m.group(4).split(".")) if m.group(4) else ()
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
        # A release sorts above all its pre-releases; numeric identifiers sort below
        # alphanumeric ones (semver §11).
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}-{'.'.join(self.prerelease)}" if self.prerelease else core
