"""The device facade used by the CLI, the demo and tests."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from otaguard._fs import atomic_write_bytes
from otaguard.agent.boot import BootRecord, boot, read_booted
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.fetcher import TlsFetcher, create_ssl_context
from otaguard.agent.install import Installer, InstallState, Phase, ProgressFn, file_sha256
from otaguard.agent.monotonic import FileMonotonicStore, Floor
from otaguard.agent.slots import BootEnv, FileSlots, SlotImage, other_slot
from otaguard.agent.updater import Selection, TufSession, select_update
from otaguard.crypto.keys import warn_insecure
from otaguard.model.errors import ConfigError, DeviceStorageError, DowngradeError, OperatorError
from otaguard.model.unsafe import Unsafe
from otaguard.model.version import Version

__all__ = ["Device", "DeviceStatus", "UpdateResult"]

logger = logging.getLogger(__name__)

# Trust anchors are small; a bigger file is not what the operator meant to provision.
MAX_TRUST_FILE_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class DeviceStatus:
    """A snapshot of a device's state for display."""

    hardware_id: str
    booted: BootRecord | None
    bootenv: BootEnv
    floor: Floor
    install: InstallState


@dataclass
class UpdateResult:
    """The outcome of one ``update``."""

    outcome: str  # "updated" | "up-to-date" | "rolled-back" | "failed"
    from_version: str
    to_version: str | None = None
    detail: str = ""
    refused: list[tuple[str, str]] = field(default_factory=list)


def _read_trust_file(path: Path, what: str) -> bytes:
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


class Device:
    """One device directory: configuration, trust anchors, slots and state."""

    def __init__(self, directory: Path):
        self.paths = DevicePaths(Path(directory))
        if not self.paths.root.is_dir():
            raise ConfigError(f"device directory {self.paths.root} does not exist")
        self.config = DeviceConfig.load(self.paths.config)
        if self.config.insecure_http:
            warn_insecure(f"device {self.paths.root} talks plain HTTP")
        self.backend = FileSlots(self.paths.slots)
        self.monotonic = FileMonotonicStore(self.paths.monotonic)

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
        factory_image: Path,
        factory_version: str,
        factory_security_counter: int = 0,
        insecure_http: bool = False,
        health_command: list[str] | None = None,
    ) -> Device:
        """Create a device directory as the factory would.

        Raises:
            OperatorError: directory not empty, bad version, unreadable inputs.
            ConfigError: root metadata or CA certificate invalid.
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
        config = DeviceConfig(
            server_url=server_url,
            hardware_id=hardware_id,
            insecure_http=insecure_http,
            health_command=health_command,
        )
        root_bytes = _read_trust_file(root_json, "root metadata")
        validate_root(root_bytes, root_json)
        ca_bytes = _read_trust_file(ca_pem, "CA certificate")
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
            atomic_write_bytes(paths.trusted_root, root_bytes)
            atomic_write_bytes(paths.ca, ca_bytes)
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
            FileMonotonicStore.create(paths.monotonic, Floor(version, factory_security_counter))
            InstallState().save(paths.install_state)
            config.save(paths.config)
        except OSError as e:
            shutil.rmtree(directory, ignore_errors=True)
            raise DeviceStorageError(f"cannot provision {directory}: {e.strerror}") from e
        device = cls(directory)
        device.boot()
        return device

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
        tls: ssl.SSLContext | Literal[Unsafe.PLAIN_HTTP]
        if self.config.insecure_http and url.startswith("http://"):
            tls = Unsafe.PLAIN_HTTP
        else:
            try:
                tls = create_ssl_context(ca_file=self.paths.ca)
            except ssl.SSLError as e:
                raise ConfigError(
                    f"CA certificate {self.paths.ca} is not a valid PEM certificate"
                ) from e
            except OSError as e:
                raise ConfigError(
                    f"cannot read CA certificate {self.paths.ca}: {e.strerror}"
                ) from e
        # A corrupt trust anchor is the device's own configuration, not bad repository data.
        trusted_root = _read_trust_file(self.paths.trusted_root, "trusted root")
        validate_root(trusted_root, self.paths.trusted_root)
        fetcher = TlsFetcher(
            tls=tls,
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
            deadline_base=self.config.download_deadline_base_s,
            min_rate_bps=self.config.download_min_rate_bps,
            staging_dir=self.paths.staging,
        )
        return TufSession(
            metadata_dir=self.paths.metadata,
            trusted_root=trusted_root,
            server_url=url,
            fetcher=fetcher,
        )

    def _check_local_state(self) -> None:
        """Read the boot environment and the anti-rollback floor before any network access,
        so corrupt local state fails the command before anything is fetched or persisted."""
        BootEnv.load(self.paths.bootenv)
        self.monotonic.read()

    def _booted(self) -> BootRecord:
        record = read_booted(self.paths)
        return record if record is not None else boot(self.paths, self.backend)

    def _installer(self, progress: ProgressFn | None) -> Installer:
        return Installer(
            paths=self.paths,
            config=self.config,
            backend=self.backend,
            monotonic=self.monotonic,
            session_factory=self._session,
            progress=progress,
        )

    # -- commands --------------------------------------------------------------------
    def boot(self) -> BootRecord:
        """Run the simulated bootloader (a power-on)."""
        with self._locked():
            return boot(self.paths, self.backend)

    def status(self) -> DeviceStatus:
        """Read everything there is to show about the device."""
        return DeviceStatus(
            hardware_id=self.config.hardware_id,
            booted=read_booted(self.paths),
            bootenv=BootEnv.load(self.paths.bootenv),
            floor=self.monotonic.read(),
            install=InstallState.load(self.paths.install_state),
        )

    def _select(self, session: TufSession, running: Version) -> Selection:
        session.refresh()
        offers, bad = session.offers(self.config.hardware_id)
        floor = self.monotonic.read()
        sel = select_update(
            offers,
            running=max(running, floor.version),
            floor_counter=floor.security_counter,
            max_length=self.config.max_image_bytes,
            rejected=frozenset(InstallState.load(self.paths.install_state).rejected),
        )
        sel.refused.extend(bad)
        return sel

    def check(self) -> tuple[str, Selection]:
        """Verify fresh metadata and say what would be installed (installs nothing)."""
        with self._locked():
            self._check_local_state()
            booted = self._booted()
            session = self._session()
            try:
                return booted.version, self._select(session, Version.parse(booted.version))
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
                    session = self._session()
                    sel = self._select(session, Version.parse(booted.version))
                    refused = sel.refused
                    if sel.chosen is None:
                        if sel.downgrade:
                            path, why = refused[0]
                            raise DowngradeError(f"{path}: {why}")
                        return UpdateResult("up-to-date", booted.version, refused=refused)
                    installer.begin(
                        sel.chosen, from_slot=booted.slot, to_slot=other_slot(booted.slot)
                    )
                else:
                    logger.info("resuming interrupted install (phase %s)", state.phase.value)
                final = self._drive(installer, session)
            finally:
                installer.close()
                if session is not None:
                    session.fetcher.close()
            result: dict[str, Any] = final.last_result or {}
            return UpdateResult(
                outcome=str(result.get("outcome", "failed")),
                from_version=booted.version,
                to_version=result.get("version"),
                detail=str(result.get("detail", "")),
                refused=refused,
            )

    def _drive(self, installer: Installer, session: TufSession | None) -> InstallState:
        try:
            return installer.drive(session)
        except BaseException:
            # An install stopped before anything was downloaded is abandoned (the next
            # check selects afresh); any later phase stays persisted and resumes.
            cur = InstallState.load(self.paths.install_state)
            if cur.phase is Phase.SELECTED:
                cur.phase = Phase.IDLE
                cur.save(self.paths.install_state)
            raise

    def poll_delay(self) -> float:
        """Seconds until the next poll, with jitter so a fleet spreads out."""
        base = self.config.poll_interval_s
        jitter = base * self.config.poll_jitter
        return max(1.0, base + random.uniform(-jitter, jitter))  # noqa: S311 - not security

    def run(self, stop: threading.Event, *, on_result: Any = None, on_error: Any = None) -> None:
        """Poll and update until ``stop`` is set; errors are reported, not fatal."""
        from otaguard.model.errors import OtaguardError

        while not stop.is_set():
            try:
                result = self.update()
                if on_result:
                    on_result(result)
            except OtaguardError as e:
                if on_error:
                    on_error(e)
                logger.warning("update failed: %s", e.diagnostics())
            stop.wait(self.poll_delay())
