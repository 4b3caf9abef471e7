"""The agent's side of a real bootloader: what booted, and how to reboot.

With a ``bootloader`` in the device config the simulated bootloader of :mod:`.boot` is
out of the loop: the booted slot comes from the kernel command line, the next slot from
the bootloader's environment (:mod:`.bootloader`), and a reboot is a real one (the
install resumes when the agent or ``mark-good`` starts after it). ``bootenv.json`` stays
as the record of what each slot holds (image, version, hash: RAUC's slot status file),
which the agent reports and selects against. Such a bootloader measures nothing: the
agent measures the booted slot itself once per kernel boot (:meth:`HardwareBoot.measure`,
ADR 0038), unattested.

``virtual`` runs the boot script's rules in-process instead of rebooting
(:mod:`.vboot`): development and tests, warned on every reboot.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Final

from otaguard._fs import atomic_write_json
from otaguard.agent.boot import BootRecord
from otaguard.agent.bootcfg import BootloaderSpec
from otaguard.agent.bootloader import Bootloader, SlotState
from otaguard.agent.config import DevicePaths
from otaguard.agent.self_measure import (
    SelfMeasurement,
    measure_booted_slot,
    new_boot_id,
    read_boot_id,
)
from otaguard.agent.slots import BootEnv, SlotBackend
from otaguard.agent.vboot import VirtualBoard
from otaguard.crypto.keys import warn_insecure
from otaguard.model.errors import ConfigError, DeviceStorageError

__all__ = ["REBOOT_TIMEOUT_S", "HardwareBoot", "RebootPending"]

logger = logging.getLogger(__name__)

#: ``systemctl reboot`` returns once the reboot job is queued; longer is a hung command
REBOOT_TIMEOUT_S: Final = 60.0


class RebootPending(Exception):
    """The device is rebooting into the new slot; the install resumes after boot."""


class HardwareBoot:
    """Boot selection by the configured bootloader.

    Args:
        spec: the validated ``bootloader`` configuration.
        paths: the device directory (its ``bootenv.json`` records what slots hold).
    """

    def __init__(self, spec: BootloaderSpec, paths: DevicePaths) -> None:
        self.spec = spec
        self.paths = paths
        self.bootloader: Bootloader = spec.bootloader()

    def record(self) -> BootRecord:
        """What runs now (kernel command line) and what its slot holds; written to
        ``run/booted.json`` for the check-in and ``status``.

        Raises:
            ConfigError: the command line names no slot, or the records are corrupt.
            DeviceStorageError: the environment cannot be read.
        """
        slot = self.bootloader.booted_slot()
        if slot is None:
            raise ConfigError(
                f"the kernel command line ({self.spec.cmdline}) names no slot: the boot "
                "script must pass otaguard.slot=A|B or rauc.slot=A|B"
            )
        image = BootEnv.load(self.paths.bootenv).slots.get(slot)
        record = BootRecord(
            slot=slot,
            version=image.version if image is not None else "unknown",
            sha256=image.sha256 if image is not None else "",
            trial=self.bootloader.state(slot) is SlotState.TRYING,
            note="",
            time=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.paths.booted.parent.mkdir(exist_ok=True)
        try:
            atomic_write_json(self.paths.booted, asdict(record))
        except OSError as e:
            raise DeviceStorageError(f"cannot write {self.paths.booted}: {e.strerror}") from e
        return record

    def boot_id(self) -> str:
        """The current boot's identifier (a virtual board never powered on gets one).

        Raises:
            ConfigError: the boot id cannot be read.
        """
        if self.spec.virtual and not self.spec.boot_id.exists():
            return new_boot_id(self.spec.boot_id)
        return read_boot_id(self.spec.boot_id)

    def measure(self, backend: SlotBackend) -> SelfMeasurement:
        """Measure the booted slot if this boot has not been yet (:mod:`.self_measure`).

        Raises:
            ConfigError: no booted slot, no image recorded for it, or no boot id.
            DeviceStorageError: the slot cannot be read, or the event log written.
        """
        return measure_booted_slot(
            self.paths,
            booted_slot=self.bootloader.booted_slot(),
            backend=backend,
            boot_id=self.boot_id(),
        )

    def next_slot(self) -> str | None:
        """The slot the bootloader starts at the next boot."""
        return self.bootloader.primary()

    def reboot(self) -> None:
        """Reboot: on the virtual board, run the boot script now; else the real reboot.

        Raises:
            RebootPending: the real reboot was requested (the caller stops here).
            DeviceStorageError: the reboot command failed.
        """
        if self.spec.virtual:
            warn_insecure("virtual bootloader: a reboot runs the boot script in-process")
            board = VirtualBoard(self.spec.boot_script(), self.spec.cmdline, self.spec.boot_id)
            slot = board.power_on()
            logger.info("virtual board booted slot %s", slot)
            return
        argv = list(self.spec.reboot_command)
        try:
            subprocess.run(argv, check=True, timeout=REBOOT_TIMEOUT_S, capture_output=True)
        except (OSError, subprocess.SubprocessError) as e:
            raise DeviceStorageError(f"reboot command {argv[0]} failed: {e}") from e
        raise RebootPending(f"rebooting into slot {self.next_slot()}")
