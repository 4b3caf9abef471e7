"""Errors, modelled by whose fault they are.

Hierarchy (exit code of the CLI in brackets)::

    OtaguardError                 base; ``diagnostics()`` is the one line a user sees
    ├── VerificationError   [3]   bad or malicious data: signatures, hashes, lengths, expiry
    │   ├── DowngradeError        validly signed but older than what the device runs
    │   ├── HybridPolicyError     a role root marks hybrid lacks a valid classical or a
    │   │                         valid ML-DSA signature (on top of its threshold)
    │   ├── DirectorMetadataError the director's instruction failed verification
    │   │                         (signature, expiry, another nonce or device)
    │   └── DirectorMismatchError the director names an image the image repository
    │                             does not back (absent, other length/hashes/hardware)
    ├── TransportError      [4]   the network or a server misbehaved; retrying may help
    ├── RetryLaterError    [75]   nothing is wrong, but not now: a concurrent change won,
    │   ├── ConflictError         or the other side is not ready; retry soon
    │   ├── NotReadyError
    │   └── StopRequestedError    the agent was asked to stop; an install resumes later
    ├── AccessDeniedError  [77]   who is asking was refused: a wrong, used or expired
    │                             enrollment token, a revoked or quarantined device, a
    │                             client certificate the server did not issue
    ├── OperatorError       [2]   misuse: wrong arguments, missing files, wrong passphrase
    │   ├── ConfigError           a config, key or trust file is unreadable or invalid
    │   ├── AddressInUseError [78] the server's address is taken (another process listens)
    │   ├── KeyAccessError        a private key cannot be unlocked (wrong passphrase)
    │   ├── UnknownDeviceError    the fleet registry has no device with that serial
    │   ├── DeviceExistsError     the serial is already registered
    │   ├── StateConflictError    well formed, but the resource's state forbids it
    │   │                         (a revoked device, the built-in group, a limit)
    │   └── NotEnrolledError      the device has no certificate yet (run device enroll)
    └── StorageError        [5]   our own storage failed underneath us
        ├── DeviceStorageError    the device's (disk full, unwritable slot)
        └── ServerStorageError    the server's (database, blob directory)

Foreign exceptions (tuf, securesystemslib, OSError, urllib3, SQLAlchemy) are translated
into these at adapter boundaries with ``raise ... from e``; logic never catches bare
``Exception``.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AddressInUseError",
    "ConfigError",
    "ConflictError",
    "DeviceExistsError",
    "DeviceStorageError",
    "DirectorMetadataError",
    "DirectorMismatchError",
    "DowngradeError",
    "HybridPolicyError",
    "InsecureModeWarning",
    "KeyAccessError",
    "NotEnrolledError",
    "NotReadyError",
    "OperatorError",
    "OtaguardError",
    "RetryLaterError",
    "ServerStorageError",
    "StateConflictError",
    "StopRequestedError",
    "StorageError",
    "TransportError",
    "UnknownDeviceError",
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


class HybridPolicyError(VerificationError):
    """Metadata of a role its root marks hybrid lacks a valid classical (Ed25519/ECDSA) or a
    valid ML-DSA signature by that role's keys, though it may meet the threshold."""

    @property
    def kind(self) -> str:
        return "hybrid signature policy not met"


class DirectorMetadataError(VerificationError):
    """The director's instruction is not signed by its root's targets keys, expired, or
    answers another check-in (nonce) or device."""

    @property
    def kind(self) -> str:
        return "director instruction refused"


class DirectorMismatchError(VerificationError):
    """The director names an image the image repository does not list identically.

    A stolen director key can choose only among images the offline keys signed; this is
    that rule refusing something else (Uptane full verification).
    """

    @property
    def kind(self) -> str:
        return "director and image repository disagree"


class TransportError(OtaguardError):
    """Network or server failure; the data was not judged."""

    exit_code = 4

    @property
    def kind(self) -> str:
        return "transport error"


class RetryLaterError(OtaguardError):
    """Nobody's fault: a concurrent change won, or the other side is not ready yet."""

    exit_code = 75  # EX_TEMPFAIL

    @property
    def kind(self) -> str:
        return "try again"


class ConflictError(RetryLaterError):
    """A concurrent publication changed the repository first (HTTP 409); retry."""

    @property
    def kind(self) -> str:
        return "conflict, try again"


class NotReadyError(RetryLaterError):
    """The other side is not ready yet (a repository mid-write, a server starting)."""

    @property
    def kind(self) -> str:
        return "not ready, try again"


class StopRequestedError(RetryLaterError):
    """The agent was asked to stop (SIGTERM) mid-way; a persisted install resumes later."""

    @property
    def kind(self) -> str:
        return "stopped"


class OperatorError(OtaguardError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(OperatorError):
    """A configuration, trust-anchor or key file is missing, unreadable or invalid."""

    @property
    def kind(self) -> str:
        return "configuration error"


class AddressInUseError(OperatorError):
    """The server cannot listen: another process holds its address and port.

    An operator's fix (stop the other process, or choose another port), with an exit code
    of its own (EX_CONFIG) so a supervisor tells it from refused data or a crash.
    """

    exit_code = 78

    @property
    def kind(self) -> str:
        return "address in use"


class KeyAccessError(OperatorError):
    """A private key could not be unlocked."""

    @property
    def kind(self) -> str:
        return "key error"


class UnknownDeviceError(OperatorError):
    """The fleet registry has no device with the given serial (HTTP 404)."""

    @property
    def kind(self) -> str:
        return "unknown device"


class DeviceExistsError(OperatorError):
    """A device with the given serial is already registered (HTTP 409)."""

    @property
    def kind(self) -> str:
        return "device exists"


class StateConflictError(OperatorError):
    """The request is well formed, but the state of what it names forbids it (HTTP 409):
    a revoked device, the built-in group, an operator already revoked, a limit reached."""

    @property
    def kind(self) -> str:
        return "conflict"


class NotEnrolledError(OperatorError):
    """The device has no (usable) certificate: it must enroll with a token first."""

    @property
    def kind(self) -> str:
        return "not enrolled"


class AccessDeniedError(OtaguardError):
    """The caller's identity or credential was refused (HTTP 401/403).

    Enrollment tokens that are wrong, used, expired or bound to another serial; devices
    that are revoked or quarantined; certificates the registry did not issue.
    """

    exit_code = 77  # EX_NOPERM

    @property
    def kind(self) -> str:
        return "access denied"


class StorageError(OtaguardError):
    """Our own storage failed underneath us; the request or data was not judged."""

    exit_code = 5

    @property
    def kind(self) -> str:
        return "storage error"


class DeviceStorageError(StorageError):
    """The device's storage failed underneath us (ENOSPC, EROFS, EACCES, EIO)."""


class ServerStorageError(StorageError):
    """The server's own storage (database, blob directory) failed; maps to HTTP 503."""

    @property
    def kind(self) -> str:
        return "server storage error"


class InsecureModeWarning(UserWarning):
    """Emitted on every use of a development-only insecure mode."""
