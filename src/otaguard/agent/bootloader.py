"""Bootloader backends behind one interface: booted slot, primary, mark good/bad, state.

The conventions are RAUC's (and Mender's), so a device already integrated with either
keeps its boot scripts:

- :class:`UBootRauc` -- ``BOOT_ORDER`` (``"A B"``) and ``BOOT_<x>_LEFT`` (remaining tries,
  hex); the boot script (RAUC's contrib/uboot.sh) takes the first slot in the order with
  tries left and decrements it *before* booting;
- :class:`UBootMender` -- ``mender_boot_part``/``mender_boot_part_hex``,
  ``upgrade_available`` and ``bootcount`` (U-Boot's ``CONFIG_BOOTCOUNT_LIMIT`` with
  ``bootlimit=1``: the second unconfirmed boot runs ``altbootcmd``, which switches back);
- :class:`GrubRauc` -- ``ORDER``, ``<x>_OK`` and ``<x>_TRY`` (RAUC's contrib/grub.conf:
  the first slot with OK=1 and TRY=0 gets TRY=1 and boots; a slot left at TRY=1 by a boot
  that never got marked good is skipped next time).

Every transition is **one** environment write (RAUC's U-Boot backend needs two
``fw_setenv`` calls for ``set_primary``; one batched write cannot be half done). The
booted slot comes from the kernel command line (``otaguard.slot=``, ``rauc.slot=``, then
Mender's ``root=`` partition number), never from the environment: the environment says
what the bootloader *meant* to boot next, the command line what it did boot.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

from otaguard.agent.slots import SLOTS
from otaguard.model.errors import ConfigError

__all__ = [
    "CMDLINE",
    "DEFAULT_ATTEMPTS",
    "Bootloader",
    "EnvStore",
    "GrubRauc",
    "SlotState",
    "UBootMender",
    "UBootRauc",
    "booted_from_cmdline",
]

#: where the running kernel's command line is (tests point it at a file)
CMDLINE: Final = Path("/proc/cmdline")
#: boot attempts RAUC gives a slot (``boot-attempts`` and ``boot-attempts-primary``)
DEFAULT_ATTEMPTS: Final = 3
_SLOT_KEYS: Final = ("otaguard.slot", "rauc.slot")


class SlotState(StrEnum):
    """What the bootloader's environment says of a slot."""

    GOOD = "good"  # bootable and confirmed (or not yet tried)
    TRYING = "trying"  # booted or about to be booted, not confirmed yet
    BAD = "bad"  # the bootloader will not start it
    INACTIVE = "inactive"  # Mender: the fallback partition (its health is not recorded)


class EnvStore(Protocol):
    """An environment block: :class:`~.envblock.UBootEnv` or :class:`~.envblock.GrubEnvFile`."""

    def read(self) -> dict[str, str]:
        """The current variables."""
        ...

    def update(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        """Apply ``changes`` in one write."""
        ...


def booted_from_cmdline(cmdline: str, slots: tuple[str, ...] = SLOTS) -> str | None:
    """The slot named by ``otaguard.slot=`` or ``rauc.slot=`` on a kernel command line."""
    args = dict(a.partition("=")[::2] for a in cmdline.split())
    for key in _SLOT_KEYS:
        if args.get(key) in slots:
            return args[key]
    return None


class Bootloader(abc.ABC):
    """One A/B boot-selection scheme on one environment.

    Args:
        env: the environment block.
        cmdline: the kernel command line's file.
    """

    def __init__(self, env: EnvStore, *, cmdline: Path = CMDLINE) -> None:
        self.env = env
        self.cmdline = cmdline

    def booted_slot(self) -> str | None:
        """The slot the running system was booted from (kernel command line).

        Raises:
            ConfigError: the command line cannot be read.
        """
        try:
            text = self.cmdline.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the kernel command line {self.cmdline}") from e
        return booted_from_cmdline(text)

    @abc.abstractmethod
    def primary(self) -> str | None:
        """The slot the bootloader will start next (``None``: none qualifies)."""

    @abc.abstractmethod
    def set_primary(self, slot: str) -> None:
        """Boot ``slot`` next, with the configured tries (after a verified install)."""

    @abc.abstractmethod
    def mark_good(self, slot: str) -> None:
        """Confirm ``slot``: it keeps being booted."""

    @abc.abstractmethod
    def mark_bad(self, slot: str) -> None:
        """Never start ``slot`` again until it is set primary anew."""

    @abc.abstractmethod
    def state(self, slot: str) -> SlotState:
        """What the environment says of ``slot``."""


def _check_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}")
    return slot


def _int(value: str | None, *, base: int, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value, base)
    except ValueError:
        return 0  # a garbled counter is no tries left, as the scripts treat it


def _first(order: list[str], slot: str) -> str:
    return " ".join([slot, *(s for s in order if s != slot)])


class UBootRauc(Bootloader):
    """RAUC's U-Boot convention (``BOOT_ORDER``, ``BOOT_<x>_LEFT`` in hex)."""

    def __init__(
        self, env: EnvStore, *, attempts: int = DEFAULT_ATTEMPTS, cmdline: Path = CMDLINE
    ) -> None:
        super().__init__(env, cmdline=cmdline)
        self.attempts = attempts

    def _order(self, env: Mapping[str, str]) -> list[str]:
        raw = env.get("BOOT_ORDER")
        return [s for s in raw.split() if s in SLOTS] if raw is not None else list(SLOTS)

    def _left(self, env: Mapping[str, str], slot: str) -> int:
        return _int(env.get(f"BOOT_{slot}_LEFT"), base=16, default=self.attempts)

    def primary(self) -> str | None:
        """The first slot of ``BOOT_ORDER`` with tries left."""
        env = self.env.read()
        return next((s for s in self._order(env) if self._left(env, s) > 0), None)

    def set_primary(self, slot: str) -> None:
        """``BOOT_x_LEFT=attempts`` and x first in ``BOOT_ORDER``, in one write."""
        env = self.env.read()
        self.env.update(
            {
                f"BOOT_{_check_slot(slot)}_LEFT": f"{self.attempts:x}",
                "BOOT_ORDER": _first(self._order(env), slot),
            }
        )

    def mark_good(self, slot: str) -> None:
        """``BOOT_x_LEFT=attempts`` (what ``rauc status mark-good`` writes)."""
        self.env.update({f"BOOT_{_check_slot(slot)}_LEFT": f"{self.attempts:x}"})

    def mark_bad(self, slot: str) -> None:
        """x out of ``BOOT_ORDER`` and ``BOOT_x_LEFT=0``, in one write."""
        env = self.env.read()
        order = [s for s in self._order(env) if s != _check_slot(slot)]
        self.env.update({"BOOT_ORDER": " ".join(order), f"BOOT_{slot}_LEFT": "0"})

    def state(self, slot: str) -> SlotState:
        """Good when in ``BOOT_ORDER`` with tries left, else bad."""
        env = self.env.read()
        ok = _check_slot(slot) in self._order(env) and self._left(env, slot) > 0
        return SlotState.GOOD if ok else SlotState.BAD


class UBootMender(Bootloader):
    """Mender's U-Boot convention, for devices whose boot scripts are Mender's.

    Args:
        parts: slot -> the root file system's partition number (``mender_boot_part``).
    """

    def __init__(self, env: EnvStore, *, parts: Mapping[str, int], cmdline: Path = CMDLINE) -> None:
        super().__init__(env, cmdline=cmdline)
        if set(parts) != set(SLOTS) or len(set(parts.values())) != len(SLOTS):
            raise ConfigError("the Mender profile needs a distinct partition number per slot")
        self.parts = dict(parts)

    def _slot_of(self, part: str | None) -> str | None:
        n = _int(part, base=10, default=-1)
        return next((s for s, p in self.parts.items() if p == n), None)

    def booted_slot(self) -> str | None:
        """From the command line's slot keys, else the partition number of ``root=``."""
        slot = super().booted_slot()
        if slot is not None:
            return slot
        args = dict(a.partition("=")[::2] for a in self.cmdline.read_text().split())
        m = re.search(r"(\d+)$", args.get("root", ""))
        return self._slot_of(m.group(1)) if m else None

    def primary(self) -> str | None:
        """The slot of ``mender_boot_part``."""
        return self._slot_of(self.env.read().get("mender_boot_part"))

    def set_primary(self, slot: str) -> None:
        """Mender's ArtifactInstall batch: boot part, upgrade_available=1, bootcount=0."""
        n = self.parts[_check_slot(slot)]
        self.env.update(
            {
                "mender_boot_part": str(n),
                "mender_boot_part_hex": f"{n:x}",
                "upgrade_available": "1",
                "bootcount": "0",
            }
        )

    def mark_good(self, slot: str) -> None:
        """Mender's ArtifactCommit: ``upgrade_available=0`` (only for the boot part).

        Raises:
            ConfigError: ``slot`` is not the partition the environment boots.
        """
        if self.primary() != _check_slot(slot):
            raise ConfigError(f"slot {slot} is not mender_boot_part: cannot confirm it")
        self.env.update({"upgrade_available": "0", "bootcount": "0"})

    def mark_bad(self, slot: str) -> None:
        """Switch ``mender_boot_part`` away from ``slot`` (what ``altbootcmd`` does)."""
        if self.primary() != _check_slot(slot):
            return  # already not booted next: nothing to undo
        other = next(s for s in SLOTS if s != slot)
        n = self.parts[other]
        self.env.update(
            {
                "mender_boot_part": str(n),
                "mender_boot_part_hex": f"{n:x}",
                "upgrade_available": "0",
                "bootcount": "0",
            }
        )

    def state(self, slot: str) -> SlotState:
        """The boot part is trying while ``upgrade_available=1``, else good."""
        env = self.env.read()
        if self._slot_of(env.get("mender_boot_part")) != _check_slot(slot):
            return SlotState.INACTIVE
        return SlotState.TRYING if env.get("upgrade_available") == "1" else SlotState.GOOD


class GrubRauc(Bootloader):
    """RAUC's GRUB convention (``ORDER``, ``<x>_OK``, ``<x>_TRY``)."""

    def _order(self, env: Mapping[str, str]) -> list[str]:
        raw = env.get("ORDER")
        return [s for s in raw.split() if s in SLOTS] if raw is not None else list(SLOTS)

    def primary(self) -> str | None:
        """The slot grub.cfg boots next: the first of ``ORDER`` with OK=1 and TRY=0 (a
        slot left at TRY=1 was booted and never confirmed: GRUB skips it)."""
        env = self.env.read()
        return next(
            (
                s
                for s in self._order(env)
                if env.get(f"{s}_OK") == "1" and env.get(f"{s}_TRY", "0") == "0"
            ),
            None,
        )

    def set_primary(self, slot: str) -> None:
        """``x_OK=1 x_TRY=0`` and x first in ``ORDER``, in one write."""
        env = self.env.read()
        _check_slot(slot)
        self.env.update(
            {f"{slot}_OK": "1", f"{slot}_TRY": "0", "ORDER": _first(self._order(env), slot)}
        )

    def mark_good(self, slot: str) -> None:
        """``x_OK=1 x_TRY=0``."""
        self.env.update({f"{_check_slot(slot)}_OK": "1", f"{slot}_TRY": "0"})

    def mark_bad(self, slot: str) -> None:
        """``x_OK=0 x_TRY=0`` and x last in ``ORDER``, in one write."""
        env = self.env.read()
        order = [s for s in self._order(env) if s != _check_slot(slot)]
        self.env.update({f"{slot}_OK": "0", f"{slot}_TRY": "0", "ORDER": " ".join([*order, slot])})

    def state(self, slot: str) -> SlotState:
        """Bad when OK is not 1; trying when TRY=1 (booted, not confirmed); else good."""
        env = self.env.read()
        if env.get(f"{_check_slot(slot)}_OK") != "1":
            return SlotState.BAD
        return SlotState.TRYING if env.get(f"{slot}_TRY") == "1" else SlotState.GOOD
