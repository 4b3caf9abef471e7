"""A/B slots and the boot environment the agent and the bootloader share.

The boot environment is what U-Boot/GRUB keep in their environment block: which slot
is primary, which slot to try once and how many tries are left, and what image each
slot holds. It is always written atomically.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Final

from otaguard._fs import atomic_write_json
from otaguard.model.errors import ConfigError, DeviceStorageError

__all__ = [
    "SLOTS",
    "BootEnv",
    "FileSlots",
    "SlotBackend",
    "SlotImage",
    "SlotWriter",
    "other_slot",
]

SLOTS: Final = ("A", "B")
# Slots are copied and hashed in chunks this size: images never sit in memory.
CHUNK: Final = 1024 * 1024
#: O_DIRECT needs the buffer, the file offset and the length aligned to the device's
#: logical block; 4 KiB covers every block size Linux filesystems use here
DIRECT_ALIGN: Final = 4096

logger = logging.getLogger(__name__)


def other_slot(slot: str) -> str:
    """The A/B partner of ``slot``."""
    return "B" if slot == "A" else "A"


@dataclass(frozen=True)
class SlotImage:
    """What a slot holds, as recorded when it was written and verified."""

    target: str
    version: str
    security_counter: int
    sha256: str
    length: int
    #: SHA-256 of the release's SBOM, verified with the image (``None`` for an image
    #: written before SBOMs: boot environments written then still load)
    sbom_sha256: str | None = None


@dataclass
class BootEnv:
    """The persisted boot environment."""

    primary: str
    try_slot: str | None
    tries_left: int
    slots: dict[str, SlotImage | None]
    #: why the bootloader last abandoned a try slot: "tries-exhausted" (the image kept
    #: failing) or "verification-failed" (the slot's bytes are not what was written)
    fallback: str | None = None

    @classmethod
    def load(cls, path: Path) -> BootEnv:
        """Read the boot environment.

        Raises:
            ConfigError: missing or corrupt.
        """
        try:
            raw = json.loads(path.read_bytes())
            slots = {
                s: (SlotImage(**raw["slots"][s]) if raw["slots"].get(s) else None) for s in SLOTS
            }
            env = cls(
                raw["primary"], raw["try_slot"], int(raw["tries_left"]), slots, raw.get("fallback")
            )
        except FileNotFoundError as e:
            raise ConfigError(f"boot environment {path} is missing") from e
        except OSError as e:
            raise ConfigError(f"cannot read boot environment {path}: {e.strerror}") from e
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # AttributeError: "slots" of another JSON type than an object (found by tests/fuzz)
            raise ConfigError(f"boot environment {path} is corrupt") from e
        if env.primary not in SLOTS or env.try_slot not in (*SLOTS, None):
            raise ConfigError(f"boot environment {path} names an unknown slot")
        return env

    def save(self, path: Path) -> None:
        """Persist atomically (temp, fsync, rename)."""
        atomic_write_json(
            path,
            {
                "primary": self.primary,
                "try_slot": self.try_slot,
                "tries_left": self.tries_left,
                "fallback": self.fallback,
                "slots": {s: (asdict(i) if i else None) for s, i in self.slots.items()},
            },
        )


class SlotWriter(abc.ABC):
    """An open slot being written sequentially (a streaming install)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append ``data`` at the current position.

        Raises:
            DeviceStorageError: the slot cannot be written.
        """

    @abc.abstractmethod
    def sync(self) -> None:
        """Make everything written so far durable (fsync).

        Raises:
            DeviceStorageError: the flush failed.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the slot (without syncing)."""


class SlotBackend(abc.ABC):
    """Where slot images live: files here; block devices or RAUC elsewhere."""

    #: read the slot back from the medium after a streamed install and compare it with the
    #: image: block devices, where a real bootloader does not hash the slot at boot and the
    #: read bypasses the page cache; not file slots, whose read-back would come from the
    #: page cache and prove nothing (the simulated bootloader hashes them at boot, ADR 0017)
    read_back: bool = False

    @abc.abstractmethod
    def open_writer(self, slot: str, *, offset: int, length: int) -> SlotWriter:
        """Open ``slot`` to write an image of ``length`` bytes from byte ``offset`` on.

        The bytes before ``offset`` are kept (an interrupted install resumes there).

        Raises:
            DeviceStorageError: the slot cannot be opened, or is smaller than ``length``.
        """

    @abc.abstractmethod
    def read(self, slot: str, length: int) -> Iterator[bytes]:
        """The first ``length`` bytes of ``slot`` in chunks (fewer if the slot is short).

        Raises:
            DeviceStorageError: the slot cannot be read.
        """

    @abc.abstractmethod
    def write(
        self, slot: str, source: Path, *, progress: Callable[[int], None] | None = None
    ) -> tuple[int, str]:
        """Copy ``source`` into ``slot`` durably, hashing what it copies.

        Returns:
            The number of bytes copied and their SHA-256 (hex), so the caller can check
            the source without reading it a second time.

        Raises:
            DeviceStorageError: the slot cannot be written.
        """

    def capacity(self, slot: str) -> int | None:
        """Bytes ``slot`` can hold (a partition's size); ``None``: not bounded here."""
        return None

    def open_slot(self, slot: str) -> BinaryIO:
        """Open ``slot`` for reading (the base a delta applies to).

        Raises:
            OSError: this backend cannot read slots back (then deltas are not used).
        """
        raise OSError(errno.EOPNOTSUPP, f"slot {slot} cannot be read back")

    @abc.abstractmethod
    def digest(self, slot: str, length: int) -> str:
        """SHA-256 of the first ``length`` bytes of ``slot`` (empty string if unreadable)."""


class FileSlots(SlotBackend):
    """Slots as files ``a.img`` and ``b.img`` in a directory (simulation and tests).

    Args:
        directory: where the slot files are.
        capacity: the size of each slot, as a partition has one (``None``: the file
            grows as far as the device's ``max_image_bytes`` lets an image be).
        direct: stream into the slot with ``O_DIRECT`` where the filesystem allows it
            (ADR 0021): the image does not pass through the page cache, which cost most
            of a streaming install's CPU here (copy, dirty-page writeback).
    """

    def __init__(self, directory: Path, *, capacity: int | None = None, direct: bool = True):
        self.directory = directory
        self._capacity = capacity
        self._direct = direct

    def capacity(self, slot: str) -> int | None:
        """The configured size of each slot file, if any."""
        return self._capacity

    def path(self, slot: str) -> Path:
        """File backing ``slot``."""
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.directory / f"{slot.lower()}.img"

    def write(
        self, slot: str, source: Path, *, progress: Callable[[int], None] | None = None
    ) -> tuple[int, str]:
        """Copy ``source`` into the slot file in place, like a partition, then fsync."""
        h = hashlib.sha256()
        length = 0
        try:
            with open(source, "rb") as src, open(self.path(slot), "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    length += len(chunk)
                    if progress:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as e:
            raise DeviceStorageError(f"cannot write slot {slot}: {e.strerror or e}") from e
        return length, h.hexdigest()

    def open_writer(self, slot: str, *, offset: int, length: int) -> SlotWriter:
        """Open the slot file in place, like a partition; from 0 it is emptied first."""
        if self._capacity is not None and length > self._capacity:
            raise DeviceStorageError(
                f"slot {slot} holds {self._capacity} bytes, the image has {length}"
            )
        path = self.path(slot)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DeviceStorageError(f"cannot open slot {slot}: {e.strerror or e}") from e
        direct: int | None = None
        try:
            # A file slot holds exactly the image (a partition would keep its tail).
            os.ftruncate(fd, offset if offset == 0 else max(offset, os.fstat(fd).st_size))
            if self._direct:
                try:
                    direct = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
                except OSError as e:  # tmpfs and some others refuse O_DIRECT
                    logger.debug("slot %s: no O_DIRECT (%s); writing through the cache", slot, e)
            return _FileSlotWriter(fd, slot, length, offset, direct)
        except OSError as e:
            os.close(fd)
            if direct is not None:
                os.close(direct)
            raise DeviceStorageError(f"cannot position slot {slot}: {e.strerror or e}") from e

    def open_slot(self, slot: str) -> BinaryIO:
        """Open the slot file for reading (a delta's base)."""
        return open(self.path(slot), "rb")

    def read(self, slot: str, length: int) -> Iterator[bytes]:
        """Read the slot file's first ``length`` bytes in :data:`CHUNK` blocks."""
        remaining = length
        try:
            with open(self.path(slot), "rb") as f:
                while remaining > 0 and (chunk := f.read(min(CHUNK, remaining))):
                    remaining -= len(chunk)
                    yield chunk
        except OSError as e:
            raise DeviceStorageError(f"cannot read slot {slot}: {e.strerror or e}") from e

    def digest(self, slot: str, length: int) -> str:
        """Stream-hash the slot; a short or unreadable slot yields ``""``."""
        h = hashlib.sha256()
        remaining = length
        try:
            with open(self.path(slot), "rb") as f:
                while remaining > 0:
                    chunk = f.read(min(CHUNK, remaining))
                    if not chunk:
                        return ""
                    h.update(chunk)
                    remaining -= len(chunk)
        except OSError:
            return ""
        return h.hexdigest()


class _FileSlotWriter(SlotWriter):
    """Writes a slot file from ``offset`` on, through ``O_DIRECT`` when ``direct`` is open.

    Direct writes must be whole aligned blocks from an aligned buffer: each call copies
    the bytes since the last aligned offset (``_carry``) and the new data into an aligned
    buffer, writes its whole blocks directly and the remainder (under one block) through
    the page cache, and keeps that remainder to write again, directly, with the next
    call. So whatever a call was given is in the file when it returns, and an fsync from
    another thread (the checkpoint) covers every byte written before it began.
    """

    def __init__(self, fd: int, slot: str, length: int, offset: int, direct: int | None) -> None:
        self._fd = fd
        self._direct = direct
        self._slot = slot
        self._length = length
        self._pos = offset
        self._buf: mmap.mmap | None = None
        self._carry = b""
        if direct is not None and offset % DIRECT_ALIGN:
            # resuming mid-block: the block's first bytes are in the file already
            start = offset - offset % DIRECT_ALIGN
            self._carry = os.pread(fd, offset - start, start)
            if len(self._carry) != offset - start:
                raise OSError(errno.EIO, f"slot {slot} is shorter than {offset} bytes")

    def write(self, data: bytes) -> None:
        # The last line of defence against a stream longer than its image: a slot is
        # never written past the length it was opened for.
        if self._pos + len(data) > self._length:
            raise DeviceStorageError(
                f"refusing to write slot {self._slot} past the image's {self._length} bytes"
            )
        try:
            if self._direct is None:
                view = memoryview(data)
                at = self._pos
                while view:
                    n = os.pwrite(self._fd, view, at)
                    view, at = view[n:], at + n
            else:
                self._write_direct(data)
        except OSError as e:
            raise DeviceStorageError(f"cannot write slot {self._slot}: {e.strerror or e}") from e
        self._pos += len(data)

    def _write_direct(self, data: bytes) -> None:
        carry, direct = self._carry, self._direct
        assert direct is not None  # noqa: S101 - only called with a direct descriptor
        total = len(carry) + len(data)
        base = self._pos - len(carry)  # aligned
        if self._buf is None or len(self._buf) < total:
            if self._buf is not None:
                self._buf.close()
            size = max(total + DIRECT_ALIGN - 1, CHUNK + DIRECT_ALIGN)
            self._buf = mmap.mmap(-1, size - size % DIRECT_ALIGN)  # page-aligned
        buf = self._buf
        buf[: len(carry)] = carry
        buf[len(carry) : total] = data
        whole = total - total % DIRECT_ALIGN
        view = memoryview(buf)
        try:
            done = 0
            while done < whole:
                n = os.pwrite(direct, view[done:whole], base + done)
                if n <= 0 or n % DIRECT_ALIGN:
                    raise OSError(errno.EIO, f"short direct write ({n} bytes)")
                done += n
            tail = bytes(view[whole:total])
        finally:
            view.release()
        if tail:
            os.pwrite(self._fd, tail, base + whole)
        self._carry = tail

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise DeviceStorageError(f"cannot sync slot {self._slot}: {e.strerror or e}") from e

    def close(self) -> None:
        os.close(self._fd)
        if self._direct is not None:
            os.close(self._direct)
        if self._buf is not None:
            self._buf.close()
