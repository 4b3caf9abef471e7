"""Block-device slots on loop-device partitions (root): resolve, stream, verify, refuse.

Everything real: a GPT disk image written by sfdisk, attached with losetup, partitions
registered with partx, the agent's streaming install writing a slot through
:class:`BlockDeviceSlots`, an ext4 file system mounted with the kernel's own mount.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from loopdev_support import LoopDisk, loop_disk, require_tools
from otaguard.agent.blockdev import BlockDeviceSlots
from otaguard.agent.gpt import find_partition, read_gpt, resolve_device
from otaguard.agent.slot_stream import stream_to_slot
from otaguard.model.errors import ConfigError, DeviceStorageError

SLOT_BYTES = 6 * 1024 * 1024
IMAGE = os.urandom(3 * 1024 * 1024 + 123)  # not a multiple of the sector size


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    with loop_disk(tmp_path) as d:
        yield d


def _stream(slots: BlockDeviceSlots, slot: str, data: bytes) -> None:
    stream_to_slot(
        backend=slots,
        slot=slot,
        target=TargetFile.from_data("fw.img", data, ["sha256"]),
        open_stream=lambda offset: (data[i : i + 65536] for i in range(offset, len(data), 65536)),
        resume=None,
        checkpoint_bytes=1024 * 1024,
        on_checkpoint=lambda ck: None,
        stop=threading.Event(),
    )


def _slots(disk: LoopDisk, **kw: object) -> BlockDeviceSlots:
    labels = {s: f"PARTLABEL={disk.label(s)}" for s in ("A", "B")}
    return BlockDeviceSlots(labels, **kw)  # type: ignore[arg-type]


def test_partlabel_resolves_from_the_gpt_as_blkid_does(disk: LoopDisk) -> None:
    require_tools("blkid")
    ours = find_partition(name=disk.label("B"))
    blkid = subprocess.run(
        ["blkid", "-t", f"PARTLABEL={disk.label('B')}", "-o", "device"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert blkid == [str(ours)] == [str(disk.part(3))]
    entries, _ = read_gpt(Path(disk.loop))
    uuid_b = next(e.partuuid for e in entries if e.name == disk.label("B"))
    assert resolve_device(f"PARTUUID={uuid_b.upper()}") == disk.part(3)
    with pytest.raises(ConfigError, match=f"no GPT partition has PARTLABEL=rootfs_c-{disk.tag}"):
        resolve_device(f"PARTLABEL=rootfs_c-{disk.tag}")


def test_a_stream_lands_on_the_partition_and_reads_back(disk: LoopDisk) -> None:
    slots = _slots(disk)
    _stream(slots, "B", IMAGE)
    with open(disk.part(3), "rb") as f:
        assert f.read(len(IMAGE)) == IMAGE
    assert slots.digest("B", len(IMAGE)) == hashlib.sha256(IMAGE).hexdigest()
    # Slot A was not touched (still zeros).
    with open(disk.part(2), "rb") as f:
        assert f.read(4096) == b"\0" * 4096


def test_an_image_larger_than_the_slot_is_refused_before_a_byte(disk: LoopDisk) -> None:
    with pytest.raises(DeviceStorageError, match=f"holds {SLOT_BYTES} bytes, the image has"):
        _stream(_slots(disk), "B", b"\1" * (SLOT_BYTES + 1))
    with open(disk.part(3), "rb") as f:
        assert f.read(4096) == b"\0" * 4096, "nothing was written"


def test_the_booted_slot_is_never_opened(disk: LoopDisk) -> None:
    with pytest.raises(DeviceStorageError, match="slot A is the booted slot"):
        _stream(_slots(disk, booted=lambda: "A"), "A", IMAGE)
    with open(disk.part(2), "rb") as f:
        assert f.read(4096) == b"\0" * 4096


def test_a_read_only_slot_is_refused(disk: LoopDisk) -> None:
    subprocess.run(["blockdev", "--setro", str(disk.part(3))], check=True)
    try:
        with pytest.raises(DeviceStorageError, match=r"slot B \(.*\) is read-only"):
            _stream(_slots(disk), "B", IMAGE)
    finally:
        subprocess.run(["blockdev", "--setrw", str(disk.part(3))], check=True)


def test_a_mounted_slot_is_refused_by_the_exclusive_open(disk: LoopDisk, tmp_path: Path) -> None:
    require_tools("mkfs.ext4", "mount", "umount")
    subprocess.run(["mkfs.ext4", "-q", str(disk.part(2))], check=True)
    before = hashlib.sha256(disk.part(2).read_bytes()).hexdigest()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "ro", str(disk.part(2)), str(mnt)], check=True)
    try:
        with pytest.raises(DeviceStorageError, match=r"slot A \(.*\) is in use \(mounted"):
            _stream(_slots(disk), "A", IMAGE)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert hashlib.sha256(disk.part(2).read_bytes()).hexdigest() == before, "file system intact"


def test_a_write_that_does_not_reach_the_medium_fails_the_read_back(disk: LoopDisk) -> None:
    """The stream's bytes hash right, but the device stores something else (a medium
    that drops writes, simulated by corrupting the partition behind the writer's back
    before the read-back): the install must not believe the slot holds the image."""

    class Lossy(BlockDeviceSlots):
        def digest(self, slot: str, length: int) -> str:
            with open(self.device(slot), "r+b") as f:  # the medium flips a byte
                f.seek(1000)
                f.write(b"\xff")
                f.flush()
                os.fsync(f.fileno())
            return super().digest(slot, length)

    slots = Lossy({"A": str(disk.part(2)), "B": str(disk.part(3))})
    with pytest.raises(DeviceStorageError, match="slot B reads back differently"):
        _stream(slots, "B", IMAGE)


def test_a_duplicate_label_is_ambiguous_not_a_guess(tmp_path: Path) -> None:
    """Two disks carry the same labels (a USB stick flashed with the device's image): the
    slot is not resolved to either."""
    with (
        loop_disk(tmp_path / "one", tag="dup") as one,
        loop_disk(tmp_path / "two", tag="dup"),
        pytest.raises(ConfigError, match="PARTLABEL=rootfs_b-dup is ambiguous"),
    ):
        _slots(one).open_writer("B", offset=0, length=1)


def test_a_partition_the_kernel_sees_elsewhere_is_refused(disk: LoopDisk) -> None:
    """The table on disk was rewritten (slot B moved) without telling the kernel: its
    partition node still covers the old blocks; writing there would hit the wrong data."""
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "-N", "3", disk.loop],
        input="start=20480, size=4096\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(DeviceStorageError, match="starts elsewhere than the partition table"):
        _slots(disk).open_writer("B", offset=0, length=1)


def test_a_slot_name_that_is_not_a_block_device_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file.img"
    f.write_bytes(b"x")
    slots = BlockDeviceSlots({"A": str(f), "B": str(f)})
    with pytest.raises(ConfigError, match="is not a block device"):
        slots.open_writer("B", offset=0, length=1)
    with pytest.raises(ConfigError, match="must be a path, PARTLABEL=name or PARTUUID=uuid"):
        BlockDeviceSlots({"A": "rootfs_a", "B": "x"}).device("A")
