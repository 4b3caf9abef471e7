"""A virtual bootloader: the boot scripts' rules, run against a real environment block.

Each function is what the device's boot script does at power-on (RAUC's contrib/uboot.sh
and contrib/grub.conf, U-Boot's bootcount with Mender's ``altbootcmd``), performed on the
same environment file the agent's :mod:`.bootloader` backends and ``fw_setenv`` /
``grub-editenv`` edit. :class:`VirtualBoard` then "starts" the chosen slot by writing the
kernel command line the backend reads (``rauc.slot=X``) and a fresh boot id, so a failed
boot, an exhausted slot and the fallback are exercised in milliseconds, with the real file
formats.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from otaguard._fs import atomic_write_bytes
from otaguard.agent.bootloader import DEFAULT_ATTEMPTS, EnvStore
from otaguard.agent.slots import SLOTS

__all__ = ["VirtualBoard", "boot_grub_rauc", "boot_uboot_mender", "boot_uboot_rauc"]


def _int(value: str | None, base: int) -> int:
    try:
        return int(value or "0", base)
    except ValueError:
        return 0


def boot_uboot_rauc(env: EnvStore, *, attempts: int = DEFAULT_ATTEMPTS) -> str | None:
    """contrib/uboot.sh: the slot started, or ``None`` (all tries spent: reset them)."""
    vars_ = env.read()
    order = vars_.get("BOOT_ORDER", " ".join(SLOTS)).split()
    for slot in order:
        left = _int(vars_.get(f"BOOT_{slot}_LEFT", f"{attempts:x}"), 16)
        if left > 0:
            # setexpr BOOT_x_LEFT ${BOOT_x_LEFT} - 1; saveenv -- before booting
            env.update({f"BOOT_{slot}_LEFT": f"{left - 1:x}"})
            return slot
    env.update({f"BOOT_{s}_LEFT": f"{attempts:x}" for s in SLOTS})
    return None


def boot_grub_rauc(env: EnvStore) -> str | None:
    """contrib/grub.conf: the slot started, or ``None`` (rescue entry; TRY flags reset)."""
    vars_ = {"ORDER": " ".join(SLOTS), **{f"{s}_{k}": "0" for s in SLOTS for k in ("OK", "TRY")}}
    vars_.update(env.read())  # defaults first, then load_env
    for slot in vars_["ORDER"].split():
        if vars_.get(f"{slot}_OK") == "1" and vars_.get(f"{slot}_TRY") == "0":
            env.update({f"{slot}_TRY": "1"})  # save_env before booting
            return slot
    env.update({f"{s}_TRY": "0" for s in SLOTS if vars_.get(f"{s}_OK") == "1"})
    return None


def boot_uboot_mender(env: EnvStore, *, parts: Mapping[str, int], bootlimit: int = 1) -> str:
    """U-Boot's bootcount (``bootlimit``) with Mender's ``altbootcmd``: the slot started."""
    vars_ = env.read()
    by_part = {p: s for s, p in parts.items()}
    part = _int(vars_.get("mender_boot_part"), 10)
    if vars_.get("upgrade_available") == "1":
        count = _int(vars_.get("bootcount"), 10) + 1
        if count > bootlimit:
            # altbootcmd -> mender_switchpart; upgrade_available=0; saveenv
            other = next(p for p in parts.values() if p != part)
            env.update(
                {
                    "mender_boot_part": str(other),
                    "mender_boot_part_hex": f"{other:x}",
                    "upgrade_available": "0",
                    "bootcount": "0",
                }
            )
            return by_part[other]
        env.update({"bootcount": str(count)})
    return by_part.get(part, SLOTS[0])


@dataclass
class VirtualBoard:
    """Runs ``script`` at each :meth:`power_on` and writes the kernel command line.

    Args:
        script: one of the ``boot_*`` functions, bound to its environment.
        cmdline: the file a backend reads as ``/proc/cmdline``.
    """

    script: Callable[[], str | None]
    cmdline: Path
    #: where the kernel's boot id would be: each power-on writes a fresh one
    boot_id: Path | None = None

    def power_on(self) -> str | None:
        """Boot: run the script, "start" its slot. ``None``: no slot (rescue/reset)."""
        slot = self.script()
        if self.boot_id is not None:
            atomic_write_bytes(self.boot_id, f"{uuid.uuid4()}\n".encode())
        line = f"root=/dev/vda quiet rauc.slot={slot}\n" if slot else "rescue\n"
        atomic_write_bytes(self.cmdline, line.encode())
        return slot
