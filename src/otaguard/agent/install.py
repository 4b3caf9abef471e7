"""The A/B install as a pure state machine and a thin driver that performs its actions.

:func:`transition` is pure: ``(state, observation) -> (state, actions)``. The observation
is what the last actions produced (an :data:`Event`) plus what the device looks like now
(:class:`DeviceView`: booted slot, try slot, anti-rollback floor). The actions are the
side effects to perform next (write a slot, set the boot environment, raise the floor,
reboot...). :class:`Installer` persists the new state atomically, performs the actions
one by one and feeds their outcome back. Rules that make a power cut harmless anywhere:

- a phase's actions are idempotent, and the phase advances only on the event saying
  they completed; on start-up the driver sends :class:`Resumed` and the machine
  re-issues the current phase's actions;
- a refusal or failure before the new slot is armed is a transition too: the install
  moves to ``abandoning`` (invalidate the target slot, discard the download) and ends
  ``refused`` or ``failed`` with its cause recorded, never stuck in a phase;
- the target slot is invalidated in the boot environment before its first byte is
  written, and armed only after the streamed bytes matched the verified target's length
  and hashes and after the anti-rollback floor allowed it;
- the image streams from the network into the slot (no staging copy); the driver records
  in the state how far the slot was written and fsynced (``written`` and the prefix's
  digest), so a stream cut by power loss or a dropped connection continues from there
  with a Range request after re-hashing the prefix (ADR 0017).

Phases (after ``idle`` an update is *selected* from verified metadata)::

    selected --InvalidateSlot, StreamToSlot--> verified --(floor check) Arm--> armed
      --Reboot, HealthCheck--> healthy --SetPrimary, RaiseFloor, RetireBelowFloor-->
      idle (updated)
    selected, transport failure with part of the image in the slot --> selected (resumes
      at the next update; abandoned after MAX_STALLED_RUNS runs in a row without progress)
    armed/healthy, new slot not running or unhealthy --> rolling-back --> idle
    any other failure or refusal before armed --> abandoning --> idle (failed / refused)

``downloaded`` and ``written`` are phases of the staged install an older agent may have
persisted; they resume as ``selected`` (the stream starts over).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from otaguard._fs import atomic_write_json
from otaguard.agent.monotonic import Floor
from otaguard.agent.slots import SlotImage
from otaguard.model.errors import ConfigError, DowngradeError
from otaguard.model.version import Version

__all__ = [
    "MAX_REJECTED",
    "MAX_STALLED_RUNS",
    "Action",
    "ActionFailed",
    "Arm",
    "DeviceView",
    "DiscardStaged",
    "Done",
    "Event",
    "HealthCheck",
    "HealthPending",
    "HealthResult",
    "InstallState",
    "InvalidateSlot",
    "Observation",
    "Phase",
    "RaiseFloor",
    "Reboot",
    "Resumed",
    "RetireBelowFloor",
    "SetPrimary",
    "StreamToSlot",
    "Streamed",
    "Withdrawn",
    "transition",
]

logger = logging.getLogger(__name__)

# Remembered rolled-back images; the oldest are forgotten first.
MAX_REJECTED: Final = 32
# A download that fails this many runs in a row without writing a byte more is given up
# (the device then selects afresh, perhaps a newer release); progress resets the count.
MAX_STALLED_RUNS: Final = 5


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
    ABANDONING = "abandoning"


# -- actions: the side effects the driver performs ---------------------------------------
@dataclass(frozen=True)
class StreamToSlot:
    """Stream the target from the network into ``slot``, checking it against the verified
    target (length cap, hashes) as it is written; resume from the recorded offset."""

    slot: str
    name = "stream_to_slot"


@dataclass(frozen=True)
class InvalidateSlot:
    """Mark ``slot`` as holding nothing bootable in the boot environment."""

    slot: str
    name = "invalidate_slot"


@dataclass(frozen=True)
class Arm:
    """Record ``image`` for ``slot`` and mark it "try" with the configured tries."""

    slot: str
    image: SlotImage
    name = "arm"


@dataclass(frozen=True)
class Reboot:
    """Reboot (simulated: run the bootloader)."""

    name = "reboot"


@dataclass(frozen=True)
class HealthCheck:
    """Run the device's health check against the new slot."""

    slot: str
    name = "health_check"


@dataclass(frozen=True)
class SetPrimary:
    """Make ``slot`` the primary slot and clear the try flag."""

    slot: str
    name = "set_primary"


@dataclass(frozen=True)
class RaiseFloor:
    """Raise the anti-rollback floor (never lowers it)."""

    version: str
    security_counter: int
    name = "raise_floor"


@dataclass(frozen=True)
class RetireBelowFloor:
    """Invalidate every slot but ``keep`` whose image is below the floor."""

    keep: str
    name = "retire_slot"


@dataclass(frozen=True)
class DiscardStaged:
    """Delete what staging holds for the install (the SBOM's temp file, old staged images)."""

    name = "discard_staged"


Action = (
    StreamToSlot
    | InvalidateSlot
    | Arm
    | Reboot
    | HealthCheck
    | SetPrimary
    | RaiseFloor
    | RetireBelowFloor
    | DiscardStaged
)


# -- events: what the actions produced ---------------------------------------------------
@dataclass(frozen=True)
class Resumed:
    """The driver (re)started: re-issue the current phase's actions."""


@dataclass(frozen=True)
class Done:
    """The phase's actions completed (none of them reports anything)."""


@dataclass(frozen=True)
class Streamed:
    """The slot holds the target: its length and every hash matched while it streamed."""


@dataclass(frozen=True)
class Withdrawn:
    """The selected target is no longer in the verified metadata."""


@dataclass(frozen=True)
class HealthPending:
    """The health checks run as systemd units; ``mark-good`` brings their verdict."""


@dataclass(frozen=True)
class HealthResult:
    """The health check's verdict: ``problem`` is ``None`` when healthy."""

    problem: str | None


@dataclass(frozen=True)
class ActionFailed:
    """An action raised an otaguard error.

    ``kind`` is one of "verification", "downgrade", "transport", "storage", "config".
    """

    action: str
    kind: str
    message: str


Event = Resumed | Done | Streamed | Withdrawn | HealthPending | HealthResult | ActionFailed


@dataclass(frozen=True)
class DeviceView:
    """What the device looks like when the machine decides (read fresh by the driver)."""

    booted: str | None  # None: booted into recovery
    try_slot: str | None
    floor: Floor
    boot_fallback: str | None = None
    boot_note: str = ""
    #: the image the boot environment records for each slot
    slots: Mapping[str, SlotImage | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    """The input of :func:`transition`."""

    event: Event
    view: DeviceView


# -- state -------------------------------------------------------------------------------
@dataclass
class InstallState:
    """Everything the install machine persists."""

    phase: Phase = Phase.IDLE
    target: SlotImage | None = None
    from_slot: str | None = None
    to_slot: str | None = None
    reason: str | None = None
    #: bytes of the target written to ``to_slot`` and fsynced (the resume point)
    written: int = 0
    #: SHA-256 of those ``written`` bytes, to check the slot's prefix before resuming
    written_sha256: str | None = None
    #: the encoded blob (delta or compressed target path) whose decoding wrote those
    #: bytes, ``None`` for the image itself: a checkpoint resumes only on the path that
    #: wrote it (ADR 0021)
    written_via: str | None = None
    #: runs in a row whose download failed without progress (see MAX_STALLED_RUNS)
    stalled_runs: int = 0
    last_result: dict[str, Any] | None = None
    history: list[str] = field(default_factory=list)
    #: sha256 of images that failed here and were rolled back; not selected again
    rejected: list[str] = field(default_factory=list)
    #: set when rolling back because the image itself failed (then it joins ``rejected``)
    bad_image: bool = False
    #: outcome and error kind the install ends with once ``abandoning`` has cleaned up
    pending: dict[str, str] | None = None

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
        if not isinstance(raw, dict):  # found by tests/fuzz: a JSON list is not a state
            raise ConfigError(f"install state {path} is corrupt: not a JSON object")
        try:
            target = SlotImage(**raw["target"]) if raw.get("target") else None
            return cls(
                phase=Phase(raw["phase"]),
                target=target,
                from_slot=raw.get("from_slot"),
                to_slot=raw.get("to_slot"),
                reason=raw.get("reason"),
                written=int(raw.get("written", 0)),
                written_sha256=raw.get("written_sha256"),
                written_via=raw.get("written_via"),
                stalled_runs=int(raw.get("stalled_runs", 0)),
                last_result=raw.get("last_result"),
                history=list(raw.get("history", [])),
                rejected=[str(r) for r in raw.get("rejected", [])][-MAX_REJECTED:],
                bad_image=bool(raw.get("bad_image", False)),
                pending=raw.get("pending"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # AttributeError: a nested field of the wrong JSON type (found by tests/fuzz)
            raise ConfigError(f"install state {path} is corrupt") from e

    def save(self, path: Path) -> None:
        """Persist atomically."""
        data = asdict(self)
        data["phase"] = self.phase.value
        atomic_write_json(path, data)


# -- the pure transition -----------------------------------------------------------------
def _target(state: InstallState) -> tuple[SlotImage, str]:
    if state.target is None or state.to_slot is None:
        raise RuntimeError(f"install in phase {state.phase.value} has no target")
    return state.target, state.to_slot


def _result(state: InstallState, outcome: str, detail: str, *, now: str) -> dict[str, Any]:
    target, _ = _target(state)
    result: dict[str, Any] = {
        "outcome": outcome,
        "target": target.target,
        "version": target.version,
        "detail": detail,
        "time": now,
        "recovery": state.from_slot is None,
    }
    if state.pending and state.pending.get("error"):
        result["error"] = state.pending["error"]
    return result


def _abandon(
    state: InstallState, view: DeviceView, *, outcome: str, kind: str, detail: str
) -> tuple[InstallState, tuple[Action, ...]]:
    new = dataclasses.replace(
        state,
        phase=Phase.ABANDONING,
        reason=detail,
        pending={"outcome": outcome, "error": kind},
    )
    return new, _abandon_actions(new, view)


def _abandon_actions(state: InstallState, view: DeviceView) -> tuple[Action, ...]:
    _, to = _target(state)
    # Never invalidate the slot the device is running from.
    invalidate: tuple[Action, ...] = () if view.booted == to else (InvalidateSlot(to),)
    return (*invalidate, DiscardStaged())


def _stream_actions(state: InstallState) -> tuple[Action, ...]:
    _, to = _target(state)
    # Invalidate first (idempotent), so a torn or partial slot is never bootable.
    return (InvalidateSlot(to), StreamToSlot(to))


def _arm_or_refuse(
    state: InstallState, view: DeviceView
) -> tuple[InstallState, tuple[Action, ...]]:
    target, to = _target(state)
    # Defence in depth: the floor may have moved since selection (another install, a
    # restored backup); the image must not even be armed below it.
    try:
        view.floor.check(Version.parse(target.version), target.security_counter)
    except DowngradeError as e:
        return _abandon(state, view, outcome="refused", kind="downgrade", detail=str(e))
    return state, (Arm(to, target), DiscardStaged())


def _commit_actions(state: InstallState) -> tuple[Action, ...]:
    target, to = _target(state)
    return (
        SetPrimary(to),
        RaiseFloor(target.version, target.security_counter),
        RetireBelowFloor(keep=to),
        DiscardStaged(),
    )


def _rollback_actions(state: InstallState, view: DeviceView) -> tuple[Action, ...]:
    _, to = _target(state)
    reboot: tuple[Action, ...] = (Reboot(),) if view.booted == to else ()
    return (InvalidateSlot(to), *reboot)


def _rolling_back(
    state: InstallState, view: DeviceView, *, reason: str, bad_image: bool
) -> tuple[InstallState, tuple[Action, ...]]:
    new = dataclasses.replace(state, phase=Phase.ROLLING_BACK, reason=reason, bad_image=bad_image)
    return new, _rollback_actions(new, view)


def _finish(
    state: InstallState, outcome: str, detail: str, *, now: str
) -> tuple[InstallState, tuple[Action, ...]]:
    result = _result(state, outcome, detail, now=now)
    rejected = list(state.rejected)
    bad = outcome == "rolled-back" and state.bad_image and state.target is not None
    if bad and state.target is not None and state.target.sha256 not in rejected:
        rejected = [*rejected, state.target.sha256][-MAX_REJECTED:]
    new = dataclasses.replace(
        state,
        phase=Phase.IDLE,
        last_result=result,
        rejected=rejected,
        pending=None,
        written=0,
        written_sha256=None,
        written_via=None,
        stalled_runs=0,
    )
    return new, ()


def transition(  # noqa: PLR0911, PLR0912 - one branch per (phase, event) reads best
    state: InstallState, obs: Observation, *, now: str | None = None
) -> tuple[InstallState, tuple[Action, ...]]:
    """Decide the next state and the actions to perform. Pure: no I/O.

    Args:
        state: the persisted state.
        obs: what the last actions produced and what the device looks like now.
        now: ISO time recorded in a final result (tests pass a fixed one).

    Returns:
        The new state (to persist before performing anything) and the actions to
        perform in order; no actions means the install is over (or waits for a retry).
    """
    now = now or datetime.now(UTC).isoformat(timespec="seconds")
    ev, view = obs.event, obs.view
    phase = state.phase
    if phase is Phase.IDLE:
        return state, ()
    target, to = _target(state)
    if phase in (Phase.DOWNLOADED, Phase.WRITTEN):
        # Persisted by an agent that staged downloads: stream afresh into the slot.
        fresh = dataclasses.replace(
            state, phase=Phase.SELECTED, written=0, written_sha256=None, written_via=None
        )
        return fresh, _stream_actions(fresh)
    if (
        isinstance(ev, ActionFailed)
        and phase is Phase.SELECTED
        and ev.kind == "transport"
        and state.written > 0
        and state.stalled_runs + 1 < MAX_STALLED_RUNS
    ):
        # A dropped connection or an unreachable server after part of the image is in
        # the slot: keep it and resume at the next update (the driver resets the count
        # when a checkpoint lands). With nothing written there is nothing to keep: the
        # install ends failed as before and the next poll selects afresh.
        return dataclasses.replace(state, stalled_runs=state.stalled_runs + 1), ()
    if isinstance(ev, ActionFailed) and phase in (Phase.SELECTED, Phase.VERIFIED):
        outcome = "refused" if ev.kind in ("verification", "downgrade") else "failed"
        return _abandon(state, view, outcome=outcome, kind=ev.kind, detail=ev.message)

    match phase:
        case Phase.SELECTED:
            if isinstance(ev, Streamed):
                return _arm_or_refuse(dataclasses.replace(state, phase=Phase.VERIFIED), view)
            if isinstance(ev, Withdrawn):
                return _abandon(
                    state,
                    view,
                    outcome="failed",
                    kind="withdrawn",
                    detail="target withdrawn from the repository",
                )
            return state, _stream_actions(state)
        case Phase.VERIFIED:
            if isinstance(ev, Done):
                return dataclasses.replace(state, phase=Phase.ARMED), (Reboot(),)
            if view.slots.get(to) == target:
                # Armed before the power went: never re-arm (that would hand a slot the
                # bootloader already gave up on a fresh set of tries).
                armed = dataclasses.replace(state, phase=Phase.ARMED)
                return transition(armed, Observation(Resumed(), view), now=now)
            return _arm_or_refuse(state, view)
        case Phase.ARMED:
            if isinstance(ev, HealthPending):
                return state, ()  # waits for mark-good (or the bootloader's fallback)
            if isinstance(ev, HealthResult):
                if ev.problem is None:
                    return dataclasses.replace(state, phase=Phase.HEALTHY), _commit_actions(state)
                return _rolling_back(state, view, reason=ev.problem, bad_image=True)
            if isinstance(ev, ActionFailed):
                return state, ()  # resumed later; the driver reports the error
            if view.booted == to:
                return state, (HealthCheck(to),)
            if view.try_slot == to:
                return state, (Reboot(),)
            # The bootloader gave up on the new slot: tries exhausted (the image is bad)
            # or it failed verification (storage; the image may be tried again).
            return _rolling_back(
                state,
                view,
                reason=view.boot_note or "the new slot did not boot",
                bad_image=view.boot_fallback == "tries-exhausted",
            )
        case Phase.HEALTHY:
            if isinstance(ev, Done):
                detail = f"now running {target.version} from slot {to}"
                if state.from_slot is None:
                    detail = f"recovered: {detail}"
                return _finish(state, "updated", detail, now=now)
            if isinstance(ev, ActionFailed):
                return state, ()  # resumed later; the driver reports the error
            if view.booted == to:
                return state, _commit_actions(state)
            return _rolling_back(
                state,
                view,
                reason=view.boot_note or "the new slot stopped running before commit",
                bad_image=view.boot_fallback == "tries-exhausted",
            )
        case Phase.ROLLING_BACK:
            if isinstance(ev, Done):
                return _finish(state, "rolled-back", state.reason or "rolled back", now=now)
            if isinstance(ev, ActionFailed):
                return state, ()  # resumed later; the driver reports the error
            return state, _rollback_actions(state, view)
        case Phase.ABANDONING:
            if isinstance(ev, Done):
                pending = state.pending or {}
                return _finish(
                    state,
                    pending.get("outcome", "failed"),
                    state.reason or "abandoned",
                    now=now,
                )
            if isinstance(ev, ActionFailed):
                return state, ()  # resumed later; the driver reports the error
            return state, _abandon_actions(state, view)
    raise RuntimeError(f"unknown phase {phase}")  # pragma: no cover
