"""The file slot's streaming writer: direct (O_DIRECT) and cached writes give the same
slot, whatever the chunk sizes and wherever a resume starts; nothing past the image."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from otaguard.agent import FileSlots
from otaguard.agent.slots import DIRECT_ALIGN
from otaguard.model import DeviceStorageError

SIZE = 3 * 1024 * 1024 + 123


@pytest.mark.parametrize("direct", [True, False])
def test_any_chunks_and_resume_points_give_the_image(tmp_path: Path, direct: bool) -> None:
    rng = random.Random(5)
    image = rng.randbytes(SIZE)
    slots = FileSlots(tmp_path, direct=direct)
    # a first run stopped at an unaligned offset, a second one resumed there
    stop = 5 * DIRECT_ALIGN + 77
    for start, end in ((0, stop), (stop, SIZE)):
        w = slots.open_writer("B", offset=start, length=SIZE)
        pos = start
        while pos < end:
            n = min(rng.choice([1, 100, DIRECT_ALIGN, 65536, 1 << 20, 1_500_000]), end - pos)
            w.write(image[pos : pos + n])
            pos += n
            # what was written is in the file at once (a checkpoint's fsync covers it)
            assert slots.path("B").read_bytes()[:pos] == image[:pos]
        w.sync()
        w.close()
    assert slots.path("B").read_bytes() == image


def test_a_write_past_the_image_is_refused(tmp_path: Path) -> None:
    w = FileSlots(tmp_path).open_writer("B", offset=0, length=10)
    w.write(b"x" * 8)
    with pytest.raises(DeviceStorageError, match="past the image's 10 bytes"):
        w.write(b"x" * 3)
    w.close()
    assert FileSlots(tmp_path).path("B").read_bytes() == b"x" * 8
