"""The simulated bootloader: choose a slot, count tries, verify and check the floor first.

Mirrors U-Boot's bootcount / RAUC's boot selection, plus the rollback protection of
U-Boot FIT images and Android Verified Boot: a slot marked "try" is booted while tries
remain, each boot consumes one try *before* starting the image, and a slot is started
only if its content matches the digest recorded for it **and** its image is not below the
anti-rollback floor (version and security counter). When the try slot fails, the primary
is booted; when no slot qualifies, the device boots into **recovery**: it starts no
firmware image, and the agent's next ``update`` installs a release at or above the floor.

A real bootloader does the same with its own means: it verifies the image signature or
hash (FIT ``hash``/``signature`` nodes, AVB vbmeta) and compares the image's rollback
index with the one stored in tamper-resistant storage (a TPM NV counter, RPMB, fuses),
refusing to boot anything lower; otaguard's commit raises that index (see README).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Final

from otaguard._fs import atomic_write_json
from otaguard.agent.config import DevicePaths
from otaguard.agent.measured_boot import measure_boot
from otaguard.agent.monotonic import Floor
from otaguard.agent.slots import SLOTS, BootEnv, SlotBackend
from otaguard.model.errors import ConfigError, DowngradeError
from otaguard.model.version import Version

__all__ = ["RECOVERY", "BootRecord", "boot", "read_booted", "slot_problem"]

logger = logging.getLogger(__name__)

#: what ``BootRecord.version`` says when no firmware image was started
RECOVERY: Final = "recovery"


@dataclass(frozen=True)
class BootRecord:
    """What the bootloader started, and why."""

    #: the slot started, or ``None`` in recovery (no slot qualified)
    slot: str | None
    version: str
    sha256: str
    trial: bool
    note: str
    time: str
    #: why the bootloader did not start the slot it was asked to try, if it did not:
    #: "tries-exhausted" (the image kept failing), "verification-failed" (bad storage)
    #: or "below-floor" (an image older than the anti-rollback floor)
    fallback: str | None = None

    @property
    def recovery(self) -> bool:
        """True when no slot held a verified image at or above the floor."""
        return self.slot is None


def slot_problem(env: BootEnv, slot: str, backend: SlotBackend, floor: Floor) -> str | None:
    """Why ``slot`` must not be started, or ``None`` when it may be.

    Checks, in order: the slot holds a recorded image; its image is not below the
    anti-rollback floor; its content matches the recorded digest.
    """
    image = env.slots.get(slot)
    if image is None:
        return f"slot {slot} holds no valid image"
    try:
        floor.check(Version.parse(image.version), image.security_counter)
    except ValueError:
        return f"slot {slot} records an invalid version"
    except DowngradeError as e:
        return f"slot {slot} is below the anti-rollback floor: {e}"
    if backend.digest(slot, image.length) != image.sha256:
        return f"slot {slot} failed verification"
    return None


def _fallback_kind(problem: str) -> str:
    return "below-floor" if "anti-rollback floor" in problem else "verification-failed"


def _any_other(
    env: BootEnv, failed: str, backend: SlotBackend, floor: Floor, notes: list[str]
) -> str | None:
    """The primary failed: start another slot that qualifies, or none (recovery)."""
    others = [s for s in SLOTS if s != failed]
    chosen = next((s for s in others if slot_problem(env, s, backend, floor) is None), None)
    if chosen is not None:
        notes.append(f"booted slot {chosen} instead")
        env.primary, env.try_slot = chosen, None
        return chosen
    for s in others:
        if (why := slot_problem(env, s, backend, floor)) is not None:
            notes.append(why)
    notes.append(
        f"no slot holds a verified image at or above the anti-rollback floor "
        f"({floor.version}, security counter {floor.security_counter}): recovery"
    )
    return None


def boot(paths: DevicePaths, backend: SlotBackend, *, floor: Floor, tpm: str | None) -> BootRecord:
    """Run one simulated boot, measure it, and record it in ``run/booted.json``.

    Args:
        paths: the device directory.
        backend: where the slot images are.
        floor: the anti-rollback floor read from the monotonic store; no slot whose
            image is below it is ever started.
        tpm: the device's TPM (TCTI): the boot is measured into its boot PCR; ``None``
            logs the measurement unattested (:mod:`.measured_boot`).

    Returns:
        The record of what was started; ``record.recovery`` when nothing qualified.

    Raises:
        ConfigError: the boot environment or the event log is missing or corrupt.
        DeviceStorageError: the TPM failed or the event log cannot be written.
    """
    env = BootEnv.load(paths.bootenv)
    notes: list[str] = []
    fallback: str | None = None
    trial = False
    if env.try_slot is not None:
        if env.tries_left > 0:
            # Consume the try before starting: a crash during this boot still counts.
            env.tries_left -= 1
            env.save(paths.bootenv)
            candidate, trial = env.try_slot, True
        else:
            notes.append(f"boot tries of slot {env.try_slot} exhausted; fell back to {env.primary}")
            fallback = env.fallback = "tries-exhausted"
            env.try_slot = None
            env.save(paths.bootenv)
            candidate = env.primary
    else:
        candidate = env.primary

    problem = slot_problem(env, candidate, backend, floor)
    if problem is not None and trial:
        notes.append(f"{problem}; fell back to {env.primary}")
        fallback = env.fallback = _fallback_kind(problem)
        env.try_slot, env.slots[candidate] = None, None
        env.save(paths.bootenv)
        candidate, trial = env.primary, False
        problem = slot_problem(env, candidate, backend, floor)
    chosen: str | None = candidate
    if problem is not None:
        notes.append(problem)
        chosen = _any_other(env, candidate, backend, floor, notes)
        env.save(paths.bootenv)
    image = env.slots[chosen] if chosen is not None else None
    record = BootRecord(
        slot=chosen,
        version=image.version if image is not None else RECOVERY,
        sha256=image.sha256 if image is not None else "",
        trial=trial,
        note="; ".join(notes),
        fallback=fallback,
        time=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    # Measured before the image would start, as a measuring bootloader does.
    measure_boot(paths, slot=record.slot, sha256=record.sha256, tpm=tpm)
    paths.booted.parent.mkdir(exist_ok=True)
    atomic_write_json(paths.booted, asdict(record))
    if record.note:
        logger.warning("%s", record.note)
    if chosen is None:
        logger.error("booted into recovery: no slot may be started")
    else:
        logger.info("booted slot %s (version %s%s)", chosen, record.version, ", trial" * trial)
    return record


def read_booted(paths: DevicePaths) -> BootRecord | None:
    """The record of the current boot, or ``None`` if the device has not booted."""
    try:
        raw = json.loads(paths.booted.read_bytes())
        return BootRecord(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"boot record {paths.booted} is corrupt") from e
