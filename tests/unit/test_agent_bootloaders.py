"""The real agent on a virtual board: GRUB's and U-Boot's boot-script rules run against a
real environment file, health checked by "units", committed by ``mark-good``.

The repository is in memory (as in test_install_memory); the install machine, its
driver, the bootloader backends and the environment formats are the real code. A reboot
runs the boot script (:mod:`otaguard.agent.vboot`), which writes the kernel command line
the agent reads back. What is asserted is what a device integrator relies on: the floor
rises only at mark-good; a slot whose boot was never confirmed is skipped by the
bootloader and the agent then marks it bad, reports the rollback and never selects that
image again (until ``clear-rejected``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from test_install_memory import Mem, mem

from otaguard.agent import Device, DeviceConfig, InstallState, Phase
from otaguard.agent.bootloader import GrubRauc, SlotState, UBootMender, UBootRauc
from otaguard.agent.envblock import GrubEnvFile, UBootEnv, UBootEnvCopy
from otaguard.model import Version
from otaguard.model.errors import OperatorError

__all__ = ["mem"]

ENV_SIZE = 0x2000


def board(mem: Mem, name: str, kind: str) -> tuple[Path, Any]:
    """A provisioned device whose config names a virtual GRUB or U-Boot board, booted A."""
    path = mem.provision(name)
    cmdline = path / "run" / "cmdline"
    cmdline.write_text("root=/dev/vda2 rauc.slot=A\n")
    if kind == "grub":
        envfile = path / "grubenv"
        GrubEnvFile(envfile).update({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0"})
        spec: dict[str, Any] = {"type": "grub", "env": str(envfile)}
        backend: Any = GrubRauc(GrubEnvFile(envfile), cmdline=cmdline)
    else:
        envfile = path / "uboot.env"
        envfile.write_bytes(b"\0" * 2 * ENV_SIZE)
        copies = [[str(envfile), 0, ENV_SIZE], [str(envfile), ENV_SIZE, ENV_SIZE]]
        env = UBootEnv([UBootEnvCopy(Path(p), o, s) for p, o, s in copies])
        if kind == "uboot":
            env.update({"BOOT_ORDER": "A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"})
            spec = {"type": "uboot", "env": copies, "attempts": 2}
            backend = UBootRauc(env, attempts=2, cmdline=cmdline)
        else:  # Mender's U-Boot integration: rootfs A is partition 2, B is 3
            env.update({"mender_boot_part": "2", "upgrade_available": "0", "bootcount": "0"})
            spec = {"type": "uboot-mender", "env": copies, "parts": {"A": 2, "B": 3}}
            backend = UBootMender(env, parts={"A": 2, "B": 3}, cmdline=cmdline)
    cfg = DeviceConfig.load(path / "config.json")
    dataclasses.replace(
        cfg,
        health_command=None,
        health_by_units=True,
        bootloader={**spec, "cmdline": str(cmdline), "virtual": True},
    ).save(path / "config.json")
    return path, backend


@pytest.mark.parametrize("kind", ["grub", "uboot", "uboot-mender"])
def test_update_waits_for_mark_good_then_commits_and_raises_the_floor(mem: Mem, kind: str) -> None:
    path, bl = board(mem, "d", kind)
    mem.release("1.1.0", security=True)
    dev = mem.open(path)
    res = dev.update()
    assert (res.outcome, res.to_version) == ("awaiting-mark-good", "1.1.0")
    assert bl.booted_slot() == "B", "the virtual board booted the new slot"
    assert dev.monotonic.read().version == Version.parse("1.0.0"), "floor not raised yet"
    assert InstallState.load(dev.paths.install_state).phase is Phase.ARMED
    done = dev.mark_good()
    assert (done.outcome, done.slot) == ("updated", "B")
    assert dev.monotonic.read().version == Version.parse("1.1.0"), "raised at mark-good"
    assert bl.state("B") is SlotState.GOOD
    assert bl.primary() == "B"
    # Every later boot is confirmed too (GRUB sets TRY at each boot).
    dev.boot()
    assert mem.open(path).mark_good().outcome == "confirmed"
    assert bl.primary() == "B"


@pytest.mark.parametrize("kind", ["grub", "uboot", "uboot-mender"])
def test_an_unconfirmed_slot_falls_back_is_marked_bad_and_reported(mem: Mem, kind: str) -> None:
    path, bl = board(mem, "d", kind)
    mem.release("1.1.0", unhealthy=True)
    dev = mem.open(path)
    assert dev.update().outcome == "awaiting-mark-good"
    assert bl.booted_slot() == "B"
    # The health units fail: boot-complete.target is never reached, mark-good never
    # runs; the device reboots (FailureAction=reboot) until the bootloader gives up.
    for _ in range(3):
        dev.boot()
        if bl.booted_slot() == "A":
            break
    assert bl.booted_slot() == "A", "the bootloader fell back to the old slot"
    done = mem.open(path).mark_good()  # the old slot's own mark-good.service
    assert (done.outcome, done.slot) == ("rolled-back", "A")
    # marked bad explicitly (Mender records no state for the partition it does not boot)
    assert bl.state("B") in (SlotState.BAD, SlotState.INACTIVE)
    assert bl.primary() == "A"
    assert bl.state("A") is SlotState.GOOD
    assert dev.monotonic.read().version == Version.parse("1.0.0"), "floor untouched"
    state = InstallState.load(dev.paths.install_state)
    assert state.last_result is not None
    assert state.last_result["outcome"] == "rolled-back"  # what the next check-in reports
    assert len(state.rejected) == 1
    # Never selected again, until the operator clears it.
    again = mem.open(path).update()
    assert again.outcome == "up-to-date"
    assert [why for _, why in again.refused] == ["rolled back on this device before"]
    assert mem.open(path).clear_rejected() == state.rejected
    assert InstallState.load(dev.paths.install_state).rejected == []
    assert mem.open(path).update().outcome == "awaiting-mark-good", "selected again"


def test_mark_good_on_the_simulated_bootloader_is_an_operator_error(mem: Mem) -> None:
    dev = mem.open(mem.provision("d"))
    with pytest.raises(OperatorError, match="mark-good confirms a slot to a real bootloader"):
        dev.mark_good()


def test_bootloader_config_errors_name_the_key(mem: Mem) -> None:
    path = mem.provision("d")
    raw = json.loads((path / "config.json").read_text())
    for bad, key in (
        ({"type": "lilo"}, "bootloader.type"),
        ({"type": "grub", "env": "relative/grubenv"}, "bootloader.env"),
        ({"type": "uboot", "env": [["/dev/x", 0, 8]]}, "bootloader.env"),
        (
            {"type": "uboot-mender", "env": [["/dev/x", 0, 8192]], "parts": {"A": 2}},
            "bootloader.parts",
        ),
        (
            {"type": "grub", "env": "/g", "reboot_command": "systemctl reboot"},
            "bootloader.reboot_command",
        ),
    ):
        (path / "config.json").write_text(json.dumps({**raw, "bootloader": bad}))
        with pytest.raises(Exception, match=key.replace(".", r"\.")):
            Device(path)


def test_cli_mark_good_and_clear_rejected(mem: Mem, capsys: pytest.CaptureFixture[str]) -> None:
    from otaguard.cli import main

    sim = mem.provision("sim")
    assert main(["agent", str(sim), "mark-good"]) == 2
    err = capsys.readouterr().err
    assert "mark-good confirms a slot to a real bootloader" in err
    assert "Traceback" not in err
    path, bl = board(mem, "d", "grub")
    assert main(["agent", str(path), "mark-good"]) == 0
    assert "confirmed: slot A running 1.0.0 marked good" in capsys.readouterr().out
    assert bl.state("A") is SlotState.GOOD
    assert main(["agent", str(path), "clear-rejected"]) == 0
    assert "0 rolled-back image(s) may be selected again" in capsys.readouterr().out


def test_cli_health_command_is_an_argv_unless_a_shell_is_asked_for(mem: Mem) -> None:
    from otaguard.cli import main

    base = [
        "device", "init", "--serial", "s1", "--server", "https://repo.invalid",
        "--root", str(mem.repo.metadata_dir / "root.json"), "--ca", str(mem.ca),
        "--hardware-id", "sim-hw", "--factory-image", str(mem.image("1.0.0")),
        "--factory-version", "1.0.0",
    ]  # fmt: skip
    assert main([*base[:2], str(mem.tmp / "argv"), *base[2:], "--health-command",
                 "check --name 'a b' $HOME"]) == 0  # fmt: skip
    cfg = DeviceConfig.load(mem.tmp / "argv" / "config.json")
    assert cfg.health_command == ["check", "--name", "a b", "$HOME"], "no shell expansion"
    assert main([*base[:2], str(mem.tmp / "sh"), *base[2:], "--health-shell",
                 "pidof app && test -e /run/ok"]) == 0  # fmt: skip
    cfg = DeviceConfig.load(mem.tmp / "sh" / "config.json")
    assert cfg.health_command == ["/bin/sh", "-c", "pidof app && test -e /run/ok"]
    assert main([*base[:2], str(mem.tmp / "bad"), *base[2:], "--health-command", "x 'y"]) == 2


def test_the_agent_installs_into_a_partition_and_boots_it_via_a_raw_uboot_env(
    mem: Mem, tmp_path: Path
) -> None:
    """Everything on a loop device: slots named by GPT label, the redundant U-Boot
    environment on its own partition, the streamed image read back from the medium."""
    from loopdev_support import loop_disk

    with loop_disk(tmp_path) as disk:
        path = mem.provision("d")
        cmdline = path / "run" / "cmdline"
        cmdline.write_text(f"root=PARTLABEL={disk.label('A')} rauc.slot=A\n")
        factory = mem.image("1.0.0").read_bytes()
        with open(disk.part(2), "r+b") as f:  # the factory flashed slot A
            f.write(factory)
        part = str(disk.part(1))
        copies = [[part, 0, ENV_SIZE], [part, ENV_SIZE, ENV_SIZE]]
        cfg = DeviceConfig.load(path / "config.json")
        dataclasses.replace(
            cfg,
            health_command=None,
            health_by_units=True,
            slot_devices={s: f"PARTLABEL={disk.label(s)}" for s in ("A", "B")},
            bootloader={"type": "uboot", "env": copies, "cmdline": str(cmdline), "virtual": True},
        ).save(path / "config.json")
        mem.release("1.1.0")
        dev = mem.open(path)
        assert dev.update().outcome == "awaiting-mark-good"
        assert dev.mark_good().outcome == "updated"
        image = mem.image("1.1.0").read_bytes()
        with open(disk.part(3), "rb") as f:
            assert f.read(len(image)) == image, "slot B holds the image"
        with open(disk.part(2), "rb") as f:
            assert f.read(len(factory)) == factory, "the running slot A was not touched"
        env = UBootEnv([UBootEnvCopy(Path(p), o, s) for p, o, s in copies])
        assert env.read()["BOOT_ORDER"] == "B A"
        assert UBootRauc(env).state("B") is SlotState.GOOD


def test_agent_toml_names_the_bootloader_and_health_by_units(
    mem: Mem, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator's agent.toml carries the device integration (README "Device
    integration"): the same device directory runs the simulated bootloader without it and
    the GRUB board it names with it; a bad table is one line naming the key."""
    from otaguard.cli import main

    path = mem.provision("t")
    (path / "run" / "cmdline").write_text("root=/dev/vda2 rauc.slot=A\n")
    envfile = path / "grubenv"
    GrubEnvFile(envfile).update({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0"})
    toml = tmp_path / "agent.toml"
    toml.write_text(
        "health_by_units = true\n"
        "[bootloader]\n"
        f'type = "grub"\nenv = "{envfile}"\ncmdline = "{path / "run" / "cmdline"}"\n'
        "virtual = true\n"
    )
    assert main(["agent", str(path), "mark-good"]) == 2  # simulated: not for mark-good
    capsys.readouterr()
    assert main(["agent", str(path), "mark-good", "--config", str(toml)]) == 0
    assert "A" in capsys.readouterr().out  # the running slot A confirmed to GRUB
    assert GrubRauc(GrubEnvFile(envfile), cmdline=path / "run" / "cmdline").state("A") is (
        SlotState.GOOD
    )
    toml.write_text('bootloader = "grub"\n')
    assert main(["agent", str(path), "mark-good", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bootloader must be a table" in err[0], err
