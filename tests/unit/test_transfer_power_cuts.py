"""Power cuts while a delta is applied, and compression bombs, against the real agent.

The repository is in memory (:class:`MemoryFetcher`); the release 1.1.0 is a patched
1.0.0 published with a delta from 1.0.0 and a zstd blob. A power cut is a
``BaseException`` raised by the slot while it is written at a chosen image offset
(the bytes before it are in the slot, nothing after): nothing in the agent may catch it.
After each cut the device is powered on (the bootloader verifies what it starts) and
updated again. A decoder's state cannot be persisted, so the delta is fetched and
decoded again; what must resume is the slot: no byte below the last checkpoint is
written again (ADR 0021).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import pytest
import zstandard
from test_install_memory import SIZE, Mem, PowerCut, assert_committed, flip_byte, mem

from conftest import HW
from otaguard.agent import BootEnv, Device, DeviceConfig, FileSlots, InstallState
from otaguard.agent.slots import SlotWriter
from otaguard.delta import CompressedImageError
from otaguard.delta.apply import BLOCK
from otaguard.delta.transforms import ZstdTransform
from otaguard.model import DeviceStorageError
from otaguard.repo.transfer import TransferRequest
from otaguard.sim.memory import MemoryFetcher, read_repository_files
from sbom_support import sbom_beside

__all__ = ["mem"]  # the fixture, imported for this module

CHECKPOINT = 16 * 1024
DEVICES = 10
CUTS_PER_DEVICE = 5  # 50 power cuts in all
SEED = 20261123
LOGGER = "otaguard.agent"


class CuttingSlots(FileSlots):
    """Real file slots that record what is written and can lose power at an offset."""

    def __init__(self, directory: Path, *, cut_at: int | None = None, **kw: int) -> None:
        super().__init__(directory, **kw)
        self.cut_at = cut_at
        #: (slot, offset) of every writer opened, and bytes written through them
        self.opened: list[tuple[str, int]] = []
        self.written = 0

    def open_writer(self, slot: str, *, offset: int, length: int) -> SlotWriter:
        inner = super().open_writer(slot, offset=offset, length=length)
        self.opened.append((slot, offset))
        slots, pos = self, offset

        class Writer(SlotWriter):
            def write(self, data: bytes) -> None:
                nonlocal pos
                cut = slots.cut_at
                if cut is not None and pos + len(data) > cut:
                    inner.write(data[: max(cut - pos, 0)])  # what reached the slot
                    raise PowerCut(f"power cut at image byte {cut}")
                inner.write(data)
                pos += len(data)
                slots.written += len(data)

            def sync(self) -> None:
                inner.sync()

            def close(self) -> None:
                inner.close()

        return Writer()


def _patched(mem: Mem, version: str) -> Path:
    """``version``: the 1.0.0 image with a few edits, as a security fix would be."""
    data = bytearray(mem.image("1.0.0").read_bytes())
    rng = random.Random(version)
    for _ in range(12):
        at = rng.randrange(len(data) - 256)
        data[at : at + 200] = rng.randbytes(200)
    path = mem.tmp / f"fw-{version}.img"
    path.write_bytes(bytes(data))
    mem.images[version] = path
    return path


def _publish(mem: Mem, *, compress: bool = True) -> tuple[dict[str, bytes], str, str, str]:
    """Release 1.1.0 with a delta from 1.0.0 and a zstd blob; (files, image, delta, zst)."""
    image = _patched(mem, "1.1.0")
    mem.repo.add_release(
        image,
        sbom=sbom_beside(image),
        version="1.1.0",
        hardware_ids=[HW],
        security=True,
        security_counter=None,
        transfer=TransferRequest(compress="zstd" if compress else None, delta_from=("1.0.0",)),
    )
    files = read_repository_files(mem.repo.dir)
    blob = next(p for p in files if p.startswith("targets/") and p.endswith("-1.1.0.img"))
    delta = next(p for p in files if p.startswith("targets/") and p.endswith(".delta"))
    zst = next((p for p in files if p.startswith("targets/") and p.endswith(".zst")), "")
    return files, blob, delta, zst


def target_path(file: str) -> str:
    """The target path of a consistent-snapshot file name (``targets/<hash>.<path>``)."""
    return file.removeprefix("targets/").split(".", 1)[1]


def provision(mem: Mem, name: str) -> Path:
    path = mem.provision(name)
    cfg = DeviceConfig.load(path / "config.json")
    dataclasses.replace(cfg, resume_checkpoint_bytes=CHECKPOINT).save(path / "config.json")
    return path


def open_device(
    path: Path, files: dict[str, bytes], *, cut_at: int | None = None
) -> tuple[Device, MemoryFetcher, CuttingSlots]:
    fetcher = MemoryFetcher(files, chunk=4096)
    dev = Device(path, fetcher_factory=lambda: fetcher)
    slots = CuttingSlots(path / "slots", cut_at=cut_at)
    dev.backend = slots
    return dev, fetcher, slots


def test_power_cuts_during_delta_apply_resume_the_slot_and_end_verified(mem: Mem) -> None:
    files, blob, delta, _ = _publish(mem)
    rng = random.Random(SEED)
    for d in range(DEVICES):
        path = provision(mem, f"d{d}")
        resume_at = 0
        for cut in sorted(rng.sample(range(1, SIZE), CUTS_PER_DEVICE)):
            dev, fetcher, slots = open_device(path, files, cut_at=cut)
            with pytest.raises(PowerCut):
                dev.update()
            # The run applied the delta (never the full image) and wrote the slot from
            # the previous checkpoint on, not from byte 0...
            assert fetcher.served[blob] == 0 and fetcher.ranges[delta] == [0], (d, cut)
            assert slots.opened == [("B", resume_at)], (d, cut, slots.opened)
            state = InstallState.load(path / "install-state.json")
            # ...and checkpointed its own progress, recording the delta that wrote it
            # (at most one checkpoint interval and one output block behind the cut).
            assert state.written_via == (target_path(delta) if state.written else None), (d, cut)
            assert resume_at <= state.written <= cut < state.written + CHECKPOINT + BLOCK, (
                d,
                cut,
                state.written,
            )
            resume_at = state.written
            # Power on: the partial slot is invalid, the old image verified and started.
            assert BootEnv.load(path / "bootenv.json").slots["B"] is None
            rec = Device(path).boot()
            assert rec.slot == "A" and rec.version == "1.0.0" and not rec.recovery
        dev, fetcher, slots = open_device(path, files)
        assert dev.update().outcome == "updated"
        assert_committed(dev)
        assert fetcher.served[blob] == 0, "installed by delta"
        assert slots.opened == [("B", resume_at)]
        assert slots.written == SIZE - resume_at < SIZE, "the slot resumed, not restarted"


def test_damaged_prefix_during_a_delta_starts_the_slot_over(mem: Mem) -> None:
    files, blob, _, _ = _publish(mem)
    path = provision(mem, "d")
    with pytest.raises(PowerCut):
        open_device(path, files, cut_at=SIZE // 2)[0].update()
    assert InstallState.load(path / "install-state.json").written > CHECKPOINT
    flip_byte(path / "slots" / "b.img", offset=100)  # bit rot in the written prefix
    dev, fetcher, slots = open_device(path, files)
    assert dev.update().outcome == "updated"
    assert slots.opened == [("B", 0)] and slots.written == SIZE
    assert fetcher.served[blob] == 0, "still by delta"
    assert_committed(dev)


def test_corrupt_delta_cut_mid_apply_falls_back_to_the_full_image_from_byte_0(
    mem: Mem, caplog: pytest.LogCaptureFixture
) -> None:
    # delta only: nothing but the full image comes after it
    files, blob, delta, _ = _publish(mem, compress=False)
    data = bytearray(files[delta])
    data[-1] ^= 0xFF  # a mirror corrupts the delta's end: found after most is applied
    files[delta] = bytes(data)
    path = provision(mem, "d")
    with pytest.raises(PowerCut):
        open_device(path, files, cut_at=SIZE // 3)[0].update()
    state = InstallState.load(path / "install-state.json")
    assert state.written_via == target_path(delta) and state.written > 0
    dev, fetcher, slots = open_device(path, files)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert dev.update().outcome == "updated"
    assert_committed(dev)
    assert "delta failed:" in caplog.text
    # the delta's checkpoint was resumed, then dropped when the delta failed: the full
    # image is written from byte 0, never on top of the prefix an unverified delta wrote
    assert slots.opened == [("B", state.written), ("B", 0)]
    assert fetcher.ranges[blob] == [0]
    assert fetcher.served[blob] == SIZE


def _bomb(size: int) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(b"\0" * size)


def test_compression_bomb_from_a_mirror_is_refused_at_the_image_length(
    mem: Mem, caplog: pytest.LogCaptureFixture
) -> None:
    files, blob, delta, zst = _publish(mem)
    del files[delta]  # the delta is missing (404): the device takes the compressed blob
    bomb = _bomb(64 << 20)  # 64 MiB of zeros, 256 times the image
    assert len(bomb) <= len(files[zst]), "within the signed length: only the decoder can tell"
    files[zst] = bomb
    path = provision(mem, "d")
    dev, fetcher, slots = open_device(path, files)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert dev.update().outcome == "updated"
    assert f"expands beyond its declared {SIZE} bytes (compression bomb)" in caplog.text
    assert slots.opened == [("B", 0)] * 3  # the delta (absent), the bomb, the image
    # the bomb wrote at most the image length; the full image the rest
    assert slots.written <= 2 * SIZE and fetcher.served[blob] == SIZE
    assert_committed(dev)


def test_compression_bomb_is_refused_at_the_slot_size() -> None:
    slot = 96 * 1024
    out: list[bytes] = []
    decoded = ZstdTransform(SIZE, slot)([_bomb(64 << 20)])
    with pytest.raises(CompressedImageError, match=f"beyond the slot's {slot} bytes"):
        out.extend(decoded)
    assert sum(map(len, out)) <= slot


def test_an_image_larger_than_the_slot_is_never_written(mem: Mem) -> None:
    files, _, _, _ = _publish(mem)
    path = provision(mem, "d")
    dev = Device(path, fetcher_factory=lambda: MemoryFetcher(files))
    slots = CuttingSlots(path / "slots", capacity=SIZE // 2)
    dev.backend = slots
    with pytest.raises(DeviceStorageError, match=f"slot B holds {SIZE // 2} bytes, the image"):
        dev.update()
    assert slots.written == 0
    assert BootEnv.load(path / "bootenv.json").slots["B"] is None
