"""The GPT reader against tables sfdisk writes (on plain files: no root needed), and
damaged tables refused by name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from loopdev_support import layout, require_tools
from otaguard.agent.gpt import MAX_GPT_ENTRIES, GptError, read_gpt

SIZE = 16 * 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    require_tools("sfdisk")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["sfdisk", "-q", str(img)], input=layout("t"), text=True, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    return img


def test_entries_match_what_sfdisk_reports(disk: Path) -> None:
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]["partitions"]
    entries, sector = read_gpt(disk)
    assert sector == 512
    assert [(e.name, e.partuuid.upper(), e.first_lba) for e in entries] == [
        (p["name"], p["uuid"], p["start"]) for p in table
    ]


def _flip(disk: Path, offset: int) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_damaged_header_is_refused(disk: Path) -> None:
    _flip(disk, 512 + 40)  # first usable LBA, covered by the header CRC
    with pytest.raises(GptError, match="GPT header CRC mismatch"):
        read_gpt(disk)


def test_a_damaged_entry_is_refused(disk: Path) -> None:
    _flip(disk, 1024 + 56)  # first byte of entry 1's name
    with pytest.raises(GptError, match="GPT entry array CRC mismatch"):
        read_gpt(disk)


def test_an_oversized_entry_count_is_refused_before_reading_it(disk: Path) -> None:
    with open(disk, "r+b") as f:
        f.seek(512 + 80)
        f.write((MAX_GPT_ENTRIES + 1).to_bytes(4, "little"))
    with pytest.raises(GptError, match=f"entry array of {MAX_GPT_ENTRIES + 1} x 128 bytes"):
        read_gpt(disk)


def test_no_gpt(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * 8192)
    with pytest.raises(GptError, match="no GPT signature"):
        read_gpt(blank)
