"""Power cuts: the real agent process is SIGKILLed at every persisted point of an install.

Each case runs ``otaguard agent DIR update`` as a subprocess with the fault-injection
variable set, checks that the process really died by SIGKILL, then powers the device on
(``agent DIR boot``) and runs ``update`` again. Whatever the cut, the bootloader must
start a slot whose content matches the image recorded for it, and the install must end
committed (or, for a bad release, rolled back) with the anti-rollback floor consistent.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import World
from otaguard.agent import FAULT_ENV, BootEnv, Device, Phase

MAX_BOOT_TRIES = 3
# After every action of the install machine (see otaguard.agent.install), as
# "action" (first occurrence) or "phase:action".
BEFORE_HEALTH = (
    "selected:invalidate_slot",
    "stream-at:1048576",  # inside the streaming write, half of the 2 MiB image
    "stream_to_slot",
    "arm",
    "verified:discard_staged",
    "reboot",
    "health_check",
)
# The commit points are reached only when healthy, the roll-back points only when not.
COMMIT_POINTS = (
    *BEFORE_HEALTH,
    "set_primary",
    "raise_floor",
    "retire_slot",
    "healthy:discard_staged",
)
ROLLBACK_POINTS = (*BEFORE_HEALTH, "rolling-back:invalidate_slot", "rolling-back:reboot")


def agent(
    device_dir: Path, action: str, *, kill_after: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``otaguard agent DEVICE_DIR ACTION`` as a real process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    if kill_after is not None:
        env[FAULT_ENV] = kill_after
    return subprocess.run(
        [sys.executable, "-m", "otaguard", "agent", str(device_dir), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def killed(device_dir: Path, point: str) -> None:
    """Run ``update`` and require that it died by SIGKILL at ``point``."""
    proc = agent(device_dir, "update", kill_after=point)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stdout, proc.stderr)
    assert f"killing the agent after {point}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def assert_verified_image_runs(dev: Device) -> str:
    """The booted slot holds, byte for byte, the image the boot environment records for it."""
    booted = json.loads(dev.paths.booted.read_text())
    env = BootEnv.load(dev.paths.bootenv)
    image = env.slots[booted["slot"]]
    assert image is not None, f"booted slot {booted['slot']} has no image in {env}"
    data = (dev.paths.slots / f"{booted['slot'].lower()}.img").read_bytes()[: image.length]
    assert len(data) == image.length
    assert hashlib.sha256(data).hexdigest() == image.sha256 == booted["sha256"]
    return str(booted["slot"])


def assert_committed_to_new(dev: Device, world: World) -> None:
    st = dev.status()
    assert st.booted is not None and st.booted.slot == "B" and st.booted.version == "1.1.0"
    assert st.bootenv.primary == "B" and st.bootenv.try_slot is None
    assert str(st.floor.version) == "1.1.0"
    assert st.bootenv.slots["A"] is None, "commit retires the slot below the new floor"
    assert st.install.phase is Phase.IDLE
    assert st.install.last_result is not None and st.install.last_result["outcome"] == "updated"
    assert (dev.paths.slots / "b.img").read_bytes() == world.image("1.1.0").read_bytes()
    assert list(dev.paths.staging.iterdir()) == [], "staged image left behind"


def assert_rolled_back(dev: Device, world: World) -> None:
    st = dev.status()
    assert st.booted is not None and st.booted.slot == "A" and st.booted.version == "1.0.0"
    assert st.bootenv.primary == "A" and st.bootenv.try_slot is None
    assert st.bootenv.slots["B"] is None, "the rejected slot must not stay bootable"
    assert str(st.floor.version) == "1.0.0", "a rolled-back release must not raise the floor"
    assert st.install.phase is Phase.IDLE
    assert st.install.last_result is not None and st.install.last_result["outcome"] == "rolled-back"
    assert (dev.paths.slots / "a.img").read_bytes() == world.image("1.0.0").read_bytes()


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_power_cut_then_resume_commits(world: World, point: str) -> None:
    dev = world.device(f"dev-{point}")
    world.release("1.1.0")

    killed(dev.paths.root, point)
    boot = ok(agent(dev.paths.root, "boot"))
    assert "digest verified" in boot.stdout
    assert_verified_image_runs(dev)
    upd = ok(agent(dev.paths.root, "update"))

    # Every cut resumes into the same install: commit's actions are idempotent, so a
    # cut after the last of them still ends "updated", never half-committed.
    assert "updated" in upd.stdout, upd.stdout
    assert assert_verified_image_runs(dev) == "B"
    assert_committed_to_new(dev, world)
    # Power-on again: the committed slot boots as primary, not as a trial.
    assert "booted slot B" in ok(agent(dev.paths.root, "boot")).stdout
    assert_verified_image_runs(dev)


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_power_cut_with_failing_health_check_rolls_back(world: World, point: str) -> None:
    dev = world.device(f"dev-{point}", health_command=["false"])
    world.release("1.1.0")

    killed(dev.paths.root, point)
    ok(agent(dev.paths.root, "boot"))
    assert_verified_image_runs(dev)
    if point == "roll_back":
        # The rollback had finished: the release is remembered as bad and not retried.
        upd = ok(agent(dev.paths.root, "update"))
        assert "up to date" in upd.stdout
        assert "rolled back on this device before" in upd.stderr, upd.stderr
    else:
        upd = ok(agent(dev.paths.root, "update"), code=6)
        assert "rolled-back" in upd.stderr and "health check exited with 1" in upd.stderr, (
            upd.stderr
        )

    assert assert_verified_image_runs(dev) == "A"
    assert_rolled_back(dev, world)


def test_boot_tries_exhausted_across_power_cuts_rolls_back(world: World) -> None:
    """The new slot passes its health check but never gets to commit before its tries run out."""
    dev = world.device()
    world.release("1.1.0")

    killed(dev.paths.root, "arm")
    env = BootEnv.load(dev.paths.bootenv)
    assert env.try_slot == "B" and env.tries_left == MAX_BOOT_TRIES
    killed(dev.paths.root, "reboot")  # trial boot 1, then power lost
    for _ in range(MAX_BOOT_TRIES - 1):  # trial boots 2 and 3, power lost before the agent runs
        assert "trial boot of slot B" in ok(agent(dev.paths.root, "boot")).stdout
        assert assert_verified_image_runs(dev) == "B"
    killed(dev.paths.root, "health_check")  # healthy, but power lost before commit
    assert BootEnv.load(dev.paths.bootenv).tries_left == 0

    fallback = ok(agent(dev.paths.root, "boot"))
    assert "booted slot A" in fallback.stdout
    assert "boot tries of slot B exhausted" in fallback.stderr
    assert assert_verified_image_runs(dev) == "A"
    ok(agent(dev.paths.root, "boot"))  # more boots than tries: still A
    assert assert_verified_image_runs(dev) == "A"

    upd = ok(agent(dev.paths.root, "update"), code=6)
    assert "rolled-back" in upd.stderr and "did not boot" in upd.stderr, upd.stderr
    assert_rolled_back(dev, world)
    # An image that kept failing until the tries ran out is not installed again.
    again = ok(agent(dev.paths.root, "update"))
    assert "rolled back on this device before" in again.stderr, again.stderr


def test_new_image_crashing_during_health_check_rolls_back(world: World) -> None:
    """The agent is SIGKILLed from inside the new image's health check on every trial boot."""
    dev = world.device(health_command=["sh", "-c", "kill -9 $PPID; sleep 5"])
    world.release("1.1.0")

    killed(dev.paths.root, "arm")
    for n in range(MAX_BOOT_TRIES):
        assert "trial boot of slot B" in ok(agent(dev.paths.root, "boot")).stdout
        crash = agent(dev.paths.root, "update")
        assert crash.returncode == -signal.SIGKILL, (n, crash.returncode, crash.stderr)
    assert "booted slot A" in ok(agent(dev.paths.root, "boot")).stdout
    assert assert_verified_image_runs(dev) == "A"

    upd = ok(agent(dev.paths.root, "update"), code=6)
    assert "rolled-back" in upd.stderr, upd.stderr
    assert_rolled_back(dev, world)


def test_boots_without_agent_exhaust_tries(world: World) -> None:
    """A new image that never reaches userspace: only the bootloader runs, again and again."""
    dev = world.device()
    world.release("1.1.0")
    killed(dev.paths.root, "arm")

    slots = [dev.boot().slot for _ in range(MAX_BOOT_TRIES + 2)]

    assert slots == ["B"] * MAX_BOOT_TRIES + ["A", "A"]
    upd = ok(agent(dev.paths.root, "update"), code=6)
    assert "rolled-back" in upd.stderr
    assert_rolled_back(dev, world)


def test_power_cut_mid_write_over_previous_slot(world: World) -> None:
    """Overwriting a slot that held a valid image: a torn write must never be bootable."""
    dev = world.device()
    world.release("1.1.0")
    assert dev.update().outcome == "updated"  # now 1.1.0 on B; A holds the old 1.0.0
    world.release("1.2.0")

    killed(dev.paths.root, "stream-at:1048576")
    env = BootEnv.load(dev.paths.bootenv)
    assert env.slots["A"] is None, "slot A must be invalidated before it is overwritten"
    assert (dev.paths.slots / "a.img").read_bytes() != world.image("1.0.0").read_bytes()  # torn

    assert "booted slot B" in ok(agent(dev.paths.root, "boot")).stdout
    assert assert_verified_image_runs(dev) == "B"
    upd = ok(agent(dev.paths.root, "update"))
    assert "1.2.0" in upd.stdout
    st = dev.status()
    assert st.booted is not None and st.booted.slot == "A" and st.booted.version == "1.2.0"
    assert st.bootenv.primary == "A" and str(st.floor.version) == "1.2.0"
    assert assert_verified_image_runs(dev) == "A"


def test_corrupted_new_slot_falls_back_to_a(world: World) -> None:
    dev = world.device()
    world.release("1.1.0")
    killed(dev.paths.root, "arm")
    b_img = dev.paths.slots / "b.img"
    with open(b_img, "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0x01]))

    boot = ok(agent(dev.paths.root, "boot"))

    assert "booted slot A" in boot.stdout
    assert "slot B failed verification" in boot.stderr
    assert assert_verified_image_runs(dev) == "A"
    assert BootEnv.load(dev.paths.bootenv).slots["B"] is None
    upd = ok(agent(dev.paths.root, "update"), code=6)
    assert "rolled-back" in upd.stderr
    assert_rolled_back(dev, world)
    # The release itself is fine: the next update downloads it again and commits.
    ok(agent(dev.paths.root, "update"))
    assert_committed_to_new(dev, world)
