"""The environment blocks and bootloader backends, cross-checked with the Debian tools.

``fw_printenv``/``fw_setenv`` (libubootenv-tool) and ``grub-editenv`` (grub-common) read
what otaguard writes and otaguard reads what they write, on plain files here and on a
loop-device partition below; a power cut in the middle of writing a redundant U-Boot
copy leaves the older copy current for both.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopdev_support import LoopDisk, loop_disk, require_tools
from otaguard.agent.bootloader import GrubRauc, SlotState, UBootMender, UBootRauc
from otaguard.agent.envblock import (
    GrubEnvFile,
    UBootEnv,
    UBootEnvCopy,
    decode_grubenv,
    encode_uboot,
)
from otaguard.agent.vboot import VirtualBoard, boot_grub_rauc
from otaguard.model.errors import DeviceStorageError

ENV_SIZE = 0x4000


def _tool(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, check=True, timeout=30
    ).stdout


def printenv(conf: Path) -> dict[str, str]:
    out = _tool("fw_printenv", "-c", str(conf))
    return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)


@pytest.fixture
def uboot(tmp_path: Path) -> tuple[UBootEnv, Path]:
    require_tools("fw_printenv", "fw_setenv")
    f = tmp_path / "uboot.env"
    f.write_bytes(b"\0" * 2 * ENV_SIZE)
    env = UBootEnv([UBootEnvCopy(f, 0, ENV_SIZE), UBootEnvCopy(f, ENV_SIZE, ENV_SIZE)])
    conf = tmp_path / "fw_env.config"
    conf.write_text(env.fw_env_config())
    return env, conf


def test_uboot_env_round_trips_with_libubootenv(uboot: tuple[UBootEnv, Path]) -> None:
    env, conf = uboot
    env.update({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"})
    assert printenv(conf) == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    # fw_setenv's batch (Mender's ArtifactInstall format) is read back by us...
    _tool("fw_setenv", "-c", str(conf), "-s", "-", stdin="BOOT_ORDER=B A\nbootcount=0\n")
    assert env.read()["BOOT_ORDER"] == "B A"
    assert env.read()["bootcount"] == "0"
    # ...and our next write lands in the other copy, newer than fw_setenv's.
    UBootRauc(env).mark_bad("A")
    assert printenv(conf)["BOOT_ORDER"] == "B"
    assert printenv(conf)["BOOT_A_LEFT"] == "0"


def test_rauc_uboot_transitions_match_rauc(uboot: tuple[UBootEnv, Path]) -> None:
    """The sequence measured with RAUC itself (notes: install, mark good, mark bad)."""
    env, conf = uboot
    bl = UBootRauc(env)
    env.update({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"})
    bl.set_primary("B")
    assert printenv(conf)["BOOT_ORDER"] == "B A"
    bl.mark_good("B")
    assert printenv(conf)["BOOT_B_LEFT"] == "3"
    bl.mark_bad("A")
    assert (printenv(conf)["BOOT_ORDER"], printenv(conf)["BOOT_A_LEFT"]) == ("B", "0")
    assert (bl.state("A"), bl.state("B"), bl.primary()) == (SlotState.BAD, SlotState.GOOD, "B")
    # hex, as RAUC writes it: 16 attempts is "10", and fw_setenv's "a" is ten
    UBootRauc(env, attempts=16).mark_good("A")
    assert printenv(conf)["BOOT_A_LEFT"] == "10"


def test_mender_profile_writes_menders_variables(uboot: tuple[UBootEnv, Path]) -> None:
    env, conf = uboot
    bl = UBootMender(env, parts={"A": 2, "B": 3})
    bl.set_primary("B")
    got = printenv(conf)
    assert (got["mender_boot_part"], got["mender_boot_part_hex"]) == ("3", "3")
    assert (got["upgrade_available"], got["bootcount"]) == ("1", "0")
    assert bl.state("B") is SlotState.TRYING
    bl.mark_good("B")
    assert printenv(conf)["upgrade_available"] == "0"
    assert bl.state("B") is SlotState.GOOD


def test_a_power_cut_inside_the_newer_copy_recovers_the_older(
    uboot: tuple[UBootEnv, Path],
) -> None:
    """The write of the new copy is cut after its first sector (the device stored the new
    header and the start of the data, the rest is the old copy's): libubootenv and
    otaguard both still read the previous environment, and the next write goes over the
    torn copy again, leaving the good one alone."""
    env, conf = uboot
    long_a, long_b, long_c = "a" * 3000, "b" * 3000, "c" * 3000  # data spans sectors
    env.update({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "bootargs": long_a})  # copy 0
    env.update({"BOOT_ORDER": "B A", "bootargs": long_b})  # copy 1, flags 1: current
    assert printenv(conf)["BOOT_ORDER"] == "B A"
    # The next update writes copy 0, flags one above copy 1's: only its first sector arrives.
    f = env.copies[0].path
    flags = f.read_bytes()[ENV_SIZE + 4] + 1
    changed = {**env.read(), "BOOT_ORDER": "A", "bootargs": long_c}
    torn = encode_uboot(changed, size=ENV_SIZE, flags=flags)
    with open(f, "r+b") as fh:
        fh.write(torn[:512])
    assert printenv(conf)["BOOT_ORDER"] == "B A", "fw_printenv fell back to the older copy"
    assert env.read()["BOOT_ORDER"] == "B A", "so does otaguard"
    assert env.read()["bootargs"] == long_b
    good = f.read_bytes()[ENV_SIZE:]
    env.update({"BOOT_B_LEFT": "2"})
    assert f.read_bytes()[ENV_SIZE:] == good, "the good copy was not overwritten"
    assert printenv(conf) == {
        "BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "2", "bootargs": long_b
    }  # fmt: skip


def test_a_single_copy_environment_round_trips(tmp_path: Path) -> None:
    require_tools("fw_printenv", "fw_setenv", "mkenvimage")
    src = tmp_path / "env.txt"
    src.write_text("BOOT_ORDER=A B\nBOOT_A_LEFT=3\n")
    img = tmp_path / "uboot.env"
    _tool("mkenvimage", "-s", str(ENV_SIZE), "-o", str(img), str(src))  # image-build time
    env = UBootEnv([UBootEnvCopy(img, 0, ENV_SIZE)])
    assert env.read() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3"}
    env.update({"BOOT_B_LEFT": "1"})
    conf = tmp_path / "fw_env.config"
    conf.write_text(env.fw_env_config())
    assert printenv(conf) == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "1"}


@pytest.fixture
def grubenv(tmp_path: Path) -> Path:
    require_tools("grub-editenv")
    path = tmp_path / "grubenv"
    _tool("grub-editenv", str(path), "create")
    return path


def grub_list(path: Path) -> dict[str, str]:
    out = _tool("grub-editenv", str(path), "list")
    return dict(line.partition("=")[::2] for line in out.splitlines())


def test_grubenv_round_trips_with_grub_editenv(grubenv: Path) -> None:
    _tool("grub-editenv", str(grubenv), "set", "ORDER=A B", "A_OK=1", "A_TRY=0", "odd=a\\b")
    env = GrubEnvFile(grubenv)
    assert env.read() == {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "odd": "a\\b"}
    bl = GrubRauc(env)
    bl.set_primary("B")
    assert grub_list(grubenv) == {
        "ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0", "odd": "a\\b"
    }  # fmt: skip
    assert grubenv.stat().st_size == 1024
    bl.mark_bad("B")
    assert (grub_list(grubenv)["B_OK"], grub_list(grubenv)["ORDER"]) == ("0", "A B")


def test_grubenv_write_is_a_rename_never_an_empty_file(grubenv: Path) -> None:
    """grub-editenv truncates and rewrites in place; otaguard replaces the file, so the
    inode a reader holds keeps the complete old block until the new one is complete."""
    env = GrubEnvFile(grubenv)
    env.update({"ORDER": "A B", "A_OK": "1"})
    with open(grubenv, "rb") as old:
        env.update({"ORDER": "B A"})
        assert decode_grubenv(old.read())["ORDER"] == "A B"
    assert grub_list(grubenv)["ORDER"] == "B A"


def test_grub_rollback_on_the_virtual_board(grubenv: Path, tmp_path: Path) -> None:
    """RAUC's grub.conf rules against the file grub-editenv reads: a slot whose boot was
    never confirmed is skipped at the next power-on; the agent then marks it bad."""
    env = GrubEnvFile(grubenv)
    cmdline = tmp_path / "cmdline"
    bl = GrubRauc(env, cmdline=cmdline)
    board = VirtualBoard(lambda: boot_grub_rauc(env), cmdline)
    env.update({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"})
    assert board.power_on() == "A"
    bl.mark_good("A")
    bl.set_primary("B")  # an install into B
    assert board.power_on() == "B"
    assert (bl.booted_slot(), bl.state("B")) == ("B", SlotState.TRYING)
    # B's health check fails: nobody marks it good; the next power-on falls back to A.
    assert board.power_on() == "A"
    assert bl.booted_slot() == "A"
    bl.mark_good("A")  # the old slot's own mark-good service
    bl.mark_bad("B")  # explicit, as the agent does after a rollback
    assert grub_list(grubenv)["B_OK"] == "0"
    assert grub_list(grubenv)["ORDER"] == "A B"
    assert board.power_on() == "A"


# -- on a loop-device partition (root) -----------------------------------------------------
@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    with loop_disk(tmp_path) as d:
        yield d


def test_redundant_env_on_a_raw_partition(disk: LoopDisk, tmp_path: Path) -> None:
    require_tools("fw_printenv", "fw_setenv")
    part = disk.part(1)  # "ubootenv", 1 MiB
    env = UBootEnv([UBootEnvCopy(part, 0, ENV_SIZE), UBootEnvCopy(part, ENV_SIZE, ENV_SIZE)])
    conf = tmp_path / "fw_env.config"
    conf.write_text(env.fw_env_config())
    bl = UBootRauc(env)
    bl.set_primary("B")
    assert printenv(conf) == {"BOOT_ORDER": "B A", "BOOT_B_LEFT": "3"}
    _tool("fw_setenv", "-c", str(conf), "BOOT_A_LEFT", "1")
    bl.mark_bad("A")
    assert printenv(conf) == {"BOOT_ORDER": "B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "3"}


def test_an_unreadable_environment_is_a_storage_error(tmp_path: Path) -> None:
    env = UBootEnv([UBootEnvCopy(tmp_path / "missing", 0, ENV_SIZE)])
    with pytest.raises(DeviceStorageError, match="cannot read the U-Boot environment"):
        env.read()
    bad = tmp_path / "grubenv"
    bad.write_bytes(b"not an environment")
    with pytest.raises(DeviceStorageError, match="not a GRUB environment block"):
        GrubEnvFile(bad).read()
