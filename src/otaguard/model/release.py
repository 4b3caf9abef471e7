"""The ``custom`` fields a firmware target carries, parsed and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from otaguard.model.errors import VerificationError
from otaguard.model.names import check_hardware_id
from otaguard.model.sbom import SBOM_CUSTOM_KEY, SbomRef
from otaguard.model.version import Version

__all__ = ["MAX_HARDWARE_IDS", "MAX_SECURITY_COUNTER", "RELEASE_TYPES", "ReleaseInfo"]

RELEASE_TYPES: Final = ("security", "feature")
# A hardware id list longer than this is not a firmware target but an attempt to
# make every device consider the image.
MAX_HARDWARE_IDS: Final = 64
# Fits a TPM NV counter (64 bit) with headroom; larger values are hostile.
MAX_SECURITY_COUNTER: Final = 2**63 - 1


@dataclass(frozen=True)
class ReleaseInfo:
    """What a device needs to know about a firmware image, beyond length and hashes."""

    version: Version
    security_counter: int
    hardware_ids: tuple[str, ...]
    release_type: str
    #: the SBOM target this image's custom binds (``None`` only in targets published
    #: before SBOMs existed: release tooling requires one, devices refuse to install
    #: an image without one)
    sbom: SbomRef | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.security_counter <= MAX_SECURITY_COUNTER:
            raise ValueError(f"security counter {self.security_counter} out of range")
        if not self.hardware_ids or len(self.hardware_ids) > MAX_HARDWARE_IDS:
            raise ValueError("a release needs between 1 and 64 hardware ids")
        for hw in self.hardware_ids:
            check_hardware_id(hw)
        if self.release_type not in RELEASE_TYPES:
            raise ValueError(f"release type must be one of {RELEASE_TYPES}")

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any] | None) -> ReleaseInfo:
        """Parse a target's ``custom`` field.

        Raises:
            VerificationError: the field is missing or malformed.
        """
        if not isinstance(custom, Mapping):
            raise VerificationError("target has no otaguard custom fields")
        try:
            counter = custom["security_counter"]
            hw = custom["hardware_ids"]
            if isinstance(counter, bool) or not isinstance(counter, int):
                raise TypeError("security_counter must be an integer")
            if not isinstance(hw, list) or not all(isinstance(h, str) for h in hw):
                raise TypeError("hardware_ids must be a list of strings")
            sbom = custom.get(SBOM_CUSTOM_KEY)
            return cls(
                version=Version.parse(custom["version"]),
                security_counter=counter,
                hardware_ids=tuple(hw),
                release_type=custom["release_type"],
                sbom=None if sbom is None else SbomRef.from_custom(sbom),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise VerificationError(f"invalid target custom fields: {e}") from e

    def to_custom(self) -> dict[str, Any]:
        """Serialise for a TUF target's ``custom`` field."""
        custom: dict[str, Any] = {
            "version": str(self.version),
            "security_counter": self.security_counter,
            "hardware_ids": list(self.hardware_ids),
            "release_type": self.release_type,
        }
        if self.sbom is not None:
            custom[SBOM_CUSTOM_KEY] = self.sbom.to_custom()
        return custom
