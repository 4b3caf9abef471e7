"""The virtual board under test: a copy of ``make vboard``'s disk, provisioned for a real
server on the host, booted in QEMU (TCG, always under ``timeout``).

The host talks to the board through two channels only: a script on a second virtio disk
(run by the board's ``vboard-control.service`` after mark-good) and the serial console,
whose ``OTAG-`` lines are the markers the tests read.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

__all__ = ["BOARD_DIR", "STATUS_SCRIPT", "Board", "Boot", "require_board", "status_json"]

REPO: Final = Path(__file__).resolve().parents[2]
BOARD_DIR: Final = Path(os.environ.get("OTAGUARD_VBOARD_DIR", REPO / ".cache" / "vboard"))
OVMF_CODE: Final = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS: Final = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: one boot measured at 38-43 s here (OVMF, GRUB, kernel, systemd, mark-good, power off);
#: an install inside the boot downloads and writes a whole slot on an emulated CPU
BOOT_TIMEOUT_S: Final = 300
#: the control script is read from a raw disk of this size (NUL-padded)
CTL_BYTES: Final = 65536
DATA_PART: Final = 4
DEVICE_DIR: Final = "/var/lib/otaguard/device"


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_board() -> None:
    """Skip (outside CI) or fail (in CI) without root, QEMU, OVMF or a built board."""
    if os.geteuid() != 0:
        _fail_or_skip("the virtual board needs root (mke2fs -d with owners, partx)")
    for tool in ("qemu-system-x86_64", "timeout", "mke2fs", "partx"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            _fail_or_skip(f"needs {tool} (make vboard-sysdeps)")
    if not OVMF_CODE.is_file():
        _fail_or_skip("needs OVMF (make vboard-sysdeps)")
    if not (BOARD_DIR / "disk.img").is_file():
        _fail_or_skip(f"no board in {BOARD_DIR} (make vboard)")


@dataclass(frozen=True)
class Boot:
    """One power-on: the serial console, how it ended, what it cost."""

    n: int
    console: str
    rc: int
    wall_s: float
    cpu_s: float

    def markers(self, prefix: str) -> list[str]:
        """The console lines starting with ``prefix`` (e.g. ``OTAG-BOOTED``)."""
        # A line may start with terminal escapes (GRUB, OVMF): the marker counts from its prefix.
        return [
            line[line.index(prefix) + len(prefix) :].strip()
            for line in self.console.splitlines()
            if prefix in line
        ]

    def booted(self) -> dict[str, str]:
        """The ``OTAG-BOOTED`` marker's fields (slot, version, mark-good, health)."""
        lines = self.markers("OTAG-BOOTED")
        assert len(lines) == 1, f"boot {self.n}: expected one OTAG-BOOTED line:\n{self.tail()}"
        return dict(re.findall(r"(\S+)=(\S*)", lines[0]))

    def ctl_output(self) -> str:
        """What the host's script printed on the board."""
        return "\n".join(self.markers("OTAG-CTL:"))

    def tail(self, n: int = 60) -> str:
        """The last lines of the console, for assertion messages."""
        return "\n".join(self.console.splitlines()[-n:])


class Board:
    """A private copy of the built disk, its UEFI variables and a control disk."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.disk = workdir / "disk.img"
        self.vars = workdir / "vars.fd"
        self.ctl = workdir / "ctl.img"
        self.boots: list[Boot] = []
        subprocess.run(
            ["cp", "--sparse=always", str(BOARD_DIR / "disk.img"), str(self.disk)], check=True
        )
        shutil.copyfile(OVMF_VARS, self.vars)

    def image(self, version: str) -> Path:
        """The slot image (ext4) of a built board version, e.g. ``2.0.0`` or ``3.0.0-fail``."""
        return BOARD_DIR / f"slot-{version}.ext4"

    def write_data_partition(self, device_dir: Path) -> None:
        """Put ``device_dir`` on the data partition as /var/lib/otaguard/device (a new ext4
        made by mke2fs -d, copied to the partition's offset: no loop device)."""
        geometry = subprocess.run(
            ["partx", "-g", "-o", "START,SECTORS", "-n", str(DATA_PART), str(self.disk)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        start, sectors = (int(x) for x in geometry.split())
        staging = self.dir / "data-root"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        shutil.copytree(device_dir, staging / "device", symlinks=True)
        fs = self.dir / "data.ext4"
        fs.unlink(missing_ok=True)
        subprocess.run(
            ["mke2fs", "-q", "-t", "ext4", "-L", "data", "-d", str(staging),
             "-E", "root_owner=0:0", str(fs), f"{sectors // 2}k"],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["dd", f"if={fs}", f"of={self.disk}", "bs=512", f"seek={start}",
             "conv=notrunc,sparse", "status=none"],
            check=True,
        )  # fmt: skip
        fs.unlink()

    def power_on(self, script: str, *, timeout_s: int = BOOT_TIMEOUT_S) -> Boot:
        """Boot once with ``script`` on the control disk; returns when QEMU exits (the
        board powered off or rebooted: -no-reboot) or ``timeout`` killed it."""
        data = script.encode()
        assert len(data) < CTL_BYTES
        self.ctl.write_bytes(data + b"\0" * (CTL_BYTES - len(data)))
        n = len(self.boots) + 1
        log = self.dir / f"boot{n}.log"
        argv = [
            "timeout", "--kill-after=10", str(timeout_s),
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "1024", "-smp", "2",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={self.vars}",
            "-drive", f"if=virtio,format=raw,file={self.disk}",
            "-drive", f"if=virtio,format=raw,file={self.ctl}",
            "-nic", "user,model=virtio-net-pci",
            "-nographic", "-no-reboot", "-serial", "mon:stdio",
        ]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        with log.open("wb") as out:
            rc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False
            ).returncode
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        console = log.read_bytes().decode(errors="replace").replace("\r", "")
        boot = Boot(n=n, console=console, rc=rc, wall_s=wall, cpu_s=cpu)
        self.boots.append(boot)
        print(f"vboard boot {n}: {wall:.1f} s wall, {cpu:.1f} CPU-s (qemu rc {rc})")
        assert rc != 124, f"boot {n} hung: timeout killed QEMU after {timeout_s} s\n{boot.tail()}"
        return boot


#: the control-script lines that print the agent's status between two markers
STATUS_SCRIPT: Final = (
    f"echo STATUS-BEGIN\notaguard agent --json {DEVICE_DIR} status\necho STATUS-END\n"
)


def status_json(text: str) -> dict[str, object]:
    """The JSON object ``STATUS_SCRIPT`` printed, among the script's other lines."""
    lines = text.splitlines()
    assert "STATUS-BEGIN" in lines and "STATUS-END" in lines, f"no status in:\n{text}"
    body = lines[lines.index("STATUS-BEGIN") + 1 : lines.index("STATUS-END")]
    parsed: dict[str, object] = json.loads("\n".join(body))
    return parsed
