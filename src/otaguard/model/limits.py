"""Limits a device applies to repository metadata, shared by the agent and the server.

The server refuses a publication that a device would refuse to download, so both read
these from one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["MAX_ROOT_ROTATIONS", "METADATA_MAX_LENGTHS"]

# python-tuf's defaults assume Ed25519; hybrid roles carry ML-DSA-65 keys (1952 B) and
# signatures (3309 B), hex-encoded, so the caps are raised with room for key rotation.
# A device downloads at most this many bytes per role when the parent names no length.
METADATA_MAX_LENGTHS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "root": 1024 * 1024,
        "timestamp": 64 * 1024,
        "snapshot": 4 * 1024 * 1024,
        "targets": 16 * 1024 * 1024,
    }
)
# A device stops following root rotations after this many new roots in one refresh
# (python-tuf's UpdaterConfig default); a longer history would leave devices behind.
MAX_ROOT_ROTATIONS: Final = 256
