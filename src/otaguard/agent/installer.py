"""The thin driver of the install machine: persist, perform, observe, repeat.

All I/O of an install happens here; every decision is :func:`otaguard.agent.install.transition`.
The driver persists each new state atomically *before* performing its actions, performs
them one at a time, and calls the ``after_action`` hook (and the fault-injection point
of the SIGKILL power-cut tests) after each one, so a test can cut power after any action.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from tuf.api.metadata import TargetFile

from otaguard.agent.boot import boot, read_booted
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.hwboot import HardwareBoot
from otaguard.agent.install import (
    Action,
    ActionFailed,
    Arm,
    DeviceView,
    DiscardStaged,
    Done,
    Event,
    HealthCheck,
    HealthPending,
    HealthResult,
    InstallState,
    InvalidateSlot,
    Observation,
    Phase,
    RaiseFloor,
    Reboot,
    Resumed,
    RetireBelowFloor,
    SetPrimary,
    Streamed,
    StreamToSlot,
    Withdrawn,
    transition,
)
from otaguard.agent.monotonic import Floor, MonotonicStore
from otaguard.agent.slot_stream import Checkpoint, ImageCheck, StreamStats, stream_to_slot
from otaguard.agent.slots import SLOTS, BootEnv, SlotBackend, SlotImage
from otaguard.agent.stream import ProgressPacer
from otaguard.agent.transfer import RunningImage, encoded_paths
from otaguard.agent.updater import Offer, TufSession, tuf_errors
from otaguard.crypto.keys import warn_insecure
from otaguard.model.errors import (
    ConfigError,
    DeviceStorageError,
    DowngradeError,
    OtaguardError,
    StopRequestedError,
    TransportError,
    VerificationError,
)
from otaguard.model.release import ReleaseInfo
from otaguard.model.version import Version

__all__ = ["FAULT_ENV", "Installer", "ProgressFn", "error_kind", "file_sha256"]

logger = logging.getLogger(__name__)

#: Fault injection for power-cut tests: the agent SIGKILLs itself right after the named
#: action, given as ``action`` (first occurrence, e.g. ``stream_to_slot``), as
#: ``phase:action`` (e.g. ``rolling-back:invalidate_slot``), or ``stream-at:N`` (inside
#: the streaming write, once N bytes of the image were written).
FAULT_ENV: Final = "OTAGUARD_TEST_KILL_AFTER"
# How often a running health check looks at the stop flag (SIGTERM must act in seconds).
HEALTH_POLL_S: Final = 0.2

ProgressFn = Callable[[str, int, int], None]


def _fault_point(name: str, phase: Phase | None = None) -> None:
    wanted = os.environ.get(FAULT_ENV)
    if wanted is not None and wanted in (name, f"{phase.value if phase else ''}:{name}"):
        logger.warning("fault injection: killing the agent after %s", wanted)
        os.kill(os.getpid(), signal.SIGKILL)


def _stream_fault() -> Callable[[int], None] | None:
    """The ``stream-at:N`` fault point, if the environment asks for one."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted.startswith("stream-at:"):
        return None
    at = int(wanted.removeprefix("stream-at:"))

    def check(offset: int) -> None:
        if offset >= at:
            logger.warning("fault injection: killing the agent after %s (byte %d)", wanted, offset)
            os.kill(os.getpid(), signal.SIGKILL)

    return check


def file_sha256(path: Path) -> str:
    """Stream-hash a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def error_kind(error: OtaguardError) -> str:
    """The fault an error stands for, as recorded in an install's result."""
    if isinstance(error, DowngradeError):
        return "downgrade"
    if isinstance(error, VerificationError):
        return "verification"
    if isinstance(error, TransportError):
        return "transport"
    if isinstance(error, DeviceStorageError):
        return "storage"
    return "config"


def _opener(session: TufSession, blob: TargetFile) -> Callable[[int], Iterator[bytes]]:
    """``open_stream`` of an encoded blob: its bytes from an offset, length-capped."""
    url = session.target_url(blob)
    return lambda offset: session.fetcher.stream_range(url, start=offset, max_length=blob.length)


class Installer:
    """Performs the install machine's actions against a device's slots, boot environment
    and anti-rollback store."""

    def __init__(
        self,
        *,
        paths: DevicePaths,
        config: DeviceConfig,
        backend: SlotBackend,
        monotonic: MonotonicStore,
        session_factory: Callable[[], TufSession],
        progress: ProgressFn | None = None,
        stop: threading.Event | None = None,
        after_action: Callable[[Action], None] | None = None,
        hardware: HardwareBoot | None = None,
    ):
        self.paths = paths
        #: the real (or virtual) bootloader; ``None``: the simulated one
        self.hardware = hardware
        self.config = config
        self.backend = backend
        self.monotonic = monotonic
        self._session_factory = session_factory
        self._session: TufSession | None = None
        self._progress = progress
        self._stop = stop or threading.Event()
        self._after_action = after_action
        #: the result the last :meth:`drive` ended an install with, if it ended one
        self.finished: dict[str, object] | None = None
        #: what each streaming run of this installer did (resume point, bytes, reconnects)
        self.streams: list[StreamStats] = []

    # -- entry points ----------------------------------------------------------------
    def begin(self, offer: Offer, *, from_slot: str | None, to_slot: str) -> InstallState:
        """Persist the selection of ``offer``: the first transition of an install."""
        state = InstallState.load(self.paths.install_state)
        state.phase = Phase.SELECTED
        state.target = SlotImage(
            target=offer.path,
            version=str(offer.info.version),
            security_counter=offer.info.security_counter,
            sha256=offer.sha256,
            length=offer.target.length,
            sbom_sha256=offer.info.sbom.sha256 if offer.info.sbom is not None else None,
        )
        state.from_slot, state.to_slot = from_slot, to_slot
        state.reason, state.history = None, ["selected"]
        state.written, state.written_sha256, state.stalled_runs = 0, None, 0
        state.written_via = None
        state.bad_image, state.pending = False, None
        state.save(self.paths.install_state)
        return state

    def drive(
        self, session: TufSession | None = None, *, first: Event | None = None
    ) -> InstallState:
        """Run the machine until the install is over or must wait.

        Args:
            session: an open TUF session to reuse, if any.
            first: the first event (default :class:`Resumed`): ``mark-good`` passes the
                health verdict of the systemd units.

        Returns:
            The final state (``idle`` when the install ended; :attr:`finished` holds
            its result).

        Raises:
            OtaguardError: an action failed after the new slot was armed; the install
                stays persisted and resumes at the next ``update``.
            StopRequestedError: the agent was asked to stop; it resumes later.
        """
        self._session = session
        self.finished = None
        state = InstallState.load(self.paths.install_state)
        event: Event = first if first is not None else Resumed()
        error: OtaguardError | None = None
        while True:
            before = state.phase
            state, actions = transition(state, Observation(event, self._view()))
            if state.phase is not before:
                state.history.append(state.phase.value)
                logger.info("install: %s -> %s", before.value, state.phase.value)
            state.save(self.paths.install_state)
            if state.phase is Phase.IDLE and before is not Phase.IDLE:
                self.finished = state.last_result
            if not actions:
                if error is not None and state.phase is not Phase.IDLE:
                    raise error
                return state
            event, error = self._perform_all(state, actions)

    def close(self) -> None:
        """Close the network session, if one was opened."""
        if self._session is not None:
            self._session.fetcher.close()

    # -- the loop's parts --------------------------------------------------------------
    def _view(self) -> DeviceView:
        floor = self.monotonic.read()
        if self.hardware is not None:
            return self._hardware_view(floor)
        booted = read_booted(self.paths)
        if booted is None:
            booted = boot(self.paths, self.backend, floor=floor, tpm=self.config.tpm)
        env = BootEnv.load(self.paths.bootenv)
        return DeviceView(
            booted=booted.slot,
            try_slot=env.try_slot,
            floor=floor,
            boot_fallback=env.fallback,
            boot_note=booted.note,
            slots=dict(env.slots),
        )

    def _hardware_view(self, floor: Floor) -> DeviceView:
        """The device as the real bootloader sees it: booted from the kernel command line,
        the try slot being the one it will boot next if that is not the running one."""
        assert self.hardware is not None  # noqa: S101 - the caller checked
        booted = self.hardware.record()
        upcoming = self.hardware.next_slot()
        env = BootEnv.load(self.paths.bootenv)
        return DeviceView(
            booted=booted.slot,
            try_slot=upcoming if upcoming != booted.slot else None,
            floor=floor,
            # Only consulted once the bootloader no longer boots the new slot: it used
            # up the slot's tries (or its one try), so the image is what failed.
            boot_fallback="tries-exhausted",
            boot_note="the bootloader fell back: the new slot was not confirmed in time",
            slots=dict(env.slots),
        )

    def _perform_all(
        self, state: InstallState, actions: tuple[Action, ...]
    ) -> tuple[Event, OtaguardError | None]:
        last: Event = Done()
        for action in actions:
            if self._stop.is_set():
                raise StopRequestedError(f"stopped before {action.name}; the install resumes")
            logger.debug("install action %s", action)
            try:
                event = self._perform(state, action)
            except OtaguardError as e:
                if self._stop.is_set():
                    raise StopRequestedError(f"stopped during {action.name}") from e
                logger.info("install action %s failed: %s", action.name, e.diagnostics())
                return ActionFailed(action.name, error_kind(e), str(e)), e
            _fault_point(action.name, state.phase)
            if self._after_action is not None:
                self._after_action(action)
            if event is not None:
                last = event
        return last, None

    def _perform(self, state: InstallState, action: Action) -> Event | None:  # noqa: PLR0911, PLR0912 - one case per action
        match action:
            case StreamToSlot(slot=slot):
                return self._stream(state, slot)
            case InvalidateSlot(slot=slot):
                if self.hardware is not None:  # first: never bootable while it changes
                    self.hardware.bootloader.mark_bad(slot)
                self._edit_env(lambda env: _invalidate(env, slot))
                return None
            case Arm(slot=slot, image=image):
                self._edit_env(lambda env: _arm(env, slot, image, self.config.max_boot_tries))
                if self.hardware is not None:
                    self.hardware.bootloader.set_primary(slot)
                return None
            case Reboot():
                self._reboot()
                return None
            case HealthCheck(slot=slot):
                if self.config.health_by_units:
                    return HealthPending()  # the units decide; mark-good commits
                return HealthResult(self._health_check(state, slot))
            case SetPrimary(slot=slot):
                if self.hardware is not None:
                    self.hardware.bootloader.mark_good(slot)
                self._edit_env(lambda env: _set_primary(env, slot))
                return None
            case RaiseFloor(version=version, security_counter=counter):
                self.monotonic.raise_to(Version.parse(version), counter)
                return None
            case RetireBelowFloor(keep=keep):
                floor = self.monotonic.read()
                self._edit_env(lambda env: _retire(env, keep, floor))
                return None
            case DiscardStaged():
                self._staged(state).unlink(missing_ok=True)
                return None
        raise RuntimeError(f"unknown action {action!r}")  # pragma: no cover

    # -- actions -----------------------------------------------------------------------
    def _reboot(self) -> None:
        if self.hardware is not None:
            self.hardware.reboot()  # a real reboot raises RebootPending: resumed after boot
        else:
            boot(self.paths, self.backend, floor=self.monotonic.read(), tpm=self.config.tpm)

    def _edit_env(self, change: Callable[[BootEnv], bool]) -> None:
        env = BootEnv.load(self.paths.bootenv)
        if change(env):
            try:
                env.save(self.paths.bootenv)
            except OSError as e:
                raise DeviceStorageError(f"cannot write the boot environment: {e.strerror}") from e

    def _staged(self, state: InstallState) -> Path:
        target = _target(state)
        return self.paths.staging / f"{target.sha256}.{target.target}"

    def _stream(self, state: InstallState, slot: str) -> Event:  # noqa: PLR0915 - encodings in order, then the image
        """Stream the selected target into ``slot`` (after its SBOM), resuming if possible."""
        target = _target(state)
        if self._session is None:
            self._session = self._session_factory()
            self._session.refresh()
        session = self._session
        info = session.find_target(target.target)
        if info is None or info.hashes.get("sha256") != target.sha256:
            return Withdrawn()
        if info.length != target.length:
            raise VerificationError(f"{info.path}: verified length differs from the selection")
        self.paths.staging.mkdir(exist_ok=True)
        self._download_sbom(info)
        url = session.target_url(info)

        via: str | None = None  # the blob whose decoding the next checkpoint records

        def on_checkpoint(ck: Checkpoint) -> None:
            state.written, state.written_sha256, state.stalled_runs = ck.written, ck.sha256, 0
            state.written_via = via
            state.save(self.paths.install_state)

        pacer = None
        if self._progress is not None:
            report, total = self._progress, target.length
            pacer = ProgressPacer(lambda n: report("install", n, total))
        resume = None
        if state.written and state.written_sha256:
            resume = Checkpoint(state.written, state.written_sha256)
        # A delta or compressed blob first when the target offers one (ADR 0018); a plain
        # image being resumed keeps its checkpoint instead, and a checkpoint written by
        # decoding a blob resumes on that blob's path only (ADR 0021).
        encoded, _ = (
            ([], [])
            if resume and state.written_via is None
            else encoded_paths(
                session, info, running=self._running(state), slot_size=self._slot_size(slot)
            )
        )
        if resume and state.written_via not in {None, *(p.blob.path for p in encoded)}:
            logger.info(
                "%s: the checkpoint's encoding is not offered now; starting over", info.path
            )
            resume = None
            self._forget_checkpoint(state)
        for path in encoded:
            via = path.blob.path
            try:
                with tuf_errors(f"download of {path.blob.path}"):
                    stats = stream_to_slot(
                        backend=self.backend,
                        slot=slot,
                        target=path.blob,
                        open_stream=_opener(session, path.blob),
                        resume=resume if state.written_via == via else None,
                        checkpoint_bytes=self.config.resume_checkpoint_bytes,
                        on_checkpoint=on_checkpoint,
                        stop=self._stop,
                        progress=pacer,
                        transform=path.transform,
                        image=ImageCheck(info.length, target.sha256),
                        after_chunk=_stream_fault(),
                    )
            except StopRequestedError:
                raise
            except OtaguardError as e:
                logger.warning("%s: %s failed: %s; falling back", info.path, path.kind,
                               e.diagnostics())  # fmt: skip
                # What this path wrote is not known to be the image: the next path
                # starts from byte 0, never from its checkpoint.
                resume = None
                self._forget_checkpoint(state)
                continue
            logger.info("%s obtained by %s (%d bytes downloaded, slot written from byte %d)",
                        info.path, path.kind, stats.downloaded, stats.resumed_at)  # fmt: skip
            if pacer is not None:
                pacer(0, final=True)
            self.streams.append(stats)
            self._report_downloaded(stats.downloaded, target.length)
            state.written, state.written_sha256 = target.length, target.sha256
            return Streamed()
        if encoded:
            logger.info("%s: downloading the full image", info.path)
        via = None
        with tuf_errors(f"download of {info.path}"):
            stats = stream_to_slot(
                backend=self.backend,
                slot=slot,
                target=info,
                open_stream=lambda offset: session.fetcher.stream_range(
                    url, start=offset, max_length=info.length
                ),
                resume=resume,
                checkpoint_bytes=self.config.resume_checkpoint_bytes,
                on_checkpoint=on_checkpoint,
                stop=self._stop,
                progress=pacer,
                after_chunk=_stream_fault(),
            )
        if pacer is not None:
            pacer(0, final=True)
        self.streams.append(stats)
        state.written, state.written_sha256 = target.length, target.sha256
        return Streamed()

    def _forget_checkpoint(self, state: InstallState) -> None:
        """Drop the resume point (persisted before another path writes the slot)."""
        if state.written or state.written_via is not None:
            state.written, state.written_sha256, state.written_via = 0, None, None
            state.save(self.paths.install_state)

    def _slot_size(self, slot: str) -> int:
        """What ``slot`` can hold: its backend's capacity, at most the configured cap."""
        capacity = self.backend.capacity(slot)
        cap = self.config.max_image_bytes
        return cap if capacity is None else min(cap, capacity)

    def _report_downloaded(self, n: int, total: int) -> None:
        """Tell the progress display what an encoded stream downloaded (far below total)."""
        if self._progress is not None:
            self._progress("downloaded", n, total)

    def _running(self, state: InstallState) -> RunningImage | None:
        """The active slot's recorded image: the base a delta may apply to."""
        slot = state.from_slot
        image = BootEnv.load(self.paths.bootenv).slots.get(slot) if slot else None
        if slot is None or image is None:
            return None
        return RunningImage(image.sha256, image.length, lambda: self.backend.open_slot(slot))

    def _download_sbom(self, image: TargetFile) -> None:
        """Download and verify the SBOM ``image``'s custom binds, before the image.

        Through the same python-tuf path as the image: the SBOM target of the verified
        targets metadata, its length and hash checked while it streams. It must be the
        target the binding names with the binding's length and hash.

        Raises:
            VerificationError: no binding, the SBOM target is absent or differs from the
                binding, or the downloaded bytes do not match (tampered).
        """
        assert self._session is not None  # noqa: S101 - _download opened it
        ref = ReleaseInfo.from_custom(image.custom).sbom
        if ref is None:
            raise VerificationError(f"{image.path} carries no SBOM binding; refusing it")
        sbom = self._session.find_target(ref.path)
        if sbom is None:
            raise VerificationError(f"the SBOM {ref.path} of {image.path} is missing")
        if sbom.length != ref.length or sbom.hashes.get("sha256") != ref.sha256:
            raise VerificationError(f"the SBOM {ref.path} is not the one {image.path} binds")
        staged = self.paths.staging / f"{ref.sha256}.{ref.path}"
        try:
            self._session.download(sbom, staged)
        finally:
            staged.unlink(missing_ok=True)
        logger.info("SBOM %s of %s verified (sha256 %s)", ref.path, image.path, ref.sha256)

    def _health_check(self, state: InstallState, slot: str) -> str | None:
        target = _target(state)
        if self.config.unsafe_no_health_check:
            warn_insecure("no health check: the new image is committed as soon as it boots")
            return None
        if self.config.health_command is None:
            raise ConfigError("no health check is configured")
        env = dict(os.environ)
        env.update(
            OTAGUARD_DEVICE_DIR=str(self.paths.root),
            OTAGUARD_SLOT=slot,
            OTAGUARD_VERSION=target.version,
        )
        try:
            proc = subprocess.Popen(
                self.config.health_command,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as e:
            return f"health check could not run: {e.strerror}"
        deadline = time.monotonic() + self.config.health_timeout_s
        try:
            while True:
                try:
                    code = proc.wait(timeout=HEALTH_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if self._stop.is_set():
                        raise StopRequestedError("stopped during the health check") from None
                    if time.monotonic() > deadline:
                        return f"health check timed out after {self.config.health_timeout_s:g} s"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return None if code == 0 else f"health check exited with {code}"


# -- boot environment edits (each returns whether it changed anything) -------------------
def _target(state: InstallState) -> SlotImage:
    if state.target is None:
        raise RuntimeError("install has no target")
    return state.target


def _invalidate(env: BootEnv, slot: str) -> bool:
    if env.slots.get(slot) is None and env.try_slot != slot:
        return False
    env.slots[slot] = None
    if env.try_slot == slot:
        env.try_slot, env.tries_left = None, 0
    return True


def _arm(env: BootEnv, slot: str, image: SlotImage, tries: int) -> bool:
    env.slots[slot] = image
    env.try_slot, env.tries_left, env.fallback = slot, tries, None
    return True


def _set_primary(env: BootEnv, slot: str) -> bool:
    if env.primary == slot and env.try_slot is None:
        return False
    env.primary, env.try_slot, env.tries_left = slot, None, 0
    return True


def _retire(env: BootEnv, keep: str, floor: Floor) -> bool:
    changed = False
    for s in SLOTS:
        image = env.slots.get(s)
        if s == keep or image is None:
            continue
        try:
            floor.check(Version.parse(image.version), image.security_counter)
        except (DowngradeError, ValueError):
            # Below the floor: a bootloader must never start it again (retired).
            env.slots[s] = None
            changed = True
    return changed
