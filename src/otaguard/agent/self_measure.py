"""The agent measures the slot it booted from, once per kernel boot (ADR 0038).

A bootloader that does not measure (GRUB without its ``tpm`` module, U-Boot without
measured boot) leaves no record of what it started, yet the check-in must report a boot
measurement: the server compares it with the sha256 the image repository publishes for
the target the device says it runs. On such a device the agent takes the measurement
itself, early in each boot (``otaguard agent DIR measure-boot``, run by
``otaguard-measure-boot.service`` before the agent and mark-good), and again at any
agent command that needs one if this boot has none yet.

What it measures: the booted slot -- named by the kernel command line, as the bootloader
backend reads it, never by the environment -- hashed over the image length recorded
for that slot when it was written (``bootenv.json``, the slot status). What it writes:
an *unattested* event (no TPM, ``reset_count`` ``None``) in the same event log and form
the simulated bootloader writes, so the server's existing comparison applies unchanged.

What it does not prove: the running system hashes itself and reports the result. A
slot modified offline (a disk rewritten in another machine, a bit flip) is detected; a
compromised running system can report any digest it likes. An attested measurement
needs the bootloader to measure into a TPM PCR before the kernel starts (GRUB's ``tpm``
module): future work.

The boot is identified by the kernel's ``/proc/sys/kernel/random/boot_id`` (a fresh
random UUID per kernel boot); the virtual board writes its own per power-on.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from otaguard._fs import atomic_write_bytes, atomic_write_json
from otaguard.agent.config import DevicePaths
from otaguard.agent.measured_boot import measure_boot
from otaguard.agent.slots import BootEnv, SlotBackend
from otaguard.model.errors import ConfigError, DeviceStorageError

__all__ = ["BOOT_ID", "SelfMeasurement", "measure_booted_slot", "new_boot_id", "read_boot_id"]

logger = logging.getLogger(__name__)

#: the kernel's identifier of the current boot (a random UUID, new at every boot)
BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
# A boot id is a UUID (36 characters); anything longer is not one.
MAX_BOOT_ID_BYTES: Final = 64
_BOOT_ID_RE: Final = re.compile(r"[0-9a-f-]{8,64}")
# The marker holds three short strings.
MAX_MARKER_BYTES: Final = 4096


@dataclass(frozen=True)
class SelfMeasurement:
    """The booted slot's measurement of one boot."""

    boot_id: str
    slot: str
    #: the sha256 of the slot's first ``length`` bytes, as read now
    sha256: str
    #: the sha256 recorded when the slot was written (what the image repository lists)
    recorded: str
    #: ``True``: measured now; ``False``: this boot was measured before (nothing written)
    fresh: bool

    @property
    def matches(self) -> bool:
        """The slot holds what was written to it."""
        return self.sha256 == self.recorded


def read_boot_id(path: Path = BOOT_ID) -> str:
    """The current boot's identifier.

    Raises:
        ConfigError: missing, unreadable or not a boot id.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BOOT_ID_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the boot id {path}: {e.strerror}") from e
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > MAX_BOOT_ID_BYTES or not _BOOT_ID_RE.fullmatch(text):
        raise ConfigError(f"the boot id {path} is not a UUID")
    return text


def new_boot_id(path: Path) -> str:
    """Write a fresh boot id to ``path`` (the virtual board's power-on)."""
    boot_id = str(uuid.uuid4())
    atomic_write_bytes(path, f"{boot_id}\n".encode())
    return boot_id


def _marker(paths: DevicePaths) -> tuple[str, str, str] | None:
    """(boot id, slot, sha256) of the last self-measurement, ``None`` if none or unreadable."""
    try:
        with paths.self_measured.open("rb") as f:
            raw = json.loads(f.read(MAX_MARKER_BYTES))
        return str(raw["boot_id"]), str(raw["slot"]), str(raw["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        # Measuring again is always safe: the marker only saves the hash.
        logger.warning("ignoring the unreadable self-measurement marker: %s", e)
        return None


def measure_booted_slot(
    paths: DevicePaths, *, booted_slot: str | None, backend: SlotBackend, boot_id: str
) -> SelfMeasurement:
    """Measure the booted slot once for ``boot_id``: hash it, log an unattested event.

    Args:
        paths: the device directory (its ``bootenv.json`` records each slot's image).
        booted_slot: the slot the kernel command line names (the bootloader backend's
            :meth:`~otaguard.agent.bootloader.Bootloader.booted_slot`); no other slot is
            ever measured.
        backend: where the slots are (partitions or files).
        boot_id: the current boot's identifier: a boot already measured is not again.

    Returns:
        The measurement (``fresh`` when taken now).

    Raises:
        ConfigError: no booted slot, or the booted slot holds no recorded image.
        DeviceStorageError: the slot cannot be read in full, or the log cannot be written.
    """
    if booted_slot is None:
        raise ConfigError(
            "the kernel command line names no booted slot (otaguard.slot= or rauc.slot=): "
            "nothing to measure"
        )
    image = BootEnv.load(paths.bootenv).slots.get(booted_slot)
    if image is None:
        raise ConfigError(
            f"the booted slot {booted_slot} holds no image the agent recorded: nothing to "
            "measure it against"
        )
    done = _marker(paths)
    if done is not None and done[:2] == (boot_id, booted_slot):
        return SelfMeasurement(boot_id, booted_slot, done[2], image.sha256, fresh=False)
    digest = backend.digest(booted_slot, image.length)
    if not digest:
        raise DeviceStorageError(
            f"cannot read the booted slot {booted_slot} in full ({image.length} bytes recorded)"
        )
    # Event first, marker second: a power cut between them measures again next time
    # (one more unattested event), never marks a boot measured that is not.
    measure_boot(paths, slot=booted_slot, sha256=digest, tpm=None)
    try:
        paths.self_measured.parent.mkdir(exist_ok=True)
        atomic_write_json(
            paths.self_measured, {"boot_id": boot_id, "slot": booted_slot, "sha256": digest}
        )
    except OSError as e:
        raise DeviceStorageError(f"cannot write {paths.self_measured}: {e.strerror}") from e
    result = SelfMeasurement(boot_id, booted_slot, digest, image.sha256, fresh=True)
    if result.matches:
        logger.info("measured the booted slot %s (unattested): %s", booted_slot, digest)
    else:
        logger.warning(
            "the booted slot %s does not hold what was written to it: sha256 %s, recorded %s",
            booted_slot,
            digest,
            image.sha256,
        )
    return result
