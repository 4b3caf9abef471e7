"""Anti-rollback at boot, attacked from outside through the real CLI and a real server.

The reported hole: after a security update to 1.1.0 (floor 1.1.0, counter 1), flipping one
byte of the new slot made ``agent boot`` fall back to the old 1.0.0 slot, and ``agent
update`` then said "up to date: running 1.0.0". Whoever can corrupt a slot could put the
device back on the vulnerable image, silently.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import World

EXIT_RECOVERY = 7


def agent(device_dir: Path, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otaguard", "agent", str(device_dir), action],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_corrupted_slot_sends_the_device_to_recovery_not_to_the_old_image(world: World) -> None:
    dev = world.device()
    world.release("1.1.0", security=True)
    upd = agent(dev.paths.root, "update")
    assert upd.returncode == 0 and "updated" in upd.stdout, upd.stderr
    slot_b = dev.paths.slots / "b.img"
    with open(slot_b, "r+b") as f:  # the attacker flips one byte of the running image
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))

    boot = agent(dev.paths.root, "boot")
    assert boot.returncode == EXIT_RECOVERY, (boot.stdout, boot.stderr)
    assert "slot B failed verification" in boot.stderr
    assert "at or above the anti-rollback floor (1.1.0, security counter 1)" in boot.stderr
    assert "1.0.0" not in boot.stdout, "the old image must not be started"
    assert "Traceback" not in boot.stderr

    status = agent(dev.paths.root, "status")
    assert status.returncode == 0 and "booted into recovery" in status.stdout

    recover = agent(dev.paths.root, "update")
    assert recover.returncode == 0, recover.stderr
    assert "recovered" in recover.stdout and "1.1.0" in recover.stdout

    again = agent(dev.paths.root, "boot")
    assert again.returncode == 0 and "version 1.1.0" in again.stdout, again.stderr
    st = dev.status()
    assert st.booted is not None and st.booted.version == "1.1.0"
    assert str(st.floor.version) == "1.1.0" and st.floor.security_counter == 1


def test_recovery_without_a_release_at_the_floor_says_so(world: World) -> None:
    dev = world.device()
    rel = world.release("1.1.0", security=True)
    assert dev.update().outcome == "updated"
    world.repo.withdraw_release(rel.path)  # only 1.0.0 is offered now
    world.wait_served()
    (dev.paths.slots / "b.img").write_bytes(b"garbage")

    assert agent(dev.paths.root, "boot").returncode == EXIT_RECOVERY
    upd = agent(dev.paths.root, "update")
    assert upd.returncode == 3, (upd.stdout, upd.stderr)
    assert "downgrade refused" in upd.stderr and "anti-rollback floor 1.1.0" in upd.stderr
    assert dev.status().booted is not None and dev.status().booted.recovery  # type: ignore[union-attr]
