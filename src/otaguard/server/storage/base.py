"""Storage interfaces of the update server.

Routes and the publishing logic speak only to these interfaces; adapters
(:mod:`.sql`, :mod:`.files`) are the only modules that import a database or storage
library, and they translate foreign exceptions into :mod:`otaguard.model.errors` types.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # its module imports this one
    from otaguard.server.storage.monitoring import HealthNote

__all__ = [
    "MAX_BLOB_BYTES",
    "BlobInfo",
    "BlobStore",
    "BlobWriter",
    "CheckinRecord",
    "CheckinStore",
    "DeviceAlert",
    "DeviceRecord",
    "DeviceStanding",
    "DeviceState",
    "DeviceStore",
    "MetadataRecord",
    "MetadataStore",
    "NonceRecord",
    "PublishOutcome",
]

# Largest target blob accepted, upload or import: bounds disk use per request and keeps
# one hostile upload from filling the server. Firmware images are far below this.
MAX_BLOB_BYTES: Final = 4 * 1024**3


@dataclass(frozen=True)
class MetadataRecord:
    """One signed metadata file, stored as its exact bytes.

    ``filename`` is the versioned name (``3.snapshot.json``); timestamps are stored under
    ``<version>.timestamp.json`` and served as ``timestamp.json`` through the pointer.
    """

    filename: str
    role: str
    version: int
    data: bytes
    sha256: str


@dataclass(frozen=True)
class PublishOutcome:
    """What one publish transaction changed."""

    added: tuple[str, ...]
    unchanged: tuple[str, ...]
    timestamp_filename: str | None
    published_at: dt.datetime


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its name, length and verified sha256."""

    filename: str
    length: int
    sha256: str


class MetadataStore(ABC):
    """Signed metadata, immutable per versioned filename, plus the timestamp pointer."""

    @abstractmethod
    def get(self, filename: str) -> bytes | None:
        """Return the stored bytes of a versioned metadata file, or ``None``."""

    @abstractmethod
    def get_record(self, filename: str) -> MetadataRecord | None:
        """Return the stored record of a versioned metadata file, or ``None``."""

    @abstractmethod
    def current_timestamp(self) -> MetadataRecord | None:
        """Return the timestamp devices are served now, or ``None`` before the first publish."""

    @abstractmethod
    def newest(self, role: str) -> MetadataRecord | None:
        """Return the highest-version record of ``role`` (e.g. the newest root)."""

    def newest_version(self, role: str) -> int | None:
        """Return the highest stored version of ``role``, or ``None``.

        Cheap where the adapter can (no bytes read): callers compare it with the version
        they parsed last, to notice a publication by any server process.
        """
        newest = self.newest(role)
        return None if newest is None else newest.version

    @abstractmethod
    def publish(
        self,
        records: Sequence[MetadataRecord],
        *,
        timestamp: str | None,
        now: dt.datetime,
        expected_timestamp: str | None,
    ) -> PublishOutcome:
        """Insert ``records`` and move the timestamp pointer in one transaction.

        Args:
            records: metadata to insert; a record identical to a stored one is a no-op.
            timestamp: filename (one of ``records`` or already stored) the pointer moves to;
                ``None`` leaves the pointer alone.
            now: publication time recorded on new rows.
            expected_timestamp: the pointer value the caller based its checks on; the
                transaction is refused when another publish moved it meanwhile.

        Raises:
            ConflictError: the pointer moved concurrently (it is not
                ``expected_timestamp``); nothing was changed, the caller may re-check.
            VerificationError: a versioned file exists with different bytes (versioned
                metadata is immutable).
            ServerStorageError: the database failed; nothing was changed.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


class BlobWriter(ABC):
    """An in-progress blob upload; nothing is visible until :meth:`commit`."""

    @abstractmethod
    def write(self, chunk: bytes) -> None:
        """Append ``chunk``.

        Raises:
            VerificationError: the blob grew past its size cap.
            ServerStorageError: the storage failed.
        """

    @abstractmethod
    def commit(self) -> BlobInfo:
        """Verify the content against the hash in the name and make it visible.

        Raises:
            VerificationError: the content does not match its name; nothing is stored.
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard the upload (safe to call after :meth:`commit`)."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class BlobStore(ABC):
    """Target blobs, content-addressed by their consistent-snapshot name."""

    @abstractmethod
    def stat(self, filename: str) -> BlobInfo | None:
        """Return the stored blob's info, or ``None`` if absent."""

    @abstractmethod
    def local_path(self, filename: str) -> Path | None:
        """Return a local file path to serve the blob from, or ``None`` if absent."""

    @abstractmethod
    def writer(self, filename: str, *, max_length: int) -> BlobWriter:
        """Start storing a blob named ``<sha256>.<target path>``.

        Raises:
            VerificationError: the name is not a valid blob name.
        """

    def put_chunks(self, filename: str, chunks: Iterable[bytes], *, max_length: int) -> BlobInfo:
        """Store a blob from an iterable of chunks, verified against its name."""
        with self.writer(filename, max_length=max_length) as w:
            for chunk in chunks:
                w.write(chunk)
            return w.commit()


class DeviceState(StrEnum):
    """Where a device is in its life in the fleet registry."""

    #: added by an operator, holds an unused enrollment token, no certificate yet
    REGISTERED = "registered"
    #: holds a certificate the registry issued
    ENROLLED = "enrolled"
    #: temporarily refused (the operator may release it)
    QUARANTINED = "quarantined"
    #: permanently refused: cannot fetch, renew or enroll again
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    """One device of the fleet registry.

    Attributes:
        serial: the device serial (its certificates' subject CN).
        hardware_id: the hardware id put into its certificates.
        status: its :class:`DeviceState`.
        reason: why it was quarantined or revoked (empty otherwise).
        cert_serials: serial numbers (lowercase hex) of the certificates issued to it,
            oldest first.
        created_at: when it was added.
        updated_at: when its status or certificates last changed.
        certs_valid_until: when the last-expiring certificate issued to it expires
            (``None``: none issued). Factory enrollment is refused before that.
    """

    serial: str
    hardware_id: str
    status: DeviceState
    reason: str
    cert_serials: tuple[str, ...]
    created_at: dt.datetime
    updated_at: dt.datetime
    certs_valid_until: dt.datetime | None = None


@dataclass(frozen=True)
class DeviceStanding:
    """What the device gate reads on every device request (:meth:`DeviceStore.standing`).

    Attributes:
        serial: the device serial.
        hardware_id: its hardware id.
        status: its :class:`DeviceState`.
        reason: why it was quarantined or revoked (empty otherwise).
        cert_issued: whether the registry issued it the certificate asked about.
        attestation_key: the PEM of the TPM attestation key it registered, if any.
    """

    serial: str
    hardware_id: str
    status: DeviceState
    reason: str
    cert_issued: bool
    attestation_key: str | None


class DeviceStore(ABC):
    """The fleet registry: devices, their enrollment tokens and issued certificates.

    Tokens are stored as a hash only, bound to one serial, single use, with an expiry.
    """

    @abstractmethod
    def add(
        self,
        serial: str,
        hardware_id: str,
        *,
        token_hash: str,
        token_expires: dt.datetime,
        now: dt.datetime,
    ) -> DeviceRecord:
        """Register a device with an enrollment token (hash only).

        Raises:
            DeviceExistsError: the serial is already registered.
            ServerStorageError: the database failed.
        """

    @abstractmethod
    def get(self, serial: str) -> DeviceRecord | None:
        """Return the device with ``serial``, or ``None``."""

    @abstractmethod
    def standing(self, serial: str, *, cert_serial: str) -> DeviceStanding | None:
        """The device's status, whether ``cert_serial`` was issued to it, and its
        attestation key (``None``: no such device). One read whose cost does not grow
        with the certificates a device was issued.

        Raises:
            ServerStorageError: the database failed.
        """

    @abstractmethod
    def list(self) -> list[DeviceRecord]:
        """Return every device, by serial."""

    @abstractmethod
    def hardware_ids(self) -> set[str]:
        """Return the hardware ids of the registered devices (one read, whatever the
        fleet's size).

        Raises:
            ServerStorageError: the database failed.
        """

    @abstractmethod
    def status_counts(self) -> dict[DeviceState, int]:
        """Return how many devices are in each state (one read, whatever the fleet's
        size; states no device is in are absent).

        Raises:
            ServerStorageError: the database failed.
        """

    @abstractmethod
    def set_status(
        self, serial: str, status: DeviceState, *, reason: str, now: dt.datetime
    ) -> DeviceRecord:
        """Change a device's status (quarantine, release, revoke).

        Raises:
            UnknownDeviceError: no such device.
            OperatorError: the change is not allowed (a revoked device stays revoked).
        """

    @abstractmethod
    def new_token(
        self, serial: str, *, token_hash: str, token_expires: dt.datetime, now: dt.datetime
    ) -> DeviceRecord:
        """Give a device a new enrollment token; its earlier unused tokens stop working.

        Raises:
            UnknownDeviceError: no such device.
            OperatorError: the device is revoked.
        """

    @abstractmethod
    def redeem_token(self, serial: str, token_hash: str, *, now: dt.datetime) -> DeviceRecord:
        """Use an enrollment token up, once: it must be ``serial``'s, unused and unexpired.

        Raises:
            AccessDeniedError: unknown token, bound to another serial, already used,
                expired, or the device is revoked; the reason is in the message.
        """

    @abstractmethod
    def record_certificate(
        self, serial: str, cert_serial: str, *, not_after: dt.datetime, now: dt.datetime
    ) -> DeviceRecord:
        """Record a certificate issued to ``serial``; a registered device becomes enrolled.

        Raises:
            UnknownDeviceError: no such device.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class NonceRecord:
    """A check-in nonce the server issued.

    Attributes:
        nonce: the value (random, single use; not a secret: it is a challenge).
        serial: the device it was issued to (from its verified certificate).
        cert_serial: the certificate that asked for it.
        issued_at: when.
        expires_at: after this it is refused.
        used_at: when a check-in spent it, or ``None``.
    """

    nonce: str
    serial: str
    cert_serial: str
    issued_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None


@dataclass(frozen=True)
class CheckinRecord:
    """One check-in as the server recorded it (accepted or quarantining).

    Attributes:
        serial: the device.
        cert_serial: the certificate it came with.
        time: server time of the check-in.
        device_time: the device's clock, as reported (never trusted).
        running_version: version of the image the device booted (``recovery`` if none).
        target: name of the installed target ("" in recovery).
        boot_sha256: the last boot measurement.
        attested: whether a verified TPM quote backs the measurement.
        reset_count: the TPM's reset count in the quote, ``None`` without a TPM.
        outcome: ``accepted`` or ``quarantined``.
        detail: why it quarantined, or the device's last install result.
        manifest: the signed manifest envelope, exactly as received.
    """

    serial: str
    cert_serial: str
    time: dt.datetime
    device_time: str
    running_version: str
    target: str
    boot_sha256: str
    attested: bool
    reset_count: int | None
    outcome: str
    detail: str
    manifest: bytes


@dataclass(frozen=True)
class DeviceAlert:
    """Something the server saw that an operator must look at (stored, never lost)."""

    serial: str
    time: dt.datetime
    kind: str
    detail: str


class CheckinStore(ABC):
    """Check-in nonces, the check-in history, attestation keys and alerts.

    Behind an interface and in the database, so several server processes share them: a
    nonce issued by one is spent exactly once, by whichever process the check-in reaches.
    """

    @abstractmethod
    def issue_nonce(self, record: NonceRecord) -> None:
        """Store a new nonce (and forget expired ones); the certificate's unused nonces
        are bounded (:meth:`accept_checkin` replaces one, so it needs no bound)."""

    @abstractmethod
    def get_nonce(self, nonce: str) -> NonceRecord | None:
        """Return the nonce's record, or ``None`` if it was never issued (or is forgotten)."""

    @abstractmethod
    def spend_nonce(self, nonce: str, *, now: dt.datetime) -> bool:
        """Mark the nonce used, once: ``False`` when it was already used (a replay race)."""

    @abstractmethod
    def claim_nonce(
        self, nonce: str, *, serial: str, cert_serial: str, now: dt.datetime
    ) -> NonceRecord | None:
        """Spend the nonce if it is unused, unexpired and was issued to this serial and
        certificate, in one atomic step; return its record as it was before, or ``None``
        when any of that is not so (nothing changed; :meth:`get_nonce` says why)."""

    @abstractmethod
    def record_checkin(self, record: CheckinRecord) -> None:
        """Append a check-in to the device's history."""

    @abstractmethod
    def accept_checkin(
        self,
        record: CheckinRecord,
        *,
        nonce: str,
        next_nonce: NonceRecord,
        health: HealthNote | None,
    ) -> bool:
        """An accepted check-in, all or nothing: claim ``nonce`` as :meth:`claim_nonce`
        does (for the record's serial and certificate, at its time), append ``record``,
        issue ``next_nonce`` in the claimed one's place and write ``health`` to the
        device's health row (fleet monitoring, ADR 0026; ``None``: not monitored).
        ``False``: the nonce could not be claimed and nothing was written
        (:meth:`get_nonce` says why)."""

    @abstractmethod
    def history(self, serial: str, *, limit: int) -> list[CheckinRecord]:
        """The device's latest check-ins, newest first."""

    @abstractmethod
    def last_accepted(self, cert_serial: str) -> dt.datetime | None:
        """When the certificate ``cert_serial`` last checked in successfully, if ever."""

    @abstractmethod
    def attestation_key(self, serial: str) -> str | None:
        """The device's registered attestation key (PEM), or ``None``."""

    @abstractmethod
    def register_attestation_key(self, serial: str, public_pem: str, *, now: dt.datetime) -> bool:
        """Register the device's attestation key once: ``True`` if stored or the same key
        was registered before, ``False`` if another key is registered (refused)."""

    @abstractmethod
    def last_reset_count(self, serial: str) -> int | None:
        """The highest TPM reset count seen in a verified quote of the device."""

    @abstractmethod
    def add_alert(self, alert: DeviceAlert) -> None:
        """Store an alert."""

    @abstractmethod
    def alerts(self, serial: str, *, limit: int) -> list[DeviceAlert]:
        """The device's latest alerts, newest first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""
