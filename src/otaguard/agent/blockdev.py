"""A/B slots on block devices (partitions), written through the same streaming install.

What a slot write on real storage adds to the file slots of the tests:

- the slot is named by a device path, ``PARTLABEL=`` or ``PARTUUID=`` (resolved from the
  GPT without udev, :mod:`.gpt`), and must be a block device;
- it is opened ``O_EXCL``: the kernel refuses (EBUSY) a device that is mounted or
  claimed, the cheapest guard against overwriting a running root file system; the device
  the root file system lives on and the slot the bootloader says is booted are refused
  by name as well, before opening;
- its size and read-only flag are read with ioctls before the first byte: an image larger
  than the partition, or a write-protected device, is refused up front;
- the streaming install fsyncs it (checkpoints and the end), the writer drops the page
  cache of the device on close (``BLKFLSBUF``), and :meth:`BlockDeviceSlots.digest` reads
  it back with ``O_DIRECT``, so the read-back verify of :func:`~.slot_stream.stream_to_slot`
  hashes what the device stored, not what the page cache remembers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Final

from otaguard.agent.gpt import resolve_device
from otaguard.agent.slots import CHUNK, SLOTS, SlotBackend, SlotWriter
from otaguard.model.errors import ConfigError, DeviceStorageError

__all__ = ["BLKFLSBUF", "BLKGETSIZE64", "BLKROGET", "BlockDeviceSlots", "device_size"]

# linux/fs.h ioctls (x86-64 and arm64 encode them alike)
BLKROGET: Final = 0x125E
BLKGETSIZE64: Final = 0x80081272
BLKFLSBUF: Final = 0x1261
#: O_DIRECT reads need a buffer aligned to the logical block size; a page-aligned
#: mmap of this many bytes is aligned for every block size up to the page size
_DIRECT_BUF: Final = CHUNK


def device_size(fd: int) -> int:
    """Size in bytes of the block device open on ``fd`` (``BLKGETSIZE64``)."""
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("<Q", buf)[0])


def _read_only(fd: int) -> bool:
    buf = fcntl.ioctl(fd, BLKROGET, b"\0" * 4)
    return bool(struct.unpack("<i", buf)[0])


class BlockDeviceSlots(SlotBackend):
    """Slots A and B as block devices.

    Args:
        devices: slot name -> device path, ``PARTLABEL=label`` or ``PARTUUID=uuid``.
        booted: returns the slot the bootloader booted (``None``: unknown or recovery);
            that slot is never opened for writing.
    """

    read_back = True

    def __init__(
        self, devices: Mapping[str, str], *, booted: Callable[[], str | None] | None = None
    ) -> None:
        if set(devices) != set(SLOTS):
            raise ConfigError(f"block-device slots must name exactly {', '.join(SLOTS)}")
        self.devices = dict(devices)
        self._booted = booted

    def device(self, slot: str) -> Path:
        """The block device of ``slot``, resolved now (labels can move between boots).

        Raises:
            ConfigError: no such partition, or the name is not a block device.
            DeviceStorageError: the partition exists but has no device node.
        """
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        path = resolve_device(self.devices[slot])
        try:
            st = os.stat(path)
        except OSError as e:
            raise ConfigError(f"slot {slot} device {path}: {e.strerror}") from e
        if not stat.S_ISBLK(st.st_mode):
            raise ConfigError(f"slot {slot} device {path} is not a block device")
        return path

    def _refuse_running(self, slot: str, path: Path) -> None:
        if self._booted is not None and self._booted() == slot:
            raise DeviceStorageError(f"slot {slot} is the booted slot: refusing to write it")
        if os.stat(path).st_rdev == os.stat("/").st_dev:
            raise DeviceStorageError(
                f"slot {slot} ({path}) holds the running root file system: refusing to write it"
            )

    def open_writer(self, slot: str, *, offset: int, length: int) -> SlotWriter:
        """Open the slot's device exclusively after the size and read-only checks.

        Raises:
            DeviceStorageError: booted, mounted or otherwise in use (EBUSY), read-only,
                smaller than ``length``, or cannot be opened.
        """
        path = self.device(slot)
        self._refuse_running(slot, path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceStorageError(
                    f"slot {slot} ({path}) is in use (mounted or claimed): refusing to write it"
                ) from e
            raise DeviceStorageError(f"cannot open slot {slot} ({path}): {e.strerror}") from e
        try:
            if _read_only(fd):
                raise DeviceStorageError(f"slot {slot} ({path}) is read-only")
            size = device_size(fd)
            if length > size:
                raise DeviceStorageError(
                    f"slot {slot} ({path}) holds {size} bytes, the image has {length}"
                )
            os.lseek(fd, offset, os.SEEK_SET)
        except OSError as e:
            os.close(fd)
            raise DeviceStorageError(f"cannot prepare slot {slot} ({path}): {e.strerror}") from e
        except DeviceStorageError:
            os.close(fd)
            raise
        return _BlockWriter(fd, slot)

    def write(
        self, slot: str, source: Path, *, progress: Callable[[int], None] | None = None
    ) -> tuple[int, str]:
        """Copy ``source`` into the slot through :meth:`open_writer`, then fsync."""
        h = hashlib.sha256()
        n = 0
        try:
            length = source.stat().st_size
            writer = self.open_writer(slot, offset=0, length=length)
            try:
                with open(source, "rb") as src:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        writer.write(chunk)
                        n += len(chunk)
                        if progress:
                            progress(len(chunk))
                writer.sync()
            finally:
                writer.close()
        except OSError as e:
            raise DeviceStorageError(f"cannot read {source}: {e.strerror}") from e
        return n, h.hexdigest()

    def open_slot(self, slot: str) -> BinaryIO:
        """Open the slot's device for reading (a delta's base)."""
        return open(self.device(slot), "rb")

    def read(self, slot: str, length: int) -> Iterator[bytes]:
        """The slot's first ``length`` bytes, read with ``O_DIRECT`` (from the device)."""
        path = self.device(slot)
        try:
            yield from _read_direct(path, length)
        except OSError as e:
            raise DeviceStorageError(f"cannot read slot {slot} ({path}): {e.strerror}") from e

    def digest(self, slot: str, length: int) -> str:
        """SHA-256 of what the device stores (``O_DIRECT``); ``""`` if short or unreadable."""
        h = hashlib.sha256()
        n = 0
        try:
            for chunk in self.read(slot, length):
                h.update(chunk)
                n += len(chunk)
        except (DeviceStorageError, ConfigError):
            return ""
        return h.hexdigest() if n == length else ""


def _read_direct(path: Path, length: int) -> Iterator[bytes]:
    """Read ``length`` bytes of ``path`` bypassing the page cache."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # No O_DIRECT here (some stacked drivers): drop the cache, then read normally.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = mmap.mmap(-1, _DIRECT_BUF)
    view = memoryview(buf)
    try:
        pos = 0
        while pos < length:
            # Whole blocks are read (O_DIRECT); only the image's bytes are returned.
            got = os.preadv(fd, [view], pos)
            if got <= 0:
                return
            take = min(got, length - pos)
            yield bytes(view[:take])
            pos += take
            if got < _DIRECT_BUF:
                return
    finally:
        view.release()
        buf.close()
        os.close(fd)


class _BlockWriter(SlotWriter):
    def __init__(self, fd: int, slot: str) -> None:
        self._fd = fd
        self._slot = slot

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DeviceStorageError(f"slot {self._slot} is full") from e
            raise DeviceStorageError(f"cannot write slot {self._slot}: {e.strerror}") from e

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise DeviceStorageError(f"cannot sync slot {self._slot}: {e.strerror}") from e

    def close(self) -> None:
        try:
            # Drop the device's cached pages, so the read-back verify reads the medium.
            fcntl.ioctl(self._fd, BLKFLSBUF, 0)
        except OSError:
            pass  # only a cache hint; the O_DIRECT read-back does not depend on it
        finally:
            os.close(self._fd)
