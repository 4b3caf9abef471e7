"""The bootloaders' environment blocks: U-Boot's (plain or redundant) and GRUB's.

The codecs are pure (bytes in, a mapping out, or the reverse) and follow the formats
libubootenv's ``fw_printenv``/``fw_setenv`` and ``grub-editenv`` read and write, which
the tests cross-check both ways:

- U-Boot: ``crc32 (le32) | [flags (u8), redundant only] | key=value\\0...\\0\\0`` padded
  with zeros to the environment size; the CRC covers the data bytes. Of two redundant
  copies, the valid one with the newer flags counter is current (libubootenv's
  incremental flags; 255 -> 0 wraps).
- GRUB: ``# GRUB Environment Block\\n`` then ``key=value\\n`` lines (backslash and newline
  escaped with a backslash), padded with ``#`` to exactly 1024 bytes.

The stores write so that a power cut cannot leave the environment empty: a redundant
U-Boot environment is written to the *older* copy (the current one is untouched until
the new one is complete and its CRC right), a GRUB environment file is replaced
atomically (temp, fsync, rename). A single U-Boot copy can only be rewritten in place;
use a redundant environment on a device that can lose power.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from otaguard._fs import atomic_write_bytes
from otaguard.model.errors import ConfigError, DeviceStorageError

__all__ = [
    "GRUBENV_SIZE",
    "GrubEnvFile",
    "UBootEnv",
    "UBootEnvCopy",
    "decode_grubenv",
    "decode_uboot",
    "encode_grubenv",
    "encode_uboot",
    "newer_copy",
]

#: grub-editenv creates, and GRUB's save_env rewrites, a block of exactly this size
GRUBENV_SIZE: Final = 1024
_GRUB_HEADER: Final = b"# GRUB Environment Block\n"
#: a U-Boot environment smaller than this cannot hold even the A/B variables; larger than
#: this is not an environment (and bounds what a bad config makes us read)
MIN_UBOOT_ENV: Final = 64
MAX_UBOOT_ENV: Final = 1024 * 1024
# Names as U-Boot and GRUB scripts can use them: no '=', no whitespace, no NUL.
_NAME: Final = re.compile(r"[A-Za-z0-9_.:/+-]{1,128}")


def _check(env: Mapping[str, str]) -> None:
    for k, v in env.items():
        if not _NAME.fullmatch(k):
            raise ValueError(f"invalid environment variable name {k!r}")
        if "\0" in v or "\n" in v:
            raise ValueError(f"value of {k} contains a NUL or a newline")


# -- U-Boot --------------------------------------------------------------------------------
def encode_uboot(env: Mapping[str, str], *, size: int, flags: int | None = None) -> bytes:
    """One environment copy of ``size`` bytes; ``flags`` makes it a redundant copy.

    Raises:
        ValueError: a bad name or value, or the variables do not fit.
    """
    _check(env)
    header = 4 if flags is None else 5
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(env.items())) + b"\0"
    if len(data) > size - header:
        raise ValueError(f"the environment needs {len(data) + header} bytes, the block has {size}")
    data = data.ljust(size - header, b"\0")
    crc = struct.pack("<I", zlib.crc32(data))
    return crc + (b"" if flags is None else bytes([flags & 0xFF])) + data


def decode_uboot(block: bytes, *, redundant: bool) -> tuple[dict[str, str], int] | None:
    """The variables and flags of one copy, or ``None`` when its CRC is wrong (torn)."""
    header = 5 if redundant else 4
    if len(block) <= header:
        return None
    data = block[header:]
    if zlib.crc32(data) != struct.unpack_from("<I", block)[0]:
        return None
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        if not item:
            break  # the double NUL ends the variables
        key, sep, value = item.decode("utf-8", errors="replace").partition("=")
        if sep:
            env[key] = value
    return env, (block[4] if redundant else 0)


def newer_copy(flags_a: int, flags_b: int) -> int:
    """Index (0 or 1) of the newer of two valid redundant copies (incremental flags)."""
    if flags_a == 0xFF and flags_b == 0:
        return 1
    if flags_b == 0xFF and flags_a == 0:
        return 0
    return 0 if flags_a > flags_b else 1


@dataclass(frozen=True)
class UBootEnvCopy:
    """Where one copy lives: a file or block device, a byte offset, a size."""

    path: Path
    offset: int
    size: int


class UBootEnv:
    """A U-Boot environment on a file or block device, one copy or two (redundant).

    Args:
        copies: one copy, or two for a redundant environment (as in fw_env.config).
    """

    def __init__(self, copies: list[UBootEnvCopy]) -> None:
        if len(copies) not in (1, 2):
            raise ConfigError("a U-Boot environment has one copy or two (redundant)")
        for c in copies:
            if not MIN_UBOOT_ENV <= c.size <= MAX_UBOOT_ENV or c.offset < 0:
                raise ConfigError(f"U-Boot environment copy {c} has an invalid size or offset")
        self.copies = copies
        self.redundant = len(copies) == 2

    def fw_env_config(self) -> str:
        """The same layout as an ``fw_env.config`` (for fw_printenv/fw_setenv ``-c``)."""
        return "".join(f"{c.path} {c.offset:#x} {c.size:#x}\n" for c in self.copies)

    def _read_copies(self) -> list[tuple[dict[str, str], int] | None]:
        out = []
        for c in self.copies:
            try:
                with open(c.path, "rb") as f:
                    f.seek(c.offset)
                    block = f.read(c.size)
            except OSError as e:
                raise DeviceStorageError(
                    f"cannot read the U-Boot environment at {c.path}: {e.strerror}"
                ) from e
            out.append(
                decode_uboot(block, redundant=self.redundant) if len(block) == c.size else None
            )
        return out

    def _current(self) -> tuple[int | None, list[tuple[dict[str, str], int] | None]]:
        copies = self._read_copies()
        valid = [i for i, c in enumerate(copies) if c is not None]
        if not valid:
            return None, copies
        if len(valid) == 1:
            return valid[0], copies
        a, b = copies[0], copies[1]
        if a is None or b is None:  # pragma: no cover - both valid here
            raise RuntimeError("unreachable")
        return newer_copy(a[1], b[1]), copies

    def read(self) -> dict[str, str]:
        """The current variables; empty when no copy is valid (the scripts' defaults apply).

        Raises:
            DeviceStorageError: the environment cannot be read.
        """
        current, copies = self._current()
        if current is None:
            return {}
        got = copies[current]
        assert got is not None  # noqa: S101 - current is a valid copy
        return dict(got[0])

    def update(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        """Apply ``changes`` (``None`` deletes) in one write; return the new variables.

        Redundant: the older copy is overwritten with flags one above the current copy's
        and fsynced; until that write is complete the current copy stays what a reader
        (U-Boot, fw_printenv) finds, so a power cut loses only this update.

        Raises:
            ValueError: a bad name or value, or it does not fit.
            DeviceStorageError: the write failed.
        """
        current, copies = self._current()
        env = {} if current is None else dict(copies[current][0])  # type: ignore[index]
        for k, v in changes.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        if self.redundant:
            target = 0 if current is None else 1 - current
            flags = 0 if current is None else (copies[current][1] + 1) & 0xFF  # type: ignore[index]
            block = encode_uboot(env, size=self.copies[target].size, flags=flags)
        else:
            target = 0
            block = encode_uboot(env, size=self.copies[0].size)
        c = self.copies[target]
        try:
            fd = os.open(c.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, block, c.offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise DeviceStorageError(
                f"cannot write the U-Boot environment at {c.path}: {e.strerror}"
            ) from e
        return env


# -- GRUB ----------------------------------------------------------------------------------
def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\\n")


def encode_grubenv(env: Mapping[str, str]) -> bytes:
    """A 1024-byte GRUB environment block holding ``env``.

    Raises:
        ValueError: a bad name or value, or the variables do not fit in the block.
    """
    _check(env)
    body = _GRUB_HEADER + b"".join(f"{k}={_escape(v)}\n".encode() for k, v in sorted(env.items()))
    if len(body) > GRUBENV_SIZE:
        raise ValueError(f"the GRUB environment needs {len(body)} bytes, the block has 1024")
    return body.ljust(GRUBENV_SIZE, b"#")


def decode_grubenv(block: bytes) -> dict[str, str]:
    """The variables of a GRUB environment block.

    Raises:
        ValueError: not a GRUB environment block (wrong header or size).
    """
    if len(block) != GRUBENV_SIZE or not block.startswith(_GRUB_HEADER):
        raise ValueError("not a GRUB environment block")
    env: dict[str, str] = {}
    text = block.decode("utf-8", errors="replace")
    i = 0
    while i < len(text):
        end = i
        value_chars: list[str] = []
        while end < len(text) and text[end] != "\n":
            if text[end] == "\\" and end + 1 < len(text):
                value_chars.append(text[end + 1])
                end += 2
                continue
            value_chars.append(text[end])
            end += 1
        line = "".join(value_chars)
        i = end + 1
        if line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        env[key] = value
    return env


class GrubEnvFile:
    """A GRUB environment file (on the ESP or a boot partition), replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, str]:
        """The variables; empty when the file does not exist yet (grub.cfg's defaults).

        Raises:
            DeviceStorageError: the file cannot be read or is not a GRUB environment.
        """
        try:
            return decode_grubenv(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise DeviceStorageError(f"cannot read {self.path}: {e.strerror}") from e
        except ValueError as e:
            raise DeviceStorageError(f"{self.path}: {e}") from e

    def update(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        """Apply ``changes`` (``None`` deletes) in one atomic replacement of the file.

        Raises:
            ValueError: a bad name or value, or it does not fit.
            DeviceStorageError: the write failed (the old file is intact).
        """
        env = self.read()
        for k, v in changes.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        block = encode_grubenv(env)
        try:
            atomic_write_bytes(self.path, block)
        except OSError as e:
            raise DeviceStorageError(f"cannot write {self.path}: {e.strerror}") from e
        return env
