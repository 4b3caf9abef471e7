"""Hostile and broken input through the real CLI: one line, non-zero exit, nothing changed.

Every case runs ``python -m otaguard`` as a subprocess and requires exactly one line on
stderr naming the problem (never a traceback), a non-zero exit code, and device (or
repository) state byte-for-byte unchanged, except ``run/`` (the boot record, volatile)
and ``.lock``. Storage failures are the exception: the install may keep its progress to
resume, but nothing that decides what boots may change, and the next update succeeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import HW, PASSPHRASE, World
from otaguard.agent import BootEnv, Device
from sbom_support import sbom_beside

GARBAGE = b'\x89PNG\r\n\x1a\n\x00\xff\xfe garbage {"not": json \xc3\x28'
PASSPHRASE_ENV = "OTAGUARD_KEY_PASSPHRASE"


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    return subprocess.run(
        [sys.executable, "-m", "otaguard", *map(str, args)],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Require exit ``code`` and a single stderr line containing every needle.

    Named development-mode warnings (the device's file key) are not errors; skipped.
    """
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith("warning: INSECURE development mode")
    ]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree_hash(root: Path, *, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """Digest of every entry under ``root`` (symlinks not followed), minus run/ and .lock."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if rel in {".lock", "run"} or rel.startswith("run/"):
                continue
            if only is not None and not any(rel == o or rel.startswith(o + "/") for o in only):
                continue
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# What decides which slot boots and what it may run: must survive any storage failure.
BOOT_STATE = ("config.json", "trust", "bootenv.json", "monotonic.json", "slots/a.img")


def booted_slot(dev: Device) -> str:
    return str(json.loads(dev.paths.booted.read_text())["slot"])


# -- device state files ----------------------------------------------------------------------


def _edit_config(extra: dict[str, object]) -> Callable[[Device], None]:
    def edit(dev: Device) -> None:
        raw = json.loads(dev.paths.config.read_text())
        raw.update(extra)
        dev.paths.config.write_text(json.dumps(raw))

    return edit


def _garbage(rel: str) -> Callable[[Device], None]:
    def edit(dev: Device) -> None:
        (dev.paths.root / rel).write_bytes(GARBAGE)

    return edit


def _config_list(dev: Device) -> None:
    dev.paths.config.write_text("[1, 2, 3]")


DEVICE_CASES = {
    "config-garbage": (
        _garbage("config.json"),
        2,
        ("configuration error", "config.json", "not valid JSON"),
    ),
    "config-unknown-key": (
        _edit_config({"bogus_key": 1}),
        2,
        ("configuration error", "unknown keys: bogus_key"),
    ),
    "config-wrong-type": (
        _edit_config({"server_url": 5}),
        2,
        ("configuration error", "server_url must be"),
    ),
    "config-wrong-number": (
        _edit_config({"max_image_bytes": "4G"}),
        2,
        ("configuration error", "max_image_bytes"),
    ),
    "config-not-object": (_config_list, 2, ("configuration error", "not a JSON object")),
    "config-zero-rate": (
        _edit_config({"download_min_rate_bps": 0}),
        2,
        ("configuration error", "download_min_rate_bps must be positive"),
    ),
    "config-no-health-check": (
        _edit_config({"health_command": None}),
        2,
        ("configuration error", "health_command", "unsafe_no_health_check"),
    ),
    "trusted-root-garbage": (
        _garbage("trust/root.json"),
        2,
        ("trust/root.json", "not valid TUF root metadata"),
    ),
    "trusted-ca-garbage": (_garbage("trust/ca.pem"), 2, ("configuration error", "ca.pem")),
    "bootenv-garbage": (
        _garbage("bootenv.json"),
        2,
        ("configuration error", "bootenv.json", "corrupt"),
    ),
    "install-state-garbage": (
        _garbage("install-state.json"),
        2,
        ("configuration error", "install-state.json"),
    ),
    "monotonic-garbage": (_garbage("monotonic.json"), 2, ("configuration error", "monotonic.json")),
}


@pytest.mark.parametrize("case", sorted(DEVICE_CASES))
def test_corrupt_device_file_fails_cleanly(world: World, case: str) -> None:
    edit, code, needles = DEVICE_CASES[case]
    dev = world.device(case)
    world.release("1.1.0")
    edit(dev)
    before = tree_hash(dev.paths.root)

    proc = cli("agent", dev.paths.root, "update")

    one_line_error(proc, code, *needles)
    assert tree_hash(dev.paths.root) == before


# -- provisioning --------------------------------------------------------------------------


def _init_args(world: World, device_dir: Path, **over: Path) -> list[str | Path]:
    assert world.server.ca_cert is not None
    return [
        "device", "init", device_dir, "--serial", "dev",
        "--server", world.server.base_url,
        "--root", over.get("root", world.repo.metadata_dir / "root.json"),
        "--ca", over.get("ca", world.server.ca_cert),
        "--hardware-id", HW,
        "--factory-image", over.get("image", world.image("1.0.0")),
        "--factory-version", "1.0.0", "--unsafe-no-health-check",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("root-garbage", ("configuration error", "not valid TUF root metadata")),
        ("root-is-targets", ("configuration error", "is not root metadata")),
        ("root-is-other-json", ("configuration error", "not valid TUF root metadata")),
        ("root-missing", ("configuration error", "No such file")),
        ("ca-garbage", ("configuration error", "not a PEM certificate")),
        ("image-missing", ("factory image", "does not exist")),
    ],
)
def test_device_init_rejects_bad_inputs(
    world: World, tmp_path: Path, case: str, needles: tuple[str, ...]
) -> None:
    bad = tmp_path / "bad-input"
    over: dict[str, Path] = {}
    if case == "root-garbage":
        bad.write_bytes(GARBAGE)
        over["root"] = bad
    elif case == "root-is-targets":
        over["root"] = world.repo.metadata_dir / "1.targets.json"
    elif case == "root-is-other-json":
        bad.write_text('{"signed": {"_type": "root"}, "signatures": "nope"}')
        over["root"] = bad
    elif case == "root-missing":
        over["root"] = tmp_path / "no-such-root.json"
    elif case == "ca-garbage":
        bad.write_bytes(GARBAGE)
        over["ca"] = bad
    else:
        over["image"] = tmp_path / "no-such-image.img"
    device_dir = tmp_path / "new-device"

    proc = cli(*_init_args(world, device_dir, **over))

    one_line_error(proc, 2, *needles)
    assert not device_dir.exists(), "a failed provisioning must not leave a half-made device"


# -- releases ------------------------------------------------------------------------------


def test_release_add_with_wrong_passphrase(world: World) -> None:
    before = tree_hash(world.repo.dir)
    blobs = sorted(p.name for p in world.repo.targets_dir.iterdir())

    proc = cli(
        "release", "add", world.repo.dir, world.image("1.1.0"),
        "--version", "1.1.0", "--hardware-id", HW, "--sbom", sbom_beside(world.image("1.1.0")),
        env={PASSPHRASE_ENV: "not the passphrase"},
    )  # fmt: skip

    one_line_error(proc, 2, "key error")
    assert tree_hash(world.repo.dir) == before
    assert sorted(p.name for p in world.repo.targets_dir.iterdir()) == blobs


def test_release_add_of_missing_image(world: World, tmp_path: Path) -> None:
    before = tree_hash(world.repo.dir)

    proc = cli(
        "release", "add", world.repo.dir, tmp_path / "missing.img",
        "--version", "1.1.0", "--hardware-id", HW, "--sbom", sbom_beside(world.image("1.1.0")),
        env={PASSPHRASE_ENV: PASSPHRASE.decode()},
    )  # fmt: skip

    one_line_error(proc, 2, "missing.img", "No such file")
    assert tree_hash(world.repo.dir) == before


# -- storage ---------------------------------------------------------------------------------


def _assert_a_still_boots(dev: Device, boot_state: dict[str, str]) -> None:
    assert tree_hash(dev.paths.root, only=BOOT_STATE) == boot_state
    env = BootEnv.load(dev.paths.bootenv)
    assert env.primary == "A" and env.try_slot is None and env.slots["B"] is None
    boot = cli("agent", dev.paths.root, "boot")
    assert boot.returncode == 0 and "booted slot A" in boot.stdout, boot.stderr
    assert booted_slot(dev) == "A"


def _assert_next_update_succeeds(dev: Device, world: World) -> None:
    upd = cli("agent", dev.paths.root, "update")
    assert upd.returncode == 0 and "updated" in upd.stdout, upd.stderr
    st = dev.status()
    assert st.bootenv.primary == "B" and st.booted is not None and st.booted.version == "1.1.0"
    assert str(st.floor.version) == "1.1.0"
    assert (dev.paths.slots / "b.img").read_bytes() == world.image("1.1.0").read_bytes()


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("directory", ("storage error", "cannot open slot B", "Is a directory")),
        # the streaming writer positions the slot first, which /dev/full refuses
        ("dev-full", ("storage error", "cannot position slot B", "Invalid argument")),
    ],
)
def test_unwritable_slot(world: World, case: str, needles: tuple[str, ...]) -> None:
    dev = world.device(case)
    world.release("1.1.0")
    b_img = dev.paths.slots / "b.img"
    b_img.unlink(missing_ok=True)
    if case == "directory":
        b_img.mkdir()
    else:
        b_img.symlink_to("/dev/full")  # every write fails with ENOSPC
    boot_state = tree_hash(dev.paths.root, only=BOOT_STATE)

    proc = cli("agent", dev.paths.root, "update")

    one_line_error(proc, 5, *needles)
    _assert_a_still_boots(dev, boot_state)
    # Storage repaired: the next update resumes (or restarts) the install and commits.
    if b_img.is_symlink():
        b_img.unlink()
    else:
        b_img.rmdir()
    _assert_next_update_succeeds(dev, world)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: a write past it fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_mid_stream(world: World) -> None:
    """The slot's storage fills up halfway through the streamed image (RLIMIT_FSIZE: a write
    past it fails as on a full disk): one line naming the slot and the cause, the running
    image still boots, and once there is room the next update installs."""
    dev = world.device()
    rel = world.release("1.1.0")
    boot_state = tree_hash(dev.paths.root, only=BOOT_STATE)
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    proc = subprocess.run(
        [sys.executable, "-m", "otaguard", "agent", str(dev.paths.root), "update"],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        preexec_fn=_file_size_limit(rel.length // 2),
    )
    one_line_error(proc, 5, "storage error", "slot B", "File too large")
    _assert_a_still_boots(dev, boot_state)
    _assert_next_update_succeeds(dev, world)


# -- network ---------------------------------------------------------------------------------


def test_server_down(world: World) -> None:
    dev = world.device()
    dev.check()  # metadata cache primed while the server was up
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dev.config = dataclasses.replace(dev.config, server_url=f"https://127.0.0.1:{port}")
    dev.config.save(dev.paths.config)
    before = tree_hash(dev.paths.root)

    proc = cli("agent", dev.paths.root, "update")

    one_line_error(proc, 4, "transport error", f"127.0.0.1:{port}")
    assert tree_hash(dev.paths.root) == before
