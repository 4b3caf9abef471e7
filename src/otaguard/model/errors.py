"""Errors, modelled by whose fault they are.

Hierarchy::

    OtaguardError                 base; ``diagnostics()`` is the one line a user sees
    ├── VerificationError         bad or malicious data: signatures, hashes, lengths, expiry
    │   └── DowngradeError        validly signed but older than what the device runs
    ├── TransportError            the network or a server misbehaved; retrying may help
    ├── OperatorError             misuse: wrong arguments, missing files, wrong passphrase
    │   ├── ConfigError           a config, key or trust file is unreadable or invalid
    │   └── KeyAccessError        a private key cannot be unlocked (wrong passphrase)
    └── DeviceStorageError        the device's own storage failed (disk full, unwritable slot)

Foreign exceptions (tuf, securesystemslib, OSError, urllib3) are translated into these
at adapter boundaries with ``raise ... from e``; logic never catches bare ``Exception``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeviceStorageError",
    "DowngradeError",
    "InsecureModeWarning",
    "KeyAccessError",
    "OperatorError",
    "OtaguardError",
    "TransportError",
    "VerificationError",
]


class OtaguardError(Exception):
    """Base of every error otaguard raises on purpose."""

    #: process exit code the CLI maps this error to
    exit_code = 1

    def diagnostics(self) -> str:
        """Return the single line shown to the user (no traceback, no secrets)."""
        text = " ".join(str(self).split())
        return f"{self.kind}: {text}" if text else self.kind

    @property
    def kind(self) -> str:
        """Short human name of the error class."""
        return "error"


class VerificationError(OtaguardError):
    """Data failed verification: it is malformed, forged, tampered with or expired."""

    exit_code = 3

    @property
    def kind(self) -> str:
        return "verification failed"


class DowngradeError(VerificationError):
    """A validly signed image is older (version or security counter) than the running one."""

    @property
    def kind(self) -> str:
        return "downgrade refused"


class TransportError(OtaguardError):
    """Network or server failure; the data was not judged."""

    exit_code = 4

    @property
    def kind(self) -> str:
        return "transport error"


class OperatorError(OtaguardError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(OperatorError):
    """A configuration, trust-anchor or key file is missing, unreadable or invalid."""

    @property
    def kind(self) -> str:
        return "configuration error"


class KeyAccessError(OperatorError):
    """A private key could not be unlocked."""

    @property
    def kind(self) -> str:
        return "key error"


class DeviceStorageError(OtaguardError):
    """The device's storage failed underneath us (ENOSPC, EROFS, EACCES, EIO)."""

    exit_code = 5

    @property
    def kind(self) -> str:
        return "storage error"


class InsecureModeWarning(UserWarning):
    """Emitted on every use of a development-only insecure mode."""
