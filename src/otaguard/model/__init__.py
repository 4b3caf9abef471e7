"""Pure types shared by every component. Imports nothing else of otaguard."""

from otaguard.model.errors import (
    ConfigError,
    ConflictError,
    DeviceStorageError,
    DowngradeError,
    InsecureModeWarning,
    KeyAccessError,
    NotReadyError,
    OperatorError,
    OtaguardError,
    RetryLaterError,
    ServerStorageError,
    StopRequestedError,
    StorageError,
    TransportError,
    VerificationError,
)
from otaguard.model.names import check_hardware_id, check_target_name
from otaguard.model.release import RELEASE_TYPES, ReleaseInfo
from otaguard.model.unsafe import Unsafe
from otaguard.model.version import Version

__all__ = [
    "RELEASE_TYPES",
    "ConfigError",
    "ConflictError",
    "DeviceStorageError",
    "DowngradeError",
    "InsecureModeWarning",
    "KeyAccessError",
    "NotReadyError",
    "OperatorError",
    "OtaguardError",
    "ReleaseInfo",
    "RetryLaterError",
    "ServerStorageError",
    "StopRequestedError",
    "StorageError",
    "TransportError",
    "Unsafe",
    "VerificationError",
    "Version",
    "check_hardware_id",
    "check_target_name",
]
