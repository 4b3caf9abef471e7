"""The device's boot selection from its configuration: which bootloader, which environment.

``config.json`` key ``bootloader`` (absent: the simulated bootloader of :mod:`.boot`)::

    {"type": "grub", "env": "/boot/efi/grubenv"}
    {"type": "uboot", "env": [["/dev/mmcblk0", 4177920, 8192], ["/dev/mmcblk0", 4186112, 8192]],
     "attempts": 3}
    {"type": "uboot-mender", "env": [...], "parts": {"A": 2, "B": 3}}

plus, for any type: ``cmdline`` (default ``/proc/cmdline``), ``boot_id`` (the current
boot's identifier, default ``/proc/sys/kernel/random/boot_id``; on a virtual board a file
beside ``cmdline`` that each power-on rewrites), ``reboot_command`` (an argv list, default
``["systemctl", "reboot"]``) and ``virtual`` (development and tests: a reboot runs the boot
script's rules on the environment in-process, :mod:`.vboot`, and writes ``cmdline`` and
``boot_id``; it warns on every use). ``env`` copies are ``[path, offset, size]`` as in
``fw_env.config``; two copies make a redundant environment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from otaguard.agent.bootloader import (
    CMDLINE,
    DEFAULT_ATTEMPTS,
    Bootloader,
    GrubRauc,
    UBootMender,
    UBootRauc,
)
from otaguard.agent.envblock import GrubEnvFile, UBootEnv, UBootEnvCopy
from otaguard.agent.self_measure import BOOT_ID
from otaguard.agent.slots import SLOTS
from otaguard.agent.vboot import boot_grub_rauc, boot_uboot_mender, boot_uboot_rauc
from otaguard.model.errors import ConfigError

__all__ = ["BOOTLOADER_TYPES", "DEFAULT_REBOOT", "BootloaderSpec"]

BOOTLOADER_TYPES: Final = ("grub", "uboot", "uboot-mender")
DEFAULT_REBOOT: Final = ("systemctl", "reboot")
_KEYS: Final = {
    "type",
    "env",
    "attempts",
    "parts",
    "cmdline",
    "boot_id",
    "reboot_command",
    "virtual",
}


def _err(key: str, why: str) -> ConfigError:
    return ConfigError(f"bootloader.{key} {why}")


@dataclass(frozen=True)
class BootloaderSpec:
    """A validated ``bootloader`` configuration."""

    type: str
    grubenv: Path | None
    uboot_copies: tuple[UBootEnvCopy, ...]
    attempts: int
    parts: Mapping[str, int]
    cmdline: Path
    #: the file holding the current boot's identifier (:mod:`.self_measure`)
    boot_id: Path
    reboot_command: tuple[str, ...]
    virtual: bool

    @classmethod
    def parse(cls, raw: Any) -> BootloaderSpec:
        """Validate the ``bootloader`` object of a device config.

        Raises:
            ConfigError: naming the key that is wrong.
        """
        if not isinstance(raw, dict):
            raise ConfigError("bootloader must be an object")
        unknown = set(raw) - _KEYS
        if unknown:
            raise ConfigError(f"bootloader has unknown keys: {', '.join(sorted(unknown))}")
        kind = raw.get("type")
        if kind not in BOOTLOADER_TYPES:
            raise _err("type", f"must be one of {', '.join(BOOTLOADER_TYPES)}")
        grubenv, copies = _env(kind, raw.get("env"))
        attempts = raw.get("attempts", DEFAULT_ATTEMPTS)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 16:
            raise _err("attempts", "must be an integer from 1 to 16")
        parts = raw.get("parts", {})
        if kind == "uboot-mender" and (
            not isinstance(parts, dict)
            or set(parts) != set(SLOTS)
            or not all(
                isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in parts.values()
            )
            or len(set(parts.values())) != len(SLOTS)
        ):
            raise _err("parts", "must map A and B to distinct partition numbers")
        reboot = raw.get("reboot_command", list(DEFAULT_REBOOT))
        if (
            not isinstance(reboot, list)
            or not reboot
            or not all(isinstance(a, str) for a in reboot)
        ):
            raise _err("reboot_command", "must be a non-empty list of strings (an argv)")
        cmdline = raw.get("cmdline", str(CMDLINE))
        if not isinstance(cmdline, str) or not cmdline.startswith("/"):
            raise _err("cmdline", "must be an absolute path")
        virtual = raw.get("virtual", False)
        if not isinstance(virtual, bool):
            raise _err("virtual", "must be true or false")
        # A virtual board has no kernel of its own: its power-on writes the boot id.
        default_boot_id = Path(cmdline).parent / "boot_id" if virtual else BOOT_ID
        boot_id = raw.get("boot_id", str(default_boot_id))
        if not isinstance(boot_id, str) or not boot_id.startswith("/"):
            raise _err("boot_id", "must be an absolute path")
        return cls(
            type=kind,
            grubenv=grubenv,
            uboot_copies=copies,
            attempts=attempts,
            parts=dict(parts),
            cmdline=Path(cmdline),
            boot_id=Path(boot_id),
            reboot_command=tuple(reboot),
            virtual=virtual,
        )

    def bootloader(self) -> Bootloader:
        """The backend this configuration names."""
        if self.type == "grub":
            assert self.grubenv is not None  # noqa: S101 - parse() checked it
            return GrubRauc(GrubEnvFile(self.grubenv), cmdline=self.cmdline)
        env = UBootEnv(list(self.uboot_copies))
        if self.type == "uboot":
            return UBootRauc(env, attempts=self.attempts, cmdline=self.cmdline)
        return UBootMender(env, parts=self.parts, cmdline=self.cmdline)

    def boot_script(self) -> Callable[[], str | None]:
        """The boot script's rules on this environment (the virtual board's power-on)."""
        if self.type == "grub":
            assert self.grubenv is not None  # noqa: S101 - parse() checked it
            grub = GrubEnvFile(self.grubenv)
            return lambda: boot_grub_rauc(grub)
        env = UBootEnv(list(self.uboot_copies))
        if self.type == "uboot":
            return lambda: boot_uboot_rauc(env, attempts=self.attempts)
        return lambda: boot_uboot_mender(env, parts=self.parts)


def _env(kind: str, env: Any) -> tuple[Path | None, tuple[UBootEnvCopy, ...]]:
    """The GRUB environment file, or the U-Boot environment copies."""
    if kind == "grub":
        if not isinstance(env, str) or not env.startswith("/"):
            raise _err("env", "must be the absolute path of the GRUB environment file")
        return Path(env), ()
    if not isinstance(env, list) or len(env) not in (1, 2):
        raise _err("env", "must list one or two [path, offset, size] copies")
    try:
        copies = tuple(_copy(c) for c in env)
        UBootEnv(list(copies))
    except (TypeError, ValueError, ConfigError) as e:
        raise _err("env", f"is invalid: {e}") from e
    return None, copies


def _copy(raw: Any) -> UBootEnvCopy:
    if not isinstance(raw, list) or len(raw) != 3:
        raise ValueError("each copy is [path, offset, size]")
    path, offset, size = raw
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("a copy's path must be absolute")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, size)):
        raise ValueError("a copy's offset and size are integers")
    return UBootEnvCopy(Path(path), offset, size)
