"""The device facade used by the CLI, the demo and tests."""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import random
import shutil
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from cryptography import x509
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from otaguard._fs import atomic_write_bytes
from otaguard.agent.attack_flags import flag_for, record_flag
from otaguard.agent.blockdev import BlockDeviceSlots
from otaguard.agent.boot import BootRecord, boot, read_booted
from otaguard.agent.bootcfg import BootloaderSpec
from otaguard.agent.checkin import CheckinResult, check_in
from otaguard.agent.config import DeviceConfig, DevicePaths, parse_mqtt_url
from otaguard.agent.director import (
    DirectorInstruction,
    follow_director_root,
    match_image_repository,
    verify_director_targets,
)
from otaguard.agent.fetcher import Fetcher, TlsFetcher, create_ssl_context
from otaguard.agent.hwboot import HardwareBoot, RebootPending
from otaguard.agent.identity import (
    DeviceKeyStore,
    device_signer,
    enroll,
    enroll_with_factory_certificate,
    key_store_for,
    load_identity,
    present_identity,
    renew_if_due,
)
from otaguard.agent.install import Action, HealthResult, InstallState, Phase
from otaguard.agent.installer import Installer, ProgressFn, file_sha256
from otaguard.agent.monotonic import FileMonotonicStore, Floor, MonotonicStore
from otaguard.agent.self_measure import SelfMeasurement
from otaguard.agent.slots import BootEnv, FileSlots, SlotBackend, SlotImage, other_slot
from otaguard.agent.telemetry import build_report, note_boot, send_report
from otaguard.agent.updater import Selection, TufSession, select_update
from otaguard.crypto.keys import warn_insecure
from otaguard.model.director import MAX_DIRECTOR_ROOT_BYTES
from otaguard.model.errors import (
    ConfigError,
    DeviceStorageError,
    DirectorMetadataError,
    DowngradeError,
    OperatorError,
    OtaguardError,
    StopRequestedError,
    TransportError,
    VerificationError,
)
from otaguard.model.names import check_device_serial, check_hardware_id
from otaguard.model.telemetry import Telemetry
from otaguard.model.unsafe import Unsafe
from otaguard.model.version import Version

if TYPE_CHECKING:
    from otaguard.agent.daemon import MqttLink

__all__ = [
    "Device",
    "DeviceStatus",
    "MarkGoodResult",
    "UpdateResult",
    "read_trust_file",
    "validate_root",
]

logger = logging.getLogger(__name__)

# Trust anchors are small; a bigger file is not what the operator meant to provision.
MAX_TRUST_FILE_BYTES: Final = 1024 * 1024
#: where the server serves the director's root versions (rotations), device API
DIRECTOR_ROOT_PATH: Final = "/api/v1/device/director/{version}.root.json"


@dataclass(frozen=True)
class DeviceStatus:
    """A snapshot of a device's state for display."""

    hardware_id: str
    booted: BootRecord | None
    bootenv: BootEnv
    floor: Floor
    install: InstallState


@dataclass(frozen=True)
class MarkGoodResult:
    """The outcome of ``mark-good``."""

    #: "updated" (the new slot committed) | "rolled-back" (the bootloader fell back; the
    #: failed slot is marked bad) | "confirmed" (no install waited: the running slot was
    #: confirmed) | "pending" (the install could not finish yet)
    outcome: str
    slot: str
    version: str
    detail: str


@dataclass
class UpdateResult:
    """The outcome of one ``update``."""

    #: "updated" | "recovered" | "up-to-date" | "rolled-back" | "recovery-pending"
    outcome: str
    from_version: str
    to_version: str | None = None
    detail: str = ""
    refused: list[tuple[str, str]] = field(default_factory=list)


def read_trust_file(path: Path, what: str) -> bytes:
    """Read a provisioned trust file (root, director root, CA), bounded in size.

    Raises:
        ConfigError: missing, unreadable or too large (named by ``what``).
    """
    try:
        if path.stat().st_size > MAX_TRUST_FILE_BYTES:
            raise ConfigError(f"{what} {path} is too large")
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e


def validate_root(data: bytes, source: Path) -> Metadata[Root]:
    """Parse root metadata and check it is signed by a threshold of its own keys."""
    try:
        md = Metadata[Root].from_bytes(data)
    except (DeserializationError, ValueError) as e:
        raise ConfigError(f"{source} is not valid TUF root metadata") from e
    if not isinstance(md.signed, Root):
        raise ConfigError(f"{source} is not root metadata")
    result = md.signed.get_root_verification_result(None, md.signed_bytes, md.signatures)
    if not result.verified:
        raise ConfigError(f"{source} is not signed by a threshold of its own root keys")
    return md


def _read_director_root(path: Path | None) -> bytes | None:
    """The director root to provision (validated), ``None`` without a director."""
    if path is None:
        return None
    data = read_trust_file(path, "director root metadata")
    validate_root(data, path)
    return data


def _write_trust_anchors(
    paths: DevicePaths, root: bytes, director_root: bytes | None, ca: bytes
) -> None:
    atomic_write_bytes(paths.trusted_root, root)
    if director_root is not None:
        atomic_write_bytes(paths.director_root, director_root)
    atomic_write_bytes(paths.ca, ca)


def _create_floor(paths: DevicePaths, floor: Floor, tpm_tcti: str | None) -> None:
    """Create the anti-rollback store at the factory floor: the TPM's counters, or the file."""
    if tpm_tcti is None:
        FileMonotonicStore.create(paths.monotonic, floor)
        return
    from otaguard.agent.tpm import TpmMonotonicStore  # tpm2-pytss only when used

    TpmMonotonicStore.provision(tpm_tcti, paths.monotonic, floor)


class Device:
    """One device directory: configuration, trust anchors, slots and state."""

    def __init__(
        self,
        directory: Path,
        *,
        fetcher_factory: Callable[[], Fetcher] | None = None,
        after_action: Callable[[Action], None] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
    ):
        """Open a provisioned device directory.

        Args:
            directory: the device directory.
            fetcher_factory: the network seam; default a :class:`TlsFetcher` to the
                configured server (tests pass an in-memory repository).
            after_action: called after every install action (power-cut tests).
            config_overrides: :class:`DeviceConfig` fields over ``config.json`` (the
                operator's agent.toml: the bootloader, the slot devices, health by units),
                validated as the file's own values; the backends are built from the result.

        Raises:
            ConfigError: the directory, its config or an override is unusable.
        """
        self._fetcher_factory = fetcher_factory
        self._after_action = after_action
        self.paths = DevicePaths(Path(directory))
        if not self.paths.root.is_dir():
            raise ConfigError(f"device directory {self.paths.root} does not exist")
        self.config = DeviceConfig.load(self.paths.config)
        if config_overrides:
            try:
                self.config = replace(self.config, **dict(config_overrides))
            except TypeError as e:  # an unknown field: a programming error upstream
                raise ConfigError(f"unknown device setting: {e}") from e
        if self.config.insecure_http:
            warn_insecure(f"device {self.paths.root} talks plain HTTP")
        #: the real (or virtual) bootloader, ``None``: the simulated one (:mod:`.boot`)
        self.hardware = (
            HardwareBoot(BootloaderSpec.parse(self.config.bootloader), self.paths)
            if self.config.bootloader is not None
            else None
        )
        self.backend: SlotBackend = (
            BlockDeviceSlots(self.config.slot_devices, booted=self._booted_slot)
            if self.config.slot_devices is not None
            else FileSlots(self.paths.slots)
        )
        self.monotonic: MonotonicStore
        if self.config.tpm is not None:
            from otaguard.agent.tpm import TpmMonotonicStore  # tpm2-pytss only when used

            self.monotonic = TpmMonotonicStore(self.config.tpm, self.paths.monotonic)
        else:
            self.monotonic = FileMonotonicStore(self.paths.monotonic)
        #: set to make a running ``update``/``run`` stop within seconds (SIGTERM)
        self.stop_requested = threading.Event()
        self._fetchers: list[Fetcher] = []
        #: the last accepted check-in of this process (its nonce and director answer)
        self._last_checkin: CheckinResult | None = None

    @property
    def has_director(self) -> bool:
        """True when the device was provisioned with a director root (Uptane mode)."""
        return self.paths.director_root.is_file()

    # -- provisioning ----------------------------------------------------------------
    @classmethod
    def provision(
        cls,
        directory: Path,
        *,
        server_url: str,
        root_json: Path,
        ca_pem: Path,
        hardware_id: str,
        serial: str,
        factory_image: Path,
        factory_version: str,
        health_command: list[str] | Literal[Unsafe.NO_HEALTH_CHECK],
        factory_security_counter: int = 0,
        insecure_http: bool = False,
        tpm_tcti: str | None = None,
        unsafe_file_device_key: bool = False,
        director_root: Path | None = None,
    ) -> Device:
        """Create a device directory as the factory would.

        Args:
            serial: the device's serial, its identity towards the server (required: the
                factory sets it; it is never derived from the directory name).
            health_command: run after a new image boots (exit 0 = healthy, anything else
                rolls back), or ``Unsafe.NO_HEALTH_CHECK`` (development only, warns).
            tpm_tcti: the TPM whose NV counters hold the anti-rollback floor (created
                here), which also holds the device key and attests the boot; ``None``
                keeps the floor in the development file alone.
            unsafe_file_device_key: development only: the device key in a file even with
                a TPM (warns on every use).
            director_root: the director's root metadata: the device then installs only
                what the director instructs at each check-in and the image repository
                backs (Uptane full verification). ``None``: no director, the device
                picks the newest acceptable release itself (warns on every update).

        Raises:
            OperatorError: directory not empty, bad version, unreadable inputs.
            ConfigError: root metadata or CA certificate invalid, or the TPM's counters
                already stand above the factory floor.
            DeviceStorageError: the device directory or the TPM failed.
        """
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise OperatorError(f"{directory} is not empty; refusing to overwrite a device")
        try:
            version = Version.parse(factory_version)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        if factory_security_counter < 0:
            raise OperatorError("security counter must not be negative")
        try:
            check_hardware_id(hardware_id)
            check_device_serial(serial)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        no_check = health_command is Unsafe.NO_HEALTH_CHECK
        if not no_check and not isinstance(health_command, list):
            raise OperatorError("give a health command or Unsafe.NO_HEALTH_CHECK")
        config = DeviceConfig(
            server_url=server_url,
            hardware_id=hardware_id,
            serial=serial,
            insecure_http=insecure_http,
            health_command=None if isinstance(health_command, Unsafe) else health_command,
            unsafe_no_health_check=no_check,
            tpm=tpm_tcti,
            unsafe_file_device_key=unsafe_file_device_key,
        )
        root_bytes = read_trust_file(root_json, "root metadata")
        validate_root(root_bytes, root_json)
        director_bytes = _read_director_root(director_root)
        ca_bytes = read_trust_file(ca_pem, "CA certificate")
        try:
            x509.load_pem_x509_certificate(ca_bytes)
        except ValueError as e:
            raise ConfigError(f"{ca_pem} is not a PEM certificate") from e
        if not factory_image.is_file():
            raise OperatorError(f"factory image {factory_image} does not exist")

        paths = DevicePaths(directory)
        try:
            for d in (
                paths.root,
                paths.trust,
                paths.metadata,
                paths.staging,
                paths.slots,
                paths.booted.parent,
            ):
                d.mkdir(parents=True, exist_ok=True)
            _write_trust_anchors(paths, root_bytes, director_bytes, ca_bytes)
            backend = FileSlots(paths.slots)
            backend.write("A", factory_image)
            length = factory_image.stat().st_size
            image = SlotImage(
                target=f"factory-{version}",
                version=str(version),
                security_counter=factory_security_counter,
                sha256=file_sha256(factory_image),
                length=length,
            )
            BootEnv(primary="A", try_slot=None, tries_left=0, slots={"A": image, "B": None}).save(
                paths.bootenv
            )
            _create_floor(paths, Floor(version, factory_security_counter), tpm_tcti)
            InstallState().save(paths.install_state)
            config.save(paths.config)
        except OSError as e:
            shutil.rmtree(directory, ignore_errors=True)
            raise DeviceStorageError(f"cannot provision {directory}: {e.strerror}") from e
        except OtaguardError:
            # The TPM refused or failed: no half-provisioned device directory remains.
            shutil.rmtree(directory, ignore_errors=True)
            raise
        device = cls(directory)
        device.boot()
        return device

    @property
    def key_store(self) -> DeviceKeyStore:
        """Where this device's key lives: its TPM, or (no TPM configured) a file, which warns."""
        return key_store_for(self.config)

    def enroll(self, token: str, *, key_store: DeviceKeyStore) -> x509.Certificate:
        """Get the device certificate with a single-use enrollment token (EST).

        Generates the device key (``key_store``: :attr:`key_store`, the configured TPM or
        ``Unsafe.FILE_DEVICE_KEY``, which warns), sends a CSR naming the configured
        serial, and stores the certificate chain in ``identity/``. The token is neither
        logged nor stored.

        Raises:
            AccessDeniedError: the token or device was refused (the reason is given).
            VerificationError: the CSR or the answer was refused.
            TransportError: the server is unreachable or TLS failed.
        """
        with self._locked():
            # A TPM device registers its attestation key at its first check-in, over
            # mutual TLS with this certificate (agent/checkin.py), not here: enrolling
            # must not load the TPM's TLS provider into the caller's process (ADR 0006).
            return enroll(self.paths, self.config, token, key_store=key_store)

    def enroll_with_factory_certificate(
        self, *, factory_cert: Path, factory_key: Path, key_store: DeviceKeyStore
    ) -> x509.Certificate:
        """Get the device certificate with the manufacturer's factory certificate (EST).

        As :meth:`enroll`, authenticated by the factory certificate and key (TLS client
        certificate) instead of a token.

        Raises:
            AccessDeniedError: the factory certificate or device was refused (reason given).
            VerificationError: the CSR or the answer was refused.
            TransportError: the server is unreachable or TLS failed.
            ConfigError: the factory certificate or key is unusable.
        """
        with self._locked():
            return enroll_with_factory_certificate(
                self.paths,
                self.config,
                factory_cert=factory_cert,
                factory_key=factory_key,
                key_store=key_store,
            )

    # -- helpers ---------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One agent at a time per device (the poller and a manual update must not race)."""
        fd = os.open(self.paths.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise OperatorError(f"another agent is working on {self.paths.root}") from e
            yield
        finally:
            os.close(fd)

    def _session(self) -> TufSession:
        url = self.config.server_url
        # A corrupt trust anchor is the device's own configuration, not bad repository data.
        trusted_root = read_trust_file(self.paths.trusted_root, "trusted root")
        validate_root(trusted_root, self.paths.trusted_root)
        if self._fetcher_factory is not None:
            return TufSession(
                metadata_dir=self.paths.metadata,
                trusted_root=trusted_root,
                server_url=url,
                fetcher=self._fetcher_factory(),
            )
        if self.config.insecure_http and url.startswith("http://"):
            warn_insecure(f"device {self.paths.root} does not check in (plain HTTP, no identity)")
            fetcher = self._fetcher(Unsafe.PLAIN_HTTP)
        else:
            fetcher = self.checked_in_fetcher()
        return TufSession(
            metadata_dir=self.paths.metadata,
            trusted_root=trusted_root,
            server_url=url,
            fetcher=fetcher,
        )

    def _fetcher(self, tls: ssl.SSLContext | Literal[Unsafe.PLAIN_HTTP]) -> TlsFetcher:
        return TlsFetcher.from_limits(
            self.config.fetch_limits, tls=tls, staging_dir=self.paths.staging
        )

    def checked_in_fetcher(self) -> TlsFetcher:
        """A fetcher presenting the device certificate, after an accepted check-in.

        The network seam every update uses (also public so that tools measuring the
        transport, such as ``bench/install_throughput.py``, fetch exactly as the agent
        does); the caller closes it.

        Zero trust: the server serves metadata and images to a certificate only shortly
        after it checked in. A device without a TPM renews its certificate first when it
        is due; a device with one checks in (attested) first, because the server renews
        its certificate only right after an attested check-in, and then checks in again
        with the new certificate.

        Raises:
            NotEnrolledError: no certificate yet, or it expired (enroll again).
            AccessDeniedError: the server refused the device or its check-in.
        """
        attested = self.config.tpm is not None
        fetcher = self._cancellable(self._fetcher(self._tls_with_identity(renew=not attested)))
        try:
            self._check_in(fetcher)
            if attested:
                before = self.paths.device_cert.read_bytes()
                renew_if_due(self.paths, self.config, key_store=self.key_store)
                if self.paths.device_cert.read_bytes() != before:
                    fetcher.close()
                    fetcher = self._cancellable(self._fetcher(self._tls_with_identity(renew=False)))
                    self._check_in(fetcher)
        except BaseException:
            fetcher.close()
            raise
        return fetcher

    def _cancellable(self, fetcher: TlsFetcher) -> TlsFetcher:
        """Let :meth:`request_stop` abort ``fetcher``'s requests (the check-in's too)."""
        self._fetchers.append(fetcher)
        if self.stop_requested.is_set():
            fetcher.cancel()
        return fetcher

    def _check_in(self, fetcher: Fetcher) -> CheckinResult:
        self._last_checkin = check_in(
            fetcher,
            paths=self.paths,
            config=self.config,
            signer=device_signer(self.paths, self.config),
        )
        return self._last_checkin

    def checkin(self) -> CheckinResult:
        """Check in with the server now (what every update check starts with).

        Raises:
            AccessDeniedError: the server refused the device or the check-in (reason given).
            VerificationError: the server's answer is malformed.
            TransportError: the server cannot be reached.
        """
        with self._locked():
            self._check_local_state()
            self._booted()
            fetcher = self._fetcher(self._tls_with_identity(renew=False))
            try:
                return self._check_in(fetcher)
            finally:
                fetcher.close()

    def _tls_with_identity(self, *, renew: bool, ca: Path | None = None) -> ssl.SSLContext:
        """TLS trusting ``ca`` (default: the provisioned CA) and presenting the device
        certificate.

        With ``renew``, renews the certificate first when less than a third of its
        lifetime is left.

        Raises:
            NotEnrolledError: no certificate yet, or it expired (enroll again).
        """
        ca = ca or self.paths.ca
        try:
            ctx = create_ssl_context(ca_file=ca)
        except ssl.SSLError as e:
            raise ConfigError(f"CA certificate {ca} is not a valid PEM certificate") from e
        except OSError as e:
            raise ConfigError(f"cannot read CA certificate {ca}: {e.strerror}") from e
        if renew:
            cert, key = renew_if_due(self.paths, self.config, key_store=self.key_store)
        else:
            cert, key = load_identity(self.paths, self.config, key_store=self.key_store)
        present_identity(ctx, cert, key, key_store=self.key_store)
        return ctx

    def _check_local_state(self) -> None:
        """Read the boot environment and the anti-rollback floor before any network access,
        so corrupt local state fails the command before anything is fetched or persisted."""
        BootEnv.load(self.paths.bootenv)
        self.monotonic.read()

    def _booted_slot(self) -> str | None:
        """The running slot, which a block-device slot write refuses."""
        if self.hardware is not None:
            return self.hardware.bootloader.booted_slot()
        record = read_booted(self.paths)
        return record.slot if record is not None else None

    def _booted(self) -> BootRecord:
        if self.hardware is not None:
            current = self.hardware.record()
            # A real bootloader measured nothing: the check-in needs this boot's
            # measurement, taken here if otaguard-measure-boot.service has not (ADR 0038).
            self.hardware.measure(self.backend)
            return current
        record = read_booted(self.paths)
        if record is not None:
            return record
        return boot(self.paths, self.backend, floor=self.monotonic.read(), tpm=self.config.tpm)

    def _tracked_session(self) -> TufSession:
        """A session whose fetcher :meth:`request_stop` can cancel."""
        if self.stop_requested.is_set():
            raise StopRequestedError("the agent is stopping")
        session = self._session()
        self._fetchers.append(session.fetcher)
        if self.stop_requested.is_set():
            session.fetcher.cancel()
        return session

    def request_stop(self) -> None:
        """Ask a running ``update``/``run`` to stop within seconds (thread- and signal-safe).

        A download in progress is cancelled; an install resumes at the next start.
        """
        self.stop_requested.set()
        for fetcher in list(self._fetchers):
            fetcher.cancel()

    def _installer(self, progress: ProgressFn | None) -> Installer:
        return Installer(
            paths=self.paths,
            config=self.config,
            backend=self.backend,
            monotonic=self.monotonic,
            session_factory=self._tracked_session,
            progress=progress,
            stop=self.stop_requested,
            after_action=self._after_action,
            hardware=self.hardware,
        )

    # -- commands --------------------------------------------------------------------
    def boot(self) -> BootRecord:
        """Run the simulated bootloader (a power-on).

        The bootloader starts no image below the anti-rollback floor; when no slot
        qualifies the record says ``recovery`` and ``update`` installs a release at or
        above the floor.
        """
        with self._locked():
            if self.hardware is not None:
                if not self.hardware.spec.virtual:
                    raise OperatorError("this device has a real bootloader: reboot it instead")
                self.hardware.reboot()
                record = self.hardware.record()
                self.hardware.measure(self.backend)
            else:
                record = boot(
                    self.paths, self.backend, floor=self.monotonic.read(), tpm=self.config.tpm
                )
            note_boot(self.paths)  # a new boot session for telemetry (ADR 0026)
            return record

    def measure_boot(self) -> SelfMeasurement:
        """Measure the slot this kernel booted from, once per boot (ADR 0038).

        For a bootloader that measures nothing (otaguard-measure-boot.service runs it
        early in each boot): the booted slot, named by the kernel command line, hashed
        over its recorded image length, logged as an unattested measurement for the
        check-in. A boot already measured is not measured again.

        Raises:
            OperatorError: the device has the simulated bootloader (it measures itself).
            ConfigError: no booted slot or no image recorded for it, or no boot id.
            DeviceStorageError: the slot cannot be read, or the event log written.
        """
        with self._locked():
            if self.hardware is None:
                raise OperatorError(
                    "measure-boot is for a real bootloader that does not measure; the "
                    "simulated bootloader measures each boot itself"
                )
            return self.hardware.measure(self.backend)

    def status(self) -> DeviceStatus:
        """Read everything there is to show about the device."""
        return DeviceStatus(
            hardware_id=self.config.hardware_id,
            booted=read_booted(self.paths),
            bootenv=BootEnv.load(self.paths.bootenv),
            floor=self.monotonic.read(),
            install=InstallState.load(self.paths.install_state),
        )

    def _select(self, session: TufSession, booted: BootRecord) -> Selection:
        """Verify the image repository and decide what to install.

        With a director root: the director's instruction from this session's check-in,
        verified and matched against the image repository (Uptane full verification),
        then checked against what runs and the floor. Without one: the newest
        acceptable release. A refusal that stands for an attack is recorded as an attack
        flag for the next check-in.
        """
        try:
            session.refresh()
            running = None if booted.recovery else Version.parse(booted.version)
            floor = self.monotonic.read()
            rejected = frozenset(InstallState.load(self.paths.install_state).rejected)
            if not self.has_director:
                # a named unsafe mode, not refused: a device provisioned before its server
                # ran a director cannot receive a director root it could trust (ADR 0011)
                ignored = self._last_checkin is not None and self._last_checkin.director is not None
                warn_insecure(
                    f"device {self.paths.root} has no director root: it chooses its own update"
                    + (
                        ", ignoring the server's director (its rollouts, holds and channels)"
                        if ignored
                        else ""
                    )
                )
                offers, bad = session.offers(self.config.hardware_id)
                sel = select_update(
                    offers,
                    running=running,
                    floor=floor,
                    max_length=self.config.max_image_bytes,
                    rejected=rejected,
                )
                sel.refused.extend(bad)
                return sel
            instruction = self._director_instruction(session)
            if instruction.target is None:
                logger.info("the director instructs no update")
                return Selection(chosen=None, why_none="the director instructs no update")
            offer = match_image_repository(
                instruction.target,
                session.find_target(instruction.target.path),
                hardware_id=self.config.hardware_id,
            )
            # select_update is now the check that the director's choice is acceptable.
            sel = select_update(
                [offer],
                running=running,
                floor=floor,
                max_length=self.config.max_image_bytes,
                rejected=rejected,
            )
            if sel.behind:
                # The director *named* an image older than what runs: a downgrade attempt
                # (a repository merely behind the device names nothing).
                sel.refused.append(
                    (offer.path, f"version {offer.info.version} < running {booted.version}")
                )
                sel.downgrade = True
            elif sel.chosen is None and not sel.refused:
                # Equal to what runs: nothing to do, but the director should not ask.
                sel.refused.append((offer.path, f"version {offer.info.version} already runs"))
        except OtaguardError as e:
            flag = flag_for(e)
            if flag is not None:
                record_flag(self.paths, flag)
            raise
        if sel.downgrade:
            record_flag(self.paths, "downgrade")
        return sel

    def _director_instruction(self, session: TufSession) -> DirectorInstruction:
        """The verified director instruction of this session's check-in.

        Raises:
            DirectorMetadataError: missing, not signed by the director root's targets
                keys, expired, or for another nonce or device; or a bad root rotation.
            TransportError: a director root rotation could not be fetched.
        """
        checkin = self._last_checkin
        if checkin is None or checkin.director is None:
            raise DirectorMetadataError(
                "the server gave no director instruction at check-in (a server without "
                "--director, or one that withheld it)"
            )
        now = dt.datetime.now(dt.UTC)
        trusted = read_trust_file(self.paths.director_root, "director root")
        base = self.config.server_url.rstrip("/")

        def fetch_root(version: int) -> bytes | None:
            url = base + DIRECTOR_ROOT_PATH.format(version=version)
            try:
                return session.fetcher.download_bytes(url, MAX_DIRECTOR_ROOT_BYTES)
            except tuf_exc.DownloadHTTPError as e:
                if e.status_code == 404:
                    return None
                raise TransportError(f"director root {version}: {e}") from e
            except tuf_exc.DownloadError as e:
                raise TransportError(f"director root {version}: {e}") from e

        data, root = follow_director_root(trusted, fetch_root, now=now)
        if data != trusted:
            atomic_write_bytes(self.paths.director_root, data)
        return verify_director_targets(
            checkin.director,
            root=root,
            serial=self.config.serial,
            hardware_id=self.config.hardware_id,
            nonce=checkin.nonce,
            now=now,
        )

    def check(self) -> tuple[str, Selection]:
        """Verify fresh metadata and say what would be installed (installs nothing)."""
        with self._locked():
            self._check_local_state()
            booted = self._booted()
            session = self._tracked_session()
            try:
                return booted.version, self._select(session, booted)
            finally:
                session.fetcher.close()

    def update(self, *, progress: ProgressFn | None = None) -> UpdateResult:
        """Resume any interrupted install, else check for and install an update.

        Raises:
            VerificationError: metadata or image failed verification (nothing installed).
            DowngradeError: only older releases are offered.
            TransportError: the server could not be reached.
            DeviceStorageError: staging or slot storage failed.
        """
        with self._locked():
            self._check_local_state()
            booted = self._booted()
            installer = self._installer(progress)
            state = InstallState.load(self.paths.install_state)
            session: TufSession | None = None
            refused: list[tuple[str, str]] = []
            try:
                if state.phase is Phase.IDLE:
                    session = self._tracked_session()
                    sel = self._select(session, booted)
                    refused = sel.refused
                    if sel.chosen is None:
                        if sel.downgrade:
                            path, why = refused[0]
                            raise DowngradeError(f"{path}: {why}")
                        outcome = "recovery-pending" if booted.recovery else "up-to-date"
                        return UpdateResult(
                            outcome, booted.version, detail=sel.why_none, refused=refused
                        )
                    installer.begin(
                        sel.chosen, from_slot=booted.slot, to_slot=self._target_slot(booted)
                    )
                else:
                    logger.info("resuming interrupted install (phase %s)", state.phase.value)
                installer.drive(session)
            except RebootPending as e:
                return UpdateResult("rebooting", booted.version, detail=str(e), refused=refused)
            finally:
                installer.close()
                if session is not None:
                    session.fetcher.close()
                self._fetchers.clear()
            if installer.finished is None and self.config.health_by_units:
                after = InstallState.load(self.paths.install_state)
                if after.phase is Phase.ARMED and after.target is not None:
                    return UpdateResult(
                        "awaiting-mark-good",
                        booted.version,
                        to_version=after.target.version,
                        detail="the health-check units decide; otaguard-mark-good.service commits",
                        refused=refused,
                    )
            result: dict[str, Any] = installer.finished or {}
            if result.get("outcome") == "refused" and result.get("error") in (
                "verification",
                "downgrade",
            ):
                record_flag(
                    self.paths,
                    "forged-image" if result.get("error") == "verification" else "downgrade",
                )
            _raise_for(result)
            outcome = str(result.get("outcome", "failed"))
            if outcome == "updated" and result.get("recovery"):
                outcome = "recovered"
            return UpdateResult(
                outcome=outcome,
                from_version=booted.version,
                to_version=result.get("version"),
                detail=str(result.get("detail", "")),
                refused=refused,
            )

    def _target_slot(self, booted: BootRecord) -> str:
        if booted.slot is not None:
            return other_slot(booted.slot)
        # Recovery: neither slot may be started; write the one that is not primary, so
        # the (corrupt or retired) primary stays as evidence until the new slot commits.
        return other_slot(BootEnv.load(self.paths.bootenv).primary)

    def mark_good(self) -> MarkGoodResult:
        """Confirm the running slot to the bootloader (otaguard-mark-good.service).

        Run once the system reached ``boot-complete.target`` (every health-check unit
        passed). If an install was waiting for this boot of its new slot, it commits:
        the bootloader marks the slot good and only then the anti-rollback floor rises.
        If the bootloader fell back instead, the install ends rolled back and the failed
        slot is marked bad explicitly. Either way the running slot is confirmed (GRUB's
        scheme sets a slot's TRY flag at every boot).

        Raises:
            OperatorError: the device has the simulated bootloader.
            OtaguardError: committing failed (the install stays armed; run again).
        """
        with self._locked():
            if self.hardware is None:
                raise OperatorError(
                    "mark-good confirms a slot to a real bootloader; this device uses the "
                    "simulated one (its agent commits after the health check)"
                )
            booted = self.hardware.record()
            assert booted.slot is not None  # noqa: S101 - record() names a slot or raises
            state = InstallState.load(self.paths.install_state)
            finished: dict[str, Any] | None = None
            # Only the phases a boot decides; a download or an abandon is the agent's
            # (mark-good runs without network, before the agent starts).
            if state.phase in (Phase.ARMED, Phase.HEALTHY, Phase.ROLLING_BACK):
                installer = self._installer(None)
                verdict = (
                    HealthResult(None)
                    if self.config.health_by_units
                    and state.phase is Phase.ARMED
                    and state.to_slot == booted.slot
                    else None
                )
                try:
                    after = installer.drive(first=verdict)
                finally:
                    installer.close()
                finished = installer.finished
                if after.phase is not Phase.IDLE:
                    return MarkGoodResult("pending", booted.slot, booted.version, after.phase.value)
            self.hardware.bootloader.mark_good(booted.slot)
            self.hardware.record()  # the boot record no longer says "trial"
            if finished is None:
                return MarkGoodResult("confirmed", booted.slot, booted.version, "")
            return MarkGoodResult(
                str(finished.get("outcome", "failed")),
                booted.slot,
                booted.version,
                str(finished.get("detail", "")),
            )

    def clear_rejected(self) -> list[str]:
        """Forget the images this device rolled back (they may be selected again).

        Returns:
            The sha256 of each image forgotten.
        """
        with self._locked():
            state = InstallState.load(self.paths.install_state)
            cleared, state.rejected = state.rejected, []
            state.save(self.paths.install_state)
            return cleared

    def telemetry(self) -> Telemetry:
        """The next health report (schema ``otaguard.telemetry/1``)."""
        with self._locked():
            booted = read_booted(self.paths)
            running = booted.version if booted is not None and booted.slot else "recovery"
            return build_report(self.paths, self.config, running_version=running)

    def mqtt_tls(self) -> ssl.SSLContext:
        """TLS for the MQTT broker: the provisioned server CA, this device's certificate."""
        with self._locked():
            return self._tls_with_identity(renew=False)

    def send_telemetry(self, report: Telemetry | None = None) -> Telemetry:
        """Send ``report`` (default: the next health report) over the device API (mutual TLS).

        Raises:
            TransportError: not sent, or refused by the server (reason given).
        """
        report = report if report is not None else self.telemetry()
        fetcher = self._fetcher(self._tls_with_identity(renew=False))
        try:
            send_report(fetcher, server_url=self.config.server_url, report=report)
        finally:
            fetcher.close()
        return report

    def poll_delay(self) -> float:
        """Seconds until the next poll, with jitter so a fleet spreads out."""
        base = self.config.poll_interval_s
        jitter = base * self.config.poll_jitter
        return max(1.0, base + random.uniform(-jitter, jitter))  # noqa: S311 - not security

    def run(
        self,
        *,
        on_result: Callable[[UpdateResult], None] | None = None,
        on_error: Callable[[OtaguardError], None] | None = None,
    ) -> None:
        """Poll, update and report until :meth:`request_stop`; errors are reported, not
        fatal. With ``mqtt_url`` configured, telemetry goes over MQTT and hints cut the
        wait short (:mod:`otaguard.agent.daemon`)."""
        from otaguard.agent.daemon import run_daemon

        run_daemon(self, on_result=on_result, on_error=on_error)

    def mqtt_link(self, *, on_hint: Callable[[], None]) -> MqttLink | None:
        """The daemon's MQTT connection (not started), ``None`` without ``mqtt_url``.

        Its TLS trusts ``mqtt_ca`` (default: the provisioned server CA) and presents the
        device certificate as it is on disk at each connection (a renewal reconnects).

        Raises:
            ConfigError: the broker's CA certificate is unreadable or not PEM.
        """
        if self.config.mqtt_url is None:
            return None
        from otaguard.agent.daemon import MqttLink

        host, port = parse_mqtt_url(self.config.mqtt_url)
        ca = Path(self.config.mqtt_ca) if self.config.mqtt_ca else self.paths.ca
        try:  # a CA that cannot be used is the operator's to fix now, not a retry loop's
            create_ssl_context(ca_file=ca)
        except ssl.SSLError as e:
            raise ConfigError(f"MQTT CA certificate {ca} is not a valid PEM certificate") from e
        except OSError as e:
            raise ConfigError(f"cannot read the MQTT CA certificate {ca}: {e.strerror}") from e
        return MqttLink(
            host=host,
            port=port,
            serial=self.config.serial,
            # no device lock: the link reads the identity files while the daemon's
            # update holds the lock (renewals replace the files atomically)
            tls=lambda: self._tls_with_identity(renew=False, ca=ca),
            identity=self.paths.device_cert,
            on_hint=on_hint,
        )


_ERROR_FOR_KIND: Final[dict[str, type[OtaguardError]]] = {
    "downgrade": DowngradeError,
    "verification": VerificationError,
    "transport": TransportError,
    "storage": DeviceStorageError,
    "config": ConfigError,
}


def _raise_for(result: dict[str, Any]) -> None:
    """Raise the error an install that ended ``refused`` or ``failed`` stands for."""
    outcome = result.get("outcome")
    if outcome not in ("refused", "failed"):
        return
    detail = str(result.get("detail", ""))
    kind = str(result.get("error", ""))
    if kind == "withdrawn":
        raise VerificationError(f"{result.get('target')}: {detail}")
    raise _ERROR_FOR_KIND.get(kind, DeviceStorageError)(detail)
