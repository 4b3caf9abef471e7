"""The virtual board (ADR 0033): Debian in QEMU, GRUB EFI picking the A/B slot, otaguard's
agent updating it from a real server on the host.

Opt-in (``make vboard-test``; marker ``vboard``, deselected from the default run): it needs
root, ``make vboard`` and about 100 s per boot on this machine's emulated CPU (an install
about 250 s more). The
board reaches the host at 10.0.2.2 (QEMU user networking); the server listens on loopback
with a certificate that also names 10.0.2.2.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from board import DEVICE_DIR, STATUS_SCRIPT, Board, Boot, require_board, status_json

from otaguard.sim.sbom import make_sbom

pytestmark = [pytest.mark.vboard, pytest.mark.timeout(3600)]

HW = "vboard-x86"
SERIAL = "vboard-1"
CLI = [sys.executable, "-m", "otaguard"]
AGENT = f"otaguard agent {DEVICE_DIR}"
#: a boot that also downloads, decompresses, writes and reads back a 549 MiB slot on the
#: emulated CPU
INSTALL_TIMEOUT_S = 1200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class World:
    """The server, the offline repository and the board provisioned for them."""

    tmp: Path
    data: Path
    repo: Path
    url: str
    env: dict[str, str]
    board: Board

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], env=self.env, capture_output=True, text=True, timeout=600,
            check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, f"otaguard {' '.join(args)}: {r.stderr}"
        return r.stdout

    def release(self, version: str) -> None:
        """Sign and publish a board version, uncompressed: zstd at the published level (19)
        took over 7 minutes for one 549 MiB image on this loaded machine."""
        image = self.board.image(version)
        sbom = self.tmp / f"{version}.cdx.json"
        make_sbom(sbom, name="vboard-rootfs", version=version.removesuffix("-fail"))
        t0 = time.monotonic()
        self.ok(
            "release", "add", str(self.repo), str(image), "--version",
            version.removesuffix("-fail"), "--hardware-id", HW, "--sbom", str(sbom),
            "--keys-dir", str(self.tmp / "keys"),
        )  # fmt: skip
        print(f"vboard: release {version} signed in {time.monotonic() - t0:.1f} s")

    def fleet_show(self) -> dict[str, object]:
        out = self.ok(
            "fleet", "show", SERIAL, "--server", self.url, "--ca", str(self.data / "ca" / "ca.pem"),
            "--token-file", str(self.data / "operator-token"), "--json",
        )  # fmt: skip
        shown: dict[str, object] = json.loads(out)
        return shown


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_board()
    tmp = tmp_path_factory.mktemp("vboard")
    board = Board(tmp)
    env = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(tmp),
        "OTAGUARD_KEY_PASSPHRASE": "vboard test passphrase",
    }
    port = _free_port()
    data, repo = tmp / "server", tmp / "repo"
    w = World(tmp, data, repo, f"https://127.0.0.1:{port}", env, board)
    w.ok("server", "init", "--data", str(data))
    w.ok(
        "repo", "init", str(repo), "--keys-dir", str(tmp / "keys"),
        "--online-key", str(data / "online-key.pub.json"),
    )  # fmt: skip
    with (tmp / "server.log").open("wb") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [
                *CLI, "server", "--data", str(data), "--repo", str(repo), "--port", str(port),
                "--tls-name", "10.0.2.2", "--timestamp-expiry", "1h", "--snapshot-expiry", "1h",
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # The factory image is a release too: a device running an image the repository
        # does not list is quarantined at its first check-in.
        w.release("1.0.0")
        _provision(w)
        yield w
    finally:
        server.terminate()
        server.wait(timeout=30)
        for b in board.boots:
            print(f"vboard boot {b.n}: {b.wall_s:.1f} s wall, {b.cpu_s:.1f} CPU-s")


def _provision(w: World) -> None:
    """The factory: device directory, enrollment on the host, then the board's settings
    (GRUB on the ESP, slots by PARTLABEL, health by units) and onto the data partition."""
    dev = w.tmp / "device"
    ca = w.data / "ca" / "ca.pem"
    w.ok(
        "device", "init", str(dev), "--serial", SERIAL, "--server", w.url,
        "--root", str(w.repo / "metadata" / "root.json"), "--ca", str(ca),
        "--hardware-id", HW, "--factory-image", str(w.board.image("1.0.0")),
        "--factory-version", "1.0.0", "--unsafe-no-health-check",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:  # the server may still be starting
        added = w.run(
            "fleet", "add-device", "--serial", SERIAL, "--hardware-id", HW,
            "--server", w.url, "--ca", str(ca), "--token-file", str(w.data / "operator-token"),
        )  # fmt: skip
        if added.returncode == 0:
            break
        assert time.monotonic() < deadline, added.stderr
        time.sleep(0.5)
    token = added.stdout.strip().splitlines()[-1].split()[0]
    w.env["OTAGUARD_ENROLL_TOKEN"] = token
    try:
        w.ok("device", "enroll", str(dev))
    finally:
        del w.env["OTAGUARD_ENROLL_TOKEN"]
    config = json.loads((dev / "config.json").read_text())
    config.pop("unsafe_no_health_check", None)
    config.update(
        server_url=w.url.replace("127.0.0.1", "10.0.2.2"),
        health_by_units=True,
        bootloader={"type": "grub", "env": "/boot/efi/grubenv"},
        slot_devices={"A": "PARTLABEL=rootfs_a", "B": "PARTLABEL=rootfs_b"},
    )
    (dev / "config.json").write_text(json.dumps(config, indent=2))
    for f in (dev / "slots").iterdir():  # the factory image is on rootfs_a already
        f.unlink()
    w.board.write_data_partition(dev)


def _status_of(boot: Boot) -> dict[str, object]:
    status = status_json(boot.ctl_output())
    print(json.dumps(status, indent=1)[:3000])
    return status


def test_update_commits_on_mark_good_and_a_failing_release_rolls_back(world: World) -> None:
    """Four power-ons (each about 100 s on this machine's emulated CPU, an install about
    250 s more): the factory slot A updates to 2.0.0 (slot B), which mark-good commits and
    whose check-in carries the agent's measurement of B (ADR 0038); the same boot installs
    3.0.0, whose health check fails: the board reboots, GRUB skips the unconfirmed slot A
    and boots B, the agent marks A bad and reports the rollback to the server."""
    w, board = world, world.board
    w.release("2.0.0")
    # 1. Factory slot A: it boots to userspace, is measured and confirmed, and updates.
    boot = board.power_on(f"{STATUS_SCRIPT}{AGENT} update\n", timeout_s=INSTALL_TIMEOUT_S)
    grub = boot.markers("OTAG-GRUB:")
    assert grub[:2] == ["ORDER=A B A_OK=1 A_TRY=0 B_OK=0 B_TRY=0", "boot A"], boot.tail()
    booted = boot.booted()
    assert (booted["slot"], booted["version"]) == ("A", "1.0.0"), boot.tail()
    assert (booted["measure"], booted["mark-good"]) == ("active", "active"), booted
    assert "1.0.0" in json.dumps(_status_of(boot))
    print(boot.ctl_output()[-3000:])  # the reboot cuts the update's output short

    # 2. Slot B (2.0.0), tried and confirmed; its check-in is accepted with the
    # measurement of B. Then it installs 3.0.0 into A, whose health check will fail.
    w.release("3.0.0-fail")
    boot = board.power_on(
        f"{AGENT} check\n{STATUS_SCRIPT}{AGENT} update\n", timeout_s=INSTALL_TIMEOUT_S
    )
    grub = boot.markers("OTAG-GRUB:")
    assert "B_OK=1 B_TRY=0" in grub[0] and grub[1] == "boot B", boot.tail()
    booted = boot.booted()
    assert (booted["slot"], booted["version"]) == ("B", "2.0.0"), boot.tail()
    assert (booted["measure"], booted["mark-good"]) == ("active", "active"), booted
    status = _status_of(boot)
    assert '"2.0.0"' in json.dumps(status)
    booted_record = status["booted"]
    assert isinstance(booted_record, dict) and booted_record["trial"] is False, booted_record
    print(boot.ctl_output()[-3000:])
    device = w.fleet_show()["device"]
    assert isinstance(device, dict)
    print(json.dumps(device, indent=1))
    assert (device["status"], device["running_version"]) == ("enrolled", "2.0.0"), device

    # 3. 3.0.0 in slot A: its health unit fails, boot-complete.target is not reached,
    # mark-good does not run, the board reboots.
    boot = board.power_on("true\n")
    assert boot.markers("OTAG-GRUB:")[1] == "boot A", boot.tail()
    assert boot.markers("OTAG-HEALTH:"), boot.tail()
    assert not any("mark-good=active" in m for m in boot.markers("OTAG-BOOTED")), boot.tail()

    # 4. GRUB skips the unconfirmed A; B's mark-good marks A bad and ends the install
    # rolled back; the check-in reports it.
    boot = board.power_on(f"{AGENT} check\n{STATUS_SCRIPT}")
    grub = boot.markers("OTAG-GRUB:")
    assert "A_TRY=1" in grub[0] and grub[1] == "boot B", "GRUB skipped the unconfirmed slot"
    booted = boot.booted()
    assert (booted["slot"], booted["version"]) == ("B", "2.0.0"), boot.tail()
    status_text = json.dumps(_status_of(boot))
    assert "3.0.0" in status_text and "rolled-back" in status_text, status_text
    device = w.fleet_show()["device"]
    assert isinstance(device, dict)
    print(json.dumps(device, indent=1))
    assert (device["status"], device["running_version"]) == ("enrolled", "2.0.0"), device
    assert "rolled-back" in str(device["last_result"]), device
    assert len(board.boots) == 4
