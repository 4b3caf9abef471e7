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
    """Slots as files ``a.img`` and ``b.img`` in a directory (simulation and tests)."""

    def __init__(self, directory: Path):
        self.directory = directory

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
        try:
            fd = os.open(self.path(slot), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DeviceStorageError(f"cannot open slot {slot}: {e.strerror or e}") from e
        try:
            # A file slot holds exactly the image (a partition would keep its tail).
            os.ftruncate(fd, offset if offset == 0 else max(offset, os.fstat(fd).st_size))
            os.lseek(fd, offset, os.SEEK_SET)
        except OSError as e:
            os.close(fd)
            raise DeviceStorageError(f"cannot position slot {slot}: {e.strerror or e}") from e
        return _FileSlotWriter(fd, slot, length)

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
    def __init__(self, fd: int, slot: str, length: int) -> None:
        self._fd = fd
        self._slot = slot
        self._length = length

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            raise DeviceStorageError(f"cannot write slot {self._slot}: {e.strerror or e}") from e

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise DeviceStorageError(f"cannot sync slot {self._slot}: {e.strerror or e}") from e

    def close(self) -> None:
        os.close(self._fd)
