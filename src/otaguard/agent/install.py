"""The A/B install as a small state machine, every transition persisted atomically.

:func:`next_step` is pure: from the persisted :class:`InstallState` and what the
bootloader reports (which slot is running, which slot is marked to try) it names the one
step to perform next. :class:`Installer` performs a step, persists the new state, and
asks again. Because the state is on disk after every step, power may be cut anywhere:
the next ``boot`` plus ``update`` resumes from the last persisted step.

Phases (after ``idle`` an update is *selected* from verified metadata)::

    selected --download--> downloaded --write--> written --verify_slot--> verified
      --arm--> armed --reboot/health_check--> healthy --commit--> idle (updated)
    armed/healthy, new slot not running or unhealthy --roll_back--> idle (rolled back)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from otaguard._fs import atomic_write_json
from otaguard.agent.boot import boot, read_booted
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.monotonic import MonotonicStore
from otaguard.agent.slots import CHUNK, BootEnv, SlotBackend, SlotImage
from otaguard.agent.updater import Offer, TufSession
from otaguard.model.errors import ConfigError
from otaguard.model.version import Version

__all__ = ["FAULT_ENV", "InstallState", "Installer", "Phase", "Step", "next_step"]

logger = logging.getLogger(__name__)

#: Fault injection for power-cut tests: the agent SIGKILLs itself right after the named
#: point (a step name, or ``write-partial`` / ``commit-bootenv`` inside a step).
FAULT_ENV: Final = "OTAGUARD_TEST_KILL_AFTER"
# Remembered rolled-back images; the oldest are forgotten first.
MAX_REJECTED: Final = 32
# A slot that twice fails to read back what was written is broken hardware: give up.
MAX_WRITE_ATTEMPTS: Final = 2


class Phase(StrEnum):
    """Persisted phase of an install."""

    IDLE = "idle"
    SELECTED = "selected"
    DOWNLOADED = "downloaded"
    WRITTEN = "written"
    VERIFIED = "verified"
    ARMED = "armed"
    HEALTHY = "healthy"
    ROLLING_BACK = "rolling-back"


class Step(StrEnum):
    """One action of the install."""

    DOWNLOAD = "download"
    WRITE = "write"
    VERIFY_SLOT = "verify_slot"
    ARM = "arm"
    REBOOT = "reboot"
    HEALTH_CHECK = "health_check"
    COMMIT = "commit"
    ROLL_BACK = "roll_back"
    DONE = "done"


@dataclass
class InstallState:
    """Everything the install machine persists."""

    phase: Phase = Phase.IDLE
    target: SlotImage | None = None
    from_slot: str | None = None
    to_slot: str | None = None
    reason: str | None = None
    write_attempts: int = 0
    last_result: dict[str, Any] | None = None
    history: list[str] = field(default_factory=list)
    #: sha256 of images that failed here and were rolled back; not selected again
    rejected: list[str] = field(default_factory=list)
    #: set when rolling back because the image itself failed (then it joins ``rejected``)
    bad_image: bool = False

    @classmethod
    def load(cls, path: Path) -> InstallState:
        """Read the state; a missing file is a device that never installed anything.

        Raises:
            ConfigError: the file is corrupt.
        """
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise ConfigError(f"install state {path} is corrupt") from e
        try:
            target = SlotImage(**raw["target"]) if raw.get("target") else None
            return cls(
                phase=Phase(raw["phase"]),
                target=target,
                from_slot=raw.get("from_slot"),
                to_slot=raw.get("to_slot"),
                reason=raw.get("reason"),
                write_attempts=int(raw.get("write_attempts", 0)),
                last_result=raw.get("last_result"),
                history=list(raw.get("history", [])),
                rejected=[str(r) for r in raw.get("rejected", [])][-MAX_REJECTED:],
                bad_image=bool(raw.get("bad_image", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"install state {path} is corrupt") from e

    def save(self, path: Path) -> None:
        """Persist atomically."""
        data = asdict(self)
        data["phase"] = self.phase.value
        atomic_write_json(path, data)


def next_step(  # noqa: PLR0911 - one return per phase reads best
    state: InstallState, *, booted_slot: str, try_slot: str | None
) -> Step:
    """Name the next step. Pure: no I/O, every input passed in."""
    match state.phase:
        case Phase.IDLE:
            return Step.DONE
        case Phase.SELECTED:
            return Step.DOWNLOAD
        case Phase.DOWNLOADED:
            return Step.WRITE
        case Phase.WRITTEN:
            return Step.VERIFY_SLOT
        case Phase.VERIFIED:
            return Step.ARM
        case Phase.ARMED:
            if booted_slot == state.to_slot:
                return Step.HEALTH_CHECK
            if try_slot == state.to_slot:
                return Step.REBOOT
            # The bootloader gave up on the new slot (tries exhausted or bad digest).
            return Step.ROLL_BACK
        case Phase.HEALTHY:
            return Step.COMMIT if booted_slot == state.to_slot else Step.ROLL_BACK
        case Phase.ROLLING_BACK:
            return Step.ROLL_BACK
    raise RuntimeError(f"unknown phase {state.phase}")  # pragma: no cover


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        logger.warning("fault injection: killing the agent after %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


def file_sha256(path: Path) -> str:
    """Stream-hash a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


ProgressFn = Callable[[str, int, int], None]


class Installer:
    """Performs install steps against a device's slots, boot environment and store."""

    def __init__(
        self,
        *,
        paths: DevicePaths,
        config: DeviceConfig,
        backend: SlotBackend,
        monotonic: MonotonicStore,
        session_factory: Callable[[], TufSession],
        progress: ProgressFn | None = None,
    ):
        self.paths = paths
        self.config = config
        self.backend = backend
        self.monotonic = monotonic
        self._session_factory = session_factory
        self._session: TufSession | None = None
        self._progress = progress

    # -- entry points ----------------------------------------------------------------
    def begin(self, offer: Offer, *, from_slot: str, to_slot: str) -> InstallState:
        """Persist the selection of ``offer``: the first transition of an install."""
        state = InstallState.load(self.paths.install_state)
        state.phase = Phase.SELECTED
        state.target = SlotImage(
            target=offer.path,
            version=str(offer.info.version),
            security_counter=offer.info.security_counter,
            sha256=offer.sha256,
            length=offer.target.length,
        )
        state.from_slot, state.to_slot = from_slot, to_slot
        state.reason, state.write_attempts, state.history = None, 0, ["selected"]
        state.bad_image = False
        state.save(self.paths.install_state)
        return state

    def drive(self, session: TufSession | None = None) -> InstallState:
        """Run steps until the install is committed or rolled back."""
        self._session = session
        while True:
            state = InstallState.load(self.paths.install_state)
            booted = read_booted(self.paths)
            env = BootEnv.load(self.paths.bootenv)
            if booted is None:
                booted = boot(self.paths, self.backend)
            step = next_step(state, booted_slot=booted.slot, try_slot=env.try_slot)
            if step is Step.DONE:
                return state
            logger.info("install step %s (phase %s)", step.value, state.phase.value)
            getattr(self, f"_{step.value}")(state, env)
            state.history.append(step.value)
            state.save(self.paths.install_state)
            _fault_point(step.value)

    def close(self) -> None:
        """Close the network session, if one was opened."""
        if self._session is not None:
            self._session.fetcher.close()

    # -- steps -----------------------------------------------------------------------
    def _staged(self, state: InstallState) -> Path:
        assert state.target is not None  # noqa: S101 - phases after SELECTED carry a target
        return self.paths.staging / f"{state.target.sha256}.{state.target.target}"

    def _finish(self, state: InstallState, outcome: str, detail: str) -> None:
        assert state.target is not None  # noqa: S101
        state.last_result = {
            "outcome": outcome,
            "target": state.target.target,
            "version": state.target.version,
            "detail": detail,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        state.phase = Phase.IDLE
        self._staged(state).unlink(missing_ok=True)

    def _download(self, state: InstallState, env: BootEnv) -> None:
        assert state.target is not None  # noqa: S101
        if self._session is None:
            self._session = self._session_factory()
            self._session.refresh()
        target = self._session.find_target(state.target.target)
        if target is None or target.hashes.get("sha256") != state.target.sha256:
            self._finish(state, "failed", "target withdrawn from the repository")
            return
        self.paths.staging.mkdir(exist_ok=True)
        if self._progress:
            total = target.length
            self._session.fetcher.on_chunk = lambda n: self._progress("download", n, total)  # type: ignore[misc]
        try:
            self._session.download(target, self._staged(state))
        finally:
            self._session.fetcher.on_chunk = None
        state.phase = Phase.DOWNLOADED

    def _write(self, state: InstallState, env: BootEnv) -> None:
        assert state.target is not None  # noqa: S101 - set by begin()
        assert state.to_slot is not None  # noqa: S101
        staged = self._staged(state)
        # The staged file survived a possible power cut: check it again before use.
        try:
            ok = (
                staged.stat().st_size == state.target.length
                and file_sha256(staged) == state.target.sha256
            )
        except OSError:
            ok = False
        if not ok:
            staged.unlink(missing_ok=True)
            state.phase = Phase.SELECTED
            return
        # Invalidate the slot before touching it, so a torn write is never bootable.
        if env.slots.get(state.to_slot) is not None or env.try_slot == state.to_slot:
            env.slots[state.to_slot] = None
            if env.try_slot == state.to_slot:
                env.try_slot = None
            env.save(self.paths.bootenv)
        total = state.target.length
        written = 0

        def on_chunk(n: int) -> None:
            nonlocal written
            written += n
            if self._progress:
                self._progress("write", n, total)
            if written >= CHUNK:
                _fault_point("write-partial")

        state.write_attempts += 1
        self.backend.write(state.to_slot, staged, progress=on_chunk)
        state.phase = Phase.WRITTEN

    def _verify_slot(self, state: InstallState, env: BootEnv) -> None:
        assert state.target is not None  # noqa: S101 - set by begin()
        assert state.to_slot is not None  # noqa: S101
        if self.backend.digest(state.to_slot, state.target.length) == state.target.sha256:
            state.phase = Phase.VERIFIED
        elif state.write_attempts >= MAX_WRITE_ATTEMPTS:
            self._finish(
                state, "failed", f"slot {state.to_slot} does not read back what was written"
            )
        else:
            state.phase = Phase.DOWNLOADED

    def _arm(self, state: InstallState, env: BootEnv) -> None:
        assert state.target is not None  # noqa: S101 - set by begin()
        assert state.to_slot is not None  # noqa: S101
        # Defence in depth: the floor may have moved since selection.
        self.monotonic.read().check(
            Version.parse(state.target.version), state.target.security_counter
        )
        env.slots[state.to_slot] = state.target
        env.try_slot, env.tries_left = state.to_slot, self.config.max_boot_tries
        env.fallback = None
        env.save(self.paths.bootenv)
        self._staged(state).unlink(missing_ok=True)
        state.phase = Phase.ARMED

    def _reboot(self, state: InstallState, env: BootEnv) -> None:
        # Simulated reboot: on hardware this is a real reboot, and the agent resumes here.
        boot(self.paths, self.backend)

    def _health_check(self, state: InstallState, env: BootEnv) -> None:
        assert state.target is not None  # noqa: S101 - set by begin()
        assert state.to_slot is not None  # noqa: S101
        problem = self._run_health_check(state)
        if problem is None:
            state.phase = Phase.HEALTHY
        else:
            state.reason, state.bad_image = problem, True
            state.phase = Phase.ROLLING_BACK

    def _run_health_check(self, state: InstallState) -> str | None:
        assert state.target is not None  # noqa: S101 - set by begin()
        assert state.to_slot is not None  # noqa: S101
        if self.config.health_command is None:
            digest = self.backend.digest(state.to_slot, state.target.length)
            return (
                None if digest == state.target.sha256 else "booted image does not match the target"
            )
        env = dict(os.environ)
        env.update(
            OTAGUARD_DEVICE_DIR=str(self.paths.root),
            OTAGUARD_SLOT=state.to_slot,
            OTAGUARD_VERSION=state.target.version,
        )
        try:
            proc = subprocess.run(
                self.config.health_command,
                env=env,
                capture_output=True,
                timeout=self.config.health_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"health check timed out after {self.config.health_timeout_s:g} s"
        except OSError as e:
            return f"health check could not run: {e.strerror}"
        if proc.returncode != 0:
            return f"health check exited with {proc.returncode}"
        return None

    def _commit(self, state: InstallState, env: BootEnv) -> None:
        assert state.target is not None  # noqa: S101 - set by begin()
        assert state.to_slot is not None  # noqa: S101
        if env.primary != state.to_slot or env.try_slot is not None:
            env.primary, env.try_slot, env.tries_left = state.to_slot, None, 0
            env.save(self.paths.bootenv)
        _fault_point("commit-bootenv")
        self.monotonic.raise_to(Version.parse(state.target.version), state.target.security_counter)
        self._finish(
            state, "updated", f"now running {state.target.version} from slot {state.to_slot}"
        )

    def _roll_back(self, state: InstallState, env: BootEnv) -> None:
        assert state.target is not None  # noqa: S101 - set by begin()
        assert state.to_slot is not None  # noqa: S101
        if state.phase is not Phase.ROLLING_BACK:
            # Coming from armed/healthy: the bootloader did not (or no longer) run the new
            # slot. The image is bad if it kept failing until the tries ran out; a slot that
            # failed verification is a storage fault and the image may be tried again.
            booted = read_booted(self.paths)
            state.bad_image = env.fallback == "tries-exhausted"
            state.reason = (
                booted.note if booted is not None and booted.note else "the new slot did not boot"
            )
            state.phase = Phase.ROLLING_BACK
            state.save(self.paths.install_state)
        reason = state.reason or "rolled back"
        if env.try_slot == state.to_slot or env.slots.get(state.to_slot) is not None:
            env.try_slot = None
            env.slots[state.to_slot] = None
            env.save(self.paths.bootenv)
        booted = read_booted(self.paths)
        if booted is None or booted.slot == state.to_slot:
            boot(self.paths, self.backend)
        if state.bad_image and state.target.sha256 not in state.rejected:
            state.rejected = [*state.rejected, state.target.sha256][-MAX_REJECTED:]
        self._finish(state, "rolled-back", reason)
