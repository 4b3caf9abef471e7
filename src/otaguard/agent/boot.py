"""The simulated bootloader: choose a slot, count tries, verify before starting.

Mirrors U-Boot's bootcount / RAUC's boot selection: a slot marked "try" is booted while
tries remain, each boot consumes one try *before* starting the image, and when none are
left (or the image does not verify) the bootloader falls back to the primary slot.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from otaguard._fs import atomic_write_json
from otaguard.agent.config import DevicePaths
from otaguard.agent.slots import BootEnv, SlotBackend, other_slot
from otaguard.model.errors import ConfigError, DeviceStorageError

__all__ = ["BootRecord", "boot", "read_booted"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootRecord:
    """What the bootloader started, and why."""

    slot: str
    version: str
    sha256: str
    trial: bool
    note: str
    time: str
    #: why the bootloader did not start the slot it was asked to try, if it did not:
    #: "tries-exhausted" (the image kept failing) or "verification-failed" (bad storage)
    fallback: str | None = None


def _verified(env: BootEnv, slot: str, backend: SlotBackend) -> bool:
    image = env.slots.get(slot)
    return image is not None and backend.digest(slot, image.length) == image.sha256


def boot(paths: DevicePaths, backend: SlotBackend) -> BootRecord:
    """Run one simulated boot and record it in ``run/booted.json``.

    Raises:
        DeviceStorageError: no slot holds a verified image (the device is bricked).
        ConfigError: the boot environment is missing or corrupt.
    """
    env = BootEnv.load(paths.bootenv)
    note = ""
    fallback: str | None = None
    trial = False
    if env.try_slot is not None:
        if env.tries_left > 0:
            # Consume the try before starting: a crash during this boot still counts.
            env.tries_left -= 1
            env.save(paths.bootenv)
            candidate, trial = env.try_slot, True
        else:
            note = f"boot tries of slot {env.try_slot} exhausted; fell back to {env.primary}"
            fallback = env.fallback = "tries-exhausted"
            env.try_slot = None
            env.save(paths.bootenv)
            candidate = env.primary
    else:
        candidate = env.primary

    if not _verified(env, candidate, backend):
        failed = candidate
        if trial:
            note = f"slot {failed} failed verification; fell back to {env.primary}"
            fallback = env.fallback = "verification-failed"
            env.try_slot, env.slots[failed] = None, None
            env.save(paths.bootenv)
            candidate, trial = env.primary, False
        if not _verified(env, candidate, backend):
            alt = other_slot(candidate)
            if not _verified(env, alt, backend):
                raise DeviceStorageError("no slot holds a verified image: device cannot boot")
            note = f"slot {candidate} failed verification; booted {alt}"
            env.primary, env.try_slot = alt, None
            env.save(paths.bootenv)
            candidate = alt
    image = env.slots[candidate]
    assert image is not None  # noqa: S101 - _verified() checked it
    record = BootRecord(
        slot=candidate,
        version=image.version,
        sha256=image.sha256,
        trial=trial,
        note=note,
        fallback=fallback,
        time=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    paths.booted.parent.mkdir(exist_ok=True)
    atomic_write_json(paths.booted, asdict(record))
    if note:
        logger.warning("%s", note)
    logger.info(
        "booted slot %s (version %s%s)", candidate, image.version, ", trial" if trial else ""
    )
    return record


def read_booted(paths: DevicePaths) -> BootRecord | None:
    """The record of the current boot, or ``None`` if the device has not booted."""
    try:
        return BootRecord(**json.loads(paths.booted.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"boot record {paths.booted} is corrupt") from e
