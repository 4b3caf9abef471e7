"""Find a partition by its GPT label or UUID without udev.

A device without udev (or an initramfs, or a container) has no ``/dev/disk/by-partlabel``
links. Slots are therefore resolved the way the kernel sees them: every whole disk in
``/sys/class/block`` has its GPT read here (header and entry array, both CRC-checked),
the entry with the wanted name or UUID gives a partition number, and the kernel's
partition device of that disk with that number *and the same start sector* is the slot.
The start-sector check refuses a kernel view that disagrees with the table on disk (a
table rewritten without re-reading it), rather than writing to the wrong blocks.

:func:`parse_gpt` is pure (bytes in, entries out); the rest reads sysfs and the disk.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from otaguard.model.errors import ConfigError, DeviceStorageError

__all__ = [
    "MAX_GPT_ENTRIES",
    "GptEntry",
    "GptError",
    "find_partition",
    "parse_gpt",
    "resolve_device",
]

_SIGNATURE: Final = b"EFI PART"
_HEADER: Final = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY: Final = struct.Struct("<16s16sQQQ72s")
#: a GPT normally has 128 entries; more than this is not a table we wrote, and bounds what
#: a hostile disk can make us read and parse
MAX_GPT_ENTRIES: Final = 1024
#: the sector sizes a GPT header may sit behind (LBA 1)
_SECTOR_SIZES: Final = (512, 4096)
#: where sysfs lists block devices and where devtmpfs creates their nodes
SYS_BLOCK: Final = Path("/sys/class/block")
DEV: Final = Path("/dev")


class GptError(ValueError):
    """The bytes are not a valid GPT (bad signature, size or CRC)."""


@dataclass(frozen=True)
class GptEntry:
    """One used GPT partition entry."""

    number: int  # 1-based, as the kernel numbers partitions
    name: str
    partuuid: str  # lower-case, as blkid prints PARTUUID
    type_guid: str
    first_lba: int
    last_lba: int


def parse_gpt(header_sector: bytes, entries: bytes) -> list[GptEntry]:
    """Parse a primary GPT header and its entry array (pure).

    Args:
        header_sector: the sector at LBA 1.
        entries: the entry array the header points to (``count * size`` bytes).

    Raises:
        GptError: no GPT signature, an impossible size, or a CRC mismatch.
    """
    if len(header_sector) < _HEADER.size or header_sector[:8] != _SIGNATURE:
        raise GptError("no GPT signature")
    (_, _, hsize, hcrc, _, _, _, _, _, _, _, count, esize, ecrc) = _HEADER.unpack_from(
        header_sector
    )
    if not _HEADER.size <= hsize <= len(header_sector):
        raise GptError(f"GPT header size {hsize} is invalid")
    header = bytearray(header_sector[:hsize])
    header[16:20] = b"\0\0\0\0"  # the CRC is computed with its own field zeroed
    if zlib.crc32(header) != hcrc:
        raise GptError("GPT header CRC mismatch")
    if not (0 < count <= MAX_GPT_ENTRIES and _ENTRY.size <= esize <= 4096):
        raise GptError(f"GPT entry array of {count} x {esize} bytes is invalid")
    if len(entries) < count * esize:
        raise GptError("GPT entry array is truncated")
    array = entries[: count * esize]
    if zlib.crc32(array) != ecrc:
        raise GptError("GPT entry array CRC mismatch")
    found = []
    for i in range(count):
        type_guid, part_guid, first, last, _, raw_name = _ENTRY.unpack_from(array, i * esize)
        if type_guid == b"\0" * 16:
            continue
        name = raw_name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        found.append(
            GptEntry(
                number=i + 1,
                name=name,
                partuuid=str(uuid.UUID(bytes_le=part_guid)),
                type_guid=str(uuid.UUID(bytes_le=type_guid)),
                first_lba=first,
                last_lba=last,
            )
        )
    return found


def read_gpt(disk: Path) -> tuple[list[GptEntry], int]:
    """The GPT entries of ``disk`` and its logical sector size.

    Raises:
        GptError: no valid GPT on the disk.
        OSError: the disk cannot be read.
    """
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        last: GptError = GptError("no GPT signature")
        for sector in _SECTOR_SIZES:
            head = os.pread(fd, sector, sector)
            if head[:8] != _SIGNATURE:
                continue
            count, esize = struct.unpack_from("<II", head, 80)
            if not (0 < count <= MAX_GPT_ENTRIES and 0 < esize <= 4096):
                raise GptError(f"GPT entry array of {count} x {esize} bytes is invalid")
            entries_lba = struct.unpack_from("<Q", head, 72)[0]
            entries = os.pread(fd, count * esize, entries_lba * sector)
            try:
                return parse_gpt(head, entries), sector
            except GptError as e:
                last = e
        raise last
    finally:
        os.close(fd)


def _sysfs_int(path: Path) -> int:
    return int(path.read_text().strip())


def find_partition(*, name: str | None = None, partuuid: str | None = None) -> Path:
    """The device node of the partition labelled ``name`` (or with ``partuuid``).

    Reads ``/sys/class/block`` and each whole disk's GPT; no udev, no blkid.

    Raises:
        ConfigError: no partition, or more than one, carries that label or UUID (a
            duplicate label is ambiguous: refusing is safer than picking one).
        DeviceStorageError: the partition is in a table but the kernel does not know it
            (no node: run ``partx -a``), or its start differs from the table.
    """
    if (name is None) == (partuuid is None):
        raise ValueError("give exactly one of name and partuuid")
    wanted = f"PARTLABEL={name}" if name is not None else f"PARTUUID={partuuid}"
    matches: list[tuple[Path, GptEntry, int]] = []
    for disk in sorted(SYS_BLOCK.iterdir()) if SYS_BLOCK.is_dir() else []:
        if (disk / "partition").exists():
            continue  # a partition, not a whole disk
        node = DEV / disk.name
        try:
            entries, sector = read_gpt(node)
        except (GptError, OSError):
            continue  # no GPT here, an empty loop device, no node: not ours
        for e in entries:
            if (name is not None and e.name == name) or (
                partuuid is not None and e.partuuid == partuuid.lower()
            ):
                matches.append((disk, e, sector))
    if not matches:
        raise ConfigError(f"no GPT partition has {wanted}")
    if len(matches) > 1:
        where = ", ".join(f"{d.name} partition {e.number}" for d, e, _ in matches)
        raise ConfigError(f"{wanted} is ambiguous: {where}")
    disk, entry, sector = matches[0]
    for child in sorted(disk.iterdir()):
        part = child / "partition"
        if not part.is_file() or _sysfs_int(part) != entry.number:
            continue
        # sysfs counts the start in 512-byte units whatever the sector size.
        if _sysfs_int(child / "start") != entry.first_lba * sector // 512:
            raise DeviceStorageError(
                f"{wanted}: the kernel's {child.name} starts elsewhere than the partition "
                "table says (re-read the table)"
            )
        return DEV / child.name
    raise DeviceStorageError(
        f"{wanted} is partition {entry.number} of {disk.name}, but the kernel has no "
        f"device for it (register the partitions, e.g. 'partx -a /dev/{disk.name}')"
    )


def resolve_device(spec: str) -> Path:
    """A slot's device from its configured name: a path, ``PARTLABEL=x`` or ``PARTUUID=x``.

    Raises:
        ConfigError: an unknown form, or no such partition.
        DeviceStorageError: see :func:`find_partition`.
    """
    if spec.startswith("PARTLABEL="):
        return find_partition(name=spec.removeprefix("PARTLABEL="))
    if spec.startswith("PARTUUID="):
        return find_partition(partuuid=spec.removeprefix("PARTUUID="))
    if spec.startswith("/"):
        return Path(spec)
    raise ConfigError(f"slot device {spec!r} must be a path, PARTLABEL=name or PARTUUID=uuid")
