"""Pure types shared by every component. Imports nothing else of otaguard."""

from otaguard.model.errors import (
    ConfigError,
    DeviceStorageError,
    DowngradeError,
    InsecureModeWarning,
    KeyAccessError,
    OperatorError,
    OtaguardError,
    TransportError,
    VerificationError,
)
from otaguard.model.release import RELEASE_TYPES, ReleaseInfo
from otaguard.model.version import Version

__all__ = [
    "RELEASE_TYPES",
    "ConfigError",
    "DeviceStorageError",
    "DowngradeError",
    "InsecureModeWarning",
    "KeyAccessError",
    "OperatorError",
    "OtaguardError",
    "ReleaseInfo",
    "TransportError",
    "VerificationError",
    "Version",
]
