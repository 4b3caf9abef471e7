"""The agent measures the booted slot itself on a bootloader that measures nothing
(ADR 0038): once per kernel boot, the slot the command line names, over the recorded
image length, logged unattested in the form the simulated bootloader writes.

The board is the virtual one of test_agent_bootloaders (GRUB's or U-Boot's rules on a
real environment file; a power-on writes the command line and a fresh boot id); the
slots are files here and partitions of a loop device in the last test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from test_agent_bootloaders import board
from test_install_memory import Mem, mem

from otaguard.agent import BootEnv, DeviceConfig
from otaguard.agent.boot import read_booted
from otaguard.agent.checkin import build_manifest
from otaguard.agent.envblock import GrubEnvFile
from otaguard.agent.measured_boot import read_event_log
from otaguard.agent.self_measure import read_boot_id
from otaguard.cli import main
from otaguard.model.errors import ConfigError, OperatorError

__all__ = ["mem"]


def _recorded(path: Path, slot: str) -> str:
    image = BootEnv.load(path / "bootenv.json").slots[slot]
    assert image is not None
    return image.sha256


def test_measured_once_per_boot_id_and_again_after_a_power_on(mem: Mem) -> None:
    path, bl = board(mem, "d", "grub")
    dev = mem.open(path)
    before = len(read_event_log(dev.paths))
    first = dev.measure_boot()
    assert (first.slot, first.fresh, first.matches) == ("A", True, True)
    assert first.sha256 == _recorded(path, "A")
    again = mem.open(path).measure_boot()
    assert (again.fresh, again.boot_id) == (False, first.boot_id), "one measurement per boot"
    events = read_event_log(dev.paths)
    assert len(events) == before + 1
    last = events[-1]
    # Exactly the simulated bootloader's unattested form: no TPM reset epoch.
    assert (last.slot, last.sha256, last.reset_count) == ("A", first.sha256, None)
    dev.boot()  # a power-on: the virtual board writes a new boot id, the boot is measured
    assert read_boot_id(path / "run" / "boot_id") != first.boot_id
    assert len(read_event_log(dev.paths)) == before + 2
    assert bl.booted_slot() == "A"


@pytest.mark.parametrize("kind", ["grub", "uboot", "uboot-mender"])
def test_after_an_update_the_check_in_reports_the_new_slots_published_hash(
    mem: Mem, kind: str
) -> None:
    """What the board hit: without a measurement of this boot the manifest carried the
    factory slot's, and the server quarantined the updated device."""
    path, bl = board(mem, "d", kind)
    mem.release("1.1.0")
    dev = mem.open(path)
    assert dev.update().outcome == "awaiting-mark-good"
    assert bl.booted_slot() == "B"
    assert mem.open(path).mark_good().outcome == "updated"
    booted = read_booted(dev.paths)  # what agent status shows
    assert booted is not None and (booted.slot, booted.trial) == ("B", False), (
        "status no longer says trial once the slot is marked good"
    )
    published = hashlib.sha256(mem.image("1.1.0").read_bytes()).hexdigest()
    stale = build_manifest(dev.paths, dev.config, nonce="n" * 32, tpm=None).boot
    assert stale.slot == "A", "nothing measured this boot yet (its unit has not run)"
    mem.open(path).check()  # any agent command measures a boot that has no measurement
    boot = build_manifest(dev.paths, dev.config, nonce="n" * 32, tpm=None).boot
    assert (boot.slot, boot.sha256, boot.attested) == ("B", published, False)


def test_status_shows_no_trial_once_mark_good_confirmed_the_boot(mem: Mem) -> None:
    """GRUB sets the booted slot's TRY at every boot; once mark-good confirmed it, the
    boot record ``agent status`` shows is no longer a trial."""
    path, _ = board(mem, "d", "grub")
    dev = mem.open(path)
    dev.boot()  # TRY=1 on A until confirmed
    assert dev.status().booted is not None and dev.status().booted.trial  # type: ignore[union-attr]
    assert mem.open(path).mark_good().outcome == "confirmed"
    booted = mem.open(path).status().booted
    assert booted is not None and (booted.slot, booted.trial) == ("A", False)


def test_only_the_booted_slot_is_measured(mem: Mem) -> None:
    path, _ = board(mem, "d", "grub")
    slots = path / "slots"
    (slots / "b.img").write_bytes(b"whatever the other slot holds")
    dev = mem.open(path)
    m = dev.measure_boot()
    assert (m.slot, m.matches) == ("A", True), "the other slot was not read"
    # Slot A changed behind the agent's back (offline): the next boot measures what is
    # there, not what was recorded, and the check-in reports that digest.
    with (slots / "a.img").open("r+b") as f:
        f.write(b"\xff" * 16)
    dev.boot()
    tampered = mem.open(path).measure_boot()
    assert (tampered.slot, tampered.fresh, tampered.matches) == ("A", False, False)
    boot = build_manifest(dev.paths, dev.config, nonce="n" * 32, tpm=None).boot
    assert boot.sha256 == tampered.sha256 != _recorded(path, "A")


def test_the_cli_prints_json_and_exits_1_on_a_slot_that_changed(
    mem: Mem, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = board(mem, "d", "grub")
    assert main(["agent", "--json", str(path), "measure-boot"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["slot"] == "A" and doc["fresh"] and doc["matches"] and doc["attested"] is False
    with (path / "slots" / "a.img").open("r+b") as f:
        f.write(b"\0" * 8)
    (path / "run" / "boot_id").unlink()  # a new boot (the board gets a fresh id)
    assert main(["agent", str(path), "measure-boot"]) == 1
    captured = capsys.readouterr()
    assert "measured slot A (unattested)" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "does not hold what was written to it" in lines[0]


def test_refusals_are_one_line(mem: Mem, capsys: pytest.CaptureFixture[str]) -> None:
    simulated = mem.provision("sim")
    with pytest.raises(OperatorError, match="simulated bootloader measures each boot"):
        mem.open(simulated).measure_boot()
    path, _ = board(mem, "d", "grub")
    (path / "run" / "cmdline").write_text("root=/dev/vda2 quiet\n")
    with pytest.raises(ConfigError, match="names no booted slot"):
        mem.open(path).measure_boot()
    (path / "run" / "cmdline").write_text("root=/dev/vda3 rauc.slot=B\n")
    with pytest.raises(ConfigError, match="booted slot B holds no image the agent recorded"):
        mem.open(path).measure_boot()
    (path / "run" / "cmdline").write_text("root=/dev/vda2 rauc.slot=A\n")
    (path / "run" / "boot_id").write_text("not a boot id\n")
    capsys.readouterr()
    assert main(["agent", str(path), "measure-boot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a UUID" in err[0], err


def test_the_booted_partition_is_measured_on_a_loop_device(mem: Mem, tmp_path: Path) -> None:
    """Slots are GPT partitions named by label: the booted one is read from the medium
    (O_DIRECT), over the image's length only."""
    from loopdev_support import loop_disk

    with loop_disk(tmp_path) as disk:
        path = mem.provision("d")
        cmdline = path / "run" / "cmdline"
        cmdline.write_text(f"root=PARTLABEL={disk.label('A')} rauc.slot=A\n")
        factory = mem.image("1.0.0").read_bytes()
        with open(disk.part(2), "r+b") as f:
            f.write(factory)
        envfile = path / "grubenv"
        GrubEnvFile(envfile).update({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0"})
        cfg = DeviceConfig.load(path / "config.json")
        dataclasses.replace(
            cfg,
            health_command=None,
            health_by_units=True,
            slot_devices={s: f"PARTLABEL={disk.label(s)}" for s in ("A", "B")},
            bootloader={
                "type": "grub",
                "env": str(envfile),
                "cmdline": str(cmdline),
                "virtual": True,
            },
        ).save(path / "config.json")
        for f in (path / "slots").iterdir():  # the factory image is on the partition
            f.unlink()
        m = mem.open(path).measure_boot()
        assert (m.slot, m.sha256) == ("A", hashlib.sha256(factory).hexdigest())
        mem.release("1.1.0")
        dev = mem.open(path)
        assert dev.update().outcome == "awaiting-mark-good"
        assert mem.open(path).mark_good().outcome == "updated"
        image = mem.image("1.1.0").read_bytes()
        m = mem.open(path).measure_boot()
        assert (m.slot, m.fresh, m.sha256) == ("B", True, hashlib.sha256(image).hexdigest())
        with open(disk.part(3), "r+b") as f:  # rewritten offline
            f.write(b"\x5a" * 512)
        dev.boot()
        assert mem.open(path).measure_boot().matches is False
