"""Streaming install, power cuts at byte offsets and resume, against the real agent.

The repository is in memory (:class:`MemoryFetcher`), everything else is the real code.
A power cut is a ``BaseException`` raised by the fetcher while it hands over the image at
a chosen byte offset: nothing in the agent may catch it, exactly as nothing runs after
the power goes. After each cut the device is powered on (the bootloader verifies what it
starts) and updated again, which must continue from the last checkpoint with a Range
request instead of downloading the image again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from test_install_memory import SIZE, Mem, PowerCut, assert_committed, flip_byte, mem
from tuf.api import exceptions as tuf_exc
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import TargetFile

from otaguard.agent import BootEnv, Device, DeviceConfig, FileSlots, InstallState
from otaguard.agent.slot_stream import ImageCheck, stream_to_slot
from otaguard.agent.stream import TargetStream
from otaguard.model import TransportError, VerificationError
from otaguard.sim.memory import MemoryFetcher, read_repository_files

__all__ = ["mem"]  # the fixture, imported for this module

CHECKPOINT = 16 * 1024
NET_CHUNK = 4 * 1024
DEVICES = 10
CUTS_PER_DEVICE = 5  # 50 power cuts in all
SEED = 20261122


def provision(mem: Mem, name: str) -> Path:
    path = mem.provision(name)
    cfg = DeviceConfig.load(path / "config.json")
    dataclasses.replace(cfg, resume_checkpoint_bytes=CHECKPOINT).save(path / "config.json")
    return path


def blob_of(files: dict[str, bytes], version: str) -> str:
    return next(p for p in files if p.startswith("targets/") and p.endswith(f"-{version}.img"))


def open_device(
    path: Path, files: dict[str, bytes], on_serve: Callable[[str, int], None] | None = None
) -> tuple[Device, MemoryFetcher]:
    fetcher = MemoryFetcher(files, chunk=NET_CHUNK, on_serve=on_serve)
    return Device(path, fetcher_factory=lambda: fetcher), fetcher


def cut_power_at(blob: str, offset: int) -> Callable[[str, int], None]:
    def hook(path: str, end: int) -> None:
        if path == blob and end > offset:
            raise PowerCut(f"power cut at byte {offset}")

    return hook


def test_power_cuts_at_random_offsets_resume_and_end_on_a_verified_image(mem: Mem) -> None:
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    blob = blob_of(files, "1.1.0")
    rng = random.Random(SEED)
    for d in range(DEVICES):
        path = provision(mem, f"d{d}")
        resume_at = 0
        for cut in sorted(rng.sample(range(1, SIZE), CUTS_PER_DEVICE)):
            dev, fetcher = open_device(path, files, cut_power_at(blob, cut))
            with pytest.raises(PowerCut):
                dev.update()
            # The run resumed where the previous one had checkpointed...
            assert fetcher.ranges[blob] == [resume_at], (d, cut)
            state = InstallState.load(path / "install-state.json")
            # ...and checkpointed its own progress (at most one checkpoint and one
            # network chunk behind the cut).
            assert state.written <= cut and cut - state.written < CHECKPOINT + NET_CHUNK, (
                d,
                cut,
                state.written,
            )
            resume_at = state.written
            # Power on: the partial slot is invalid, the old image verified and started.
            assert BootEnv.load(path / "bootenv.json").slots["B"] is None
            rec = Device(path).boot()
            assert rec.slot == "A" and rec.version == "1.0.0" and not rec.recovery
        dev, fetcher = open_device(path, files)
        assert dev.update().outcome == "updated"
        assert_committed(dev)
        assert fetcher.ranges[blob] == [resume_at]
        assert fetcher.served[blob] == SIZE - resume_at < SIZE, "resumed, not restarted"


def test_damaged_prefix_is_detected_and_the_stream_starts_over(mem: Mem) -> None:
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    blob = blob_of(files, "1.1.0")
    path = provision(mem, "d")
    with pytest.raises(PowerCut):
        open_device(path, files, cut_power_at(blob, SIZE // 2))[0].update()
    assert InstallState.load(path / "install-state.json").written > CHECKPOINT
    flip_byte(path / "slots" / "b.img", offset=100)  # bit rot in the written prefix

    dev, fetcher = open_device(path, files)
    assert dev.update().outcome == "updated"
    assert fetcher.ranges[blob] == [0] and fetcher.served[blob] == SIZE
    assert_committed(dev)


def test_dropped_connection_continues_with_a_range_request_in_the_same_run(mem: Mem) -> None:
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    blob = blob_of(files, "1.1.0")
    path = provision(mem, "d")
    drops = 0

    def drop_once(p: str, end: int) -> None:
        nonlocal drops
        if p == blob and end > SIZE // 3 and drops == 0:
            drops += 1
            raise tuf_exc.DownloadError("connection reset by peer")

    dev, fetcher = open_device(path, files, drop_once)
    assert dev.update().outcome == "updated"
    assert_committed(dev)
    (first, again) = fetcher.ranges[blob]
    assert first == 0 and SIZE // 3 - NET_CHUNK <= again <= SIZE // 3
    assert fetcher.served[blob] == SIZE, "no byte downloaded twice"


def test_a_connection_that_keeps_dropping_fails_the_run_and_the_next_run_resumes(
    mem: Mem,
) -> None:
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    blob = blob_of(files, "1.1.0")
    path = provision(mem, "d")

    def always_drop_after_half(p: str, end: int) -> None:
        if p == blob and end > SIZE // 2:
            raise tuf_exc.DownloadError("connection reset by peer")

    with pytest.raises(TransportError, match="connection reset"):
        open_device(path, files, always_drop_after_half)[0].update()
    state = InstallState.load(path / "install-state.json")
    assert state.phase.value == "selected" and state.stalled_runs == 1
    assert SIZE // 2 - CHECKPOINT - NET_CHUNK < state.written <= SIZE // 2
    dev, fetcher = open_device(path, files)
    assert dev.update().outcome == "updated"
    assert fetcher.ranges[blob] == [state.written]
    assert_committed(dev)


def test_tampered_image_is_refused_and_the_slot_never_armed(mem: Mem) -> None:
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    blob = blob_of(files, "1.1.0")
    data = bytearray(files[blob])
    data[-1] ^= 0x01  # same length, last byte changed: found only at the end
    files[blob] = bytes(data)
    path = provision(mem, "d")
    dev, _ = open_device(path, files)
    with pytest.raises(VerificationError, match="sha256 hash does not match"):
        dev.update()
    st = dev.status()
    assert st.bootenv.slots["B"] is None and st.bootenv.try_slot is None
    assert st.install.last_result is not None
    assert st.install.last_result["outcome"] == "refused"


def test_endless_data_is_refused_before_the_excess_is_written(mem: Mem) -> None:
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    blob = blob_of(files, "1.1.0")
    files[blob] += b"\0" * (3 * NET_CHUNK)
    path = provision(mem, "d")
    dev, _ = open_device(path, files)
    with pytest.raises(VerificationError, match="more than the expected"):
        dev.update()
    assert dev.status().bootenv.slots["B"] is None
    assert (path / "slots" / "b.img").stat().st_size <= SIZE


def test_progress_is_reported_at_a_bounded_rate(mem: Mem) -> None:
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    path = provision(mem, "d")
    calls: list[tuple[str, int, int]] = []
    dev, _ = open_device(path, files)
    assert dev.update(progress=lambda *a: calls.append(a)).outcome == "updated"
    # 64 network chunks, but at most one report per interval plus the final one.
    assert 1 <= len(calls) <= 4, calls
    assert sum(n for _, n, _ in calls) == SIZE and {(s, t) for s, _, t in calls} == {
        ("install", SIZE)
    }


# -- the pure check over a stream -----------------------------------------------------------
def _target(data: bytes) -> TargetFile:
    return TargetFile.from_data("fw.img", data, ["sha256", "sha512"])


def test_target_stream_refuses_a_byte_beyond_the_verified_length() -> None:
    stream = TargetStream(target=_target(b"abcd"))
    stream.update(b"abc")
    with pytest.raises(LengthOrHashMismatchError, match="more than the expected 4 bytes"):
        stream.admit(2)
    assert stream.received == 3, "the refused bytes were not counted"


@pytest.mark.parametrize(
    ("data", "why"),
    [(b"abc", "length 3 != expected 4"), (b"abcx", "sha256 hash does not match")],
)
def test_target_stream_requires_length_and_every_hash(data: bytes, why: str) -> None:
    stream = TargetStream(target=_target(b"abcd"))
    stream.update(data)
    with pytest.raises(LengthOrHashMismatchError, match=why):
        stream.finish()


def test_target_stream_checks_every_listed_algorithm() -> None:
    target = _target(b"abcd")
    target.hashes["sha512"] = "0" * 128  # sha256 right, sha512 wrong
    stream = TargetStream(target=target)
    stream.update(b"abcd")
    with pytest.raises(LengthOrHashMismatchError, match="sha512 hash does not match"):
        stream.finish()


def test_target_stream_refuses_an_unknown_algorithm() -> None:
    target = TargetFile(4, {"nohash": "00"}, "fw.img")
    with pytest.raises(LengthOrHashMismatchError, match="Unsupported algorithm 'nohash'"):
        TargetStream(target=target)


def test_transformed_stream_is_capped_and_checked_against_the_image(tmp_path: Path) -> None:
    """The seam for a decompressor or delta applier: its output is capped at the image
    length and must hash to the image, on top of the blob's own target check."""
    blob = b"z" * 1000
    image = b"IMAGE" * 100

    def expand(chunks: Iterable[bytes]) -> Iterator[bytes]:
        for _ in chunks:
            pass
        yield image
        yield b"!"  # one byte too many

    class Expand:
        resumable = False

        def __call__(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
            return expand(chunks)

    slots = FileSlots(tmp_path)
    with pytest.raises(LengthOrHashMismatchError, match="expands beyond the image's 500 bytes"):
        stream_to_slot(
            backend=slots,
            slot="B",
            target=_target(blob),
            open_stream=lambda offset: iter([blob[offset:]]),
            resume=None,
            checkpoint_bytes=CHECKPOINT,
            on_checkpoint=lambda ck: None,
            stop=threading.Event(),
            transform=Expand(),
            image=ImageCheck(len(image), hashlib.sha256(image).hexdigest()),
        )


def test_the_target_slot_is_invalid_before_its_first_byte_is_written(mem: Mem) -> None:
    """Slot B holds a valid image the boot environment records (a restored backup, or a
    slot kept at the floor): a cut in the middle of overwriting it must leave it invalid."""
    mem.release("1.1.0")
    files = read_repository_files(mem.repo.dir)
    path = provision(mem, "d")
    env = BootEnv.load(path / "bootenv.json")
    env.slots["B"] = env.slots["A"]
    env.save(path / "bootenv.json")
    (path / "slots" / "b.img").write_bytes((path / "slots" / "a.img").read_bytes())
    assert Device(path).boot().slot == "A"

    with pytest.raises(PowerCut):
        open_device(path, files, cut_power_at(blob_of(files, "1.1.0"), SIZE // 2))[0].update()
    assert BootEnv.load(path / "bootenv.json").slots["B"] is None, "a torn slot stays recorded"
