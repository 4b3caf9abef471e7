"""A device whose bootloader measures nothing, against a real server (ADR 0038): the
agent's own measurement of the booted slot is what the check-in reports, so an updated
device stays active and a slot changed offline is quarantined.

The bootloader is the virtual GRUB board (RAUC's rules on a real grubenv; a power-on
writes the kernel command line and a fresh boot id); slots are files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import World
from otaguard.agent import Device, DeviceConfig
from otaguard.agent.envblock import GrubEnvFile
from otaguard.model.errors import AccessDeniedError
from otaguard.server.client import CheckinInfo, FleetClient


def grub_device(world: World, name: str, **kw: object) -> Device:
    """A device enrolled with the server, its boot selection moved to a virtual GRUB."""
    dev = world.device(name, **kw)
    path = dev.paths.root
    cmdline = path / "run" / "cmdline"
    cmdline.write_text("root=/dev/vda2 rauc.slot=A\n")
    envfile = path / "grubenv"
    GrubEnvFile(envfile).update({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0"})
    cfg = DeviceConfig.load(path / "config.json")
    dataclasses.replace(
        cfg,
        health_command=None,
        health_by_units=True,
        bootloader={"type": "grub", "env": str(envfile), "cmdline": str(cmdline), "virtual": True},
    ).save(path / "config.json")
    return Device(path)


def shown(world: World, serial: str) -> tuple[str, str, CheckinInfo]:
    """The device's status and reason, and its last check-in."""
    with FleetClient(
        server_url=world.server.base_url,
        ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    ) as client:
        device = client.show(serial)
        last = client.checkins(serial).checkins[0]
    return device.status, device.reason, last


def test_an_updated_device_reports_its_new_slots_measurement_and_stays_active(
    world: World,
) -> None:
    dev = grub_device(world, "grub-updated")
    dev.checkin()
    world.release("1.1.0")
    assert dev.update().outcome == "awaiting-mark-good"  # rebooted into B
    assert Device(dev.paths.root).mark_good().outcome == "updated"
    Device(dev.paths.root).checkin()  # measures this boot first: slot B
    status, reason, last = shown(world, dev.config.serial)
    assert status == "enrolled", reason
    assert (last.running_version, last.attested, last.outcome) == ("1.1.0", False, "accepted")
    assert last.boot_sha256 == world.releases["1.1.0"].sha256


def test_a_booted_slot_changed_offline_is_quarantined(world: World, tmp_path: Path) -> None:
    dev = grub_device(world, "grub-tampered")
    dev.checkin()
    with (dev.paths.slots / "a.img").open("r+b") as f:  # rewritten while powered off
        f.write(b"\xa5" * 4096)
    dev.boot()  # the next power-on: a new boot id, measured again
    with pytest.raises(AccessDeniedError, match=r"quarantined at check-in.*booted an image"):
        Device(dev.paths.root).checkin()
    status, reason, _ = shown(world, dev.config.serial)
    assert status == "quarantined" and reason.startswith("measured boot: booted"), reason


def test_a_tpm_device_on_a_real_bootloader_checks_in_unattested(
    world: World, tmp_path: Path
) -> None:
    """Its TPM keeps the floor, but nothing extended the boot PCR: no attestation key is
    registered and no quote sent (a quote over an unextended PCR would be refused, and a
    self-measurement extended by the agent would pass a self-report off as attested)."""
    from tpm_support import running_swtpm

    with running_swtpm(tmp_path / "tpmstate") as swtpm:
        dev = grub_device(world, "grub-tpm", tpm_tcti=swtpm.tcti, unsafe_file_device_key=True)
        result = dev.checkin()
        assert not result.attested
        with FleetClient(
            server_url=world.server.base_url,
            ca_cert=world.server.ca_cert,
            token=world.server.operator_token,
        ) as client:
            history = client.checkins("grub-tpm")
        assert not history.attestation_key
        assert (history.checkins[0].outcome, history.checkins[0].attested) == ("accepted", False)
