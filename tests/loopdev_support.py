"""Partitioned loop devices for the block-device tests, always detached.

On this kind of kernel (no partition-table parsers) ``losetup -P`` creates no ``loopNpM``
nodes; ``partx -a`` registers the partitions from userspace. The node is checked first,
so a kernel that did create them is not asked twice. Teardown (``partx -d``, ``losetup
-d``) runs whatever the test did. Needs root and util-linux/fdisk: under ``CI=true`` a
missing piece fails the test, elsewhere it skips.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["LoopDisk", "layout", "loop_disk", "require_tools"]


def layout(tag: str) -> str:
    """A 16 MiB GPT: an environment partition and two 6 MiB slots (small: tests stay fast).

    The labels carry ``tag``: other disks attached on this machine at the same time (other
    tests, other workers) must not make a label ambiguous.
    """
    return f"""label: gpt
unit: sectors
first-lba: 2048
name=ubootenv-{tag}, size=1MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
name=rootfs_a-{tag}, size=6MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
name=rootfs_b-{tag}, size=6MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
"""


DISK_BYTES = 16 * 1024 * 1024


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_tools(*tools: str) -> None:
    """Skip (outside CI) or fail (in CI) when a tool is missing."""
    missing = [
        t
        for t in tools
        if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None
    ]
    if missing:
        _fail_or_skip(f"needs {', '.join(missing)} (make sysdeps)")


def _run(*argv: str) -> str:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin", "LC_ALL": "C"}
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, env=env, timeout=60
    ).stdout


class LoopDisk:
    """An attached, partitioned loop device."""

    def __init__(self, image: Path, loop: str, tag: str) -> None:
        self.image = image
        self.loop = loop
        self.tag = tag

    def label(self, slot: str) -> str:
        """The GPT label of slot ``A`` or ``B`` (or ``env``)."""
        return f"ubootenv-{self.tag}" if slot == "env" else f"rootfs_{slot.lower()}-{self.tag}"

    def part(self, n: int) -> Path:
        """The node of partition ``n``."""
        return Path(f"{self.loop}p{n}")


@contextmanager
def loop_disk(tmp: Path, tag: str | None = None) -> Iterator[LoopDisk]:
    """A 16 MiB GPT disk image on a loop device with partition nodes; detached after."""
    if os.geteuid() != 0:
        _fail_or_skip("loop devices need root")
    require_tools("losetup", "partx", "sfdisk")
    if not Path("/dev/loop-control").exists():
        _fail_or_skip("no loop devices (/dev/loop-control)")
    tag = tag or secrets.token_hex(4)
    tmp.mkdir(parents=True, exist_ok=True)
    image = tmp / f"disk-{tag}.img"
    with open(image, "wb") as f:
        f.truncate(DISK_BYTES)
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(image)],
        input=layout(tag), text=True, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        loop = _run("losetup", "-f", "--show", "-P", str(image)).strip()
    except subprocess.CalledProcessError as e:
        _fail_or_skip(f"cannot attach a loop device: {e.stderr.strip()}")
        raise
    registered = False
    try:
        if not Path(f"{loop}p1").exists():
            _run("partx", "-a", loop)
            registered = True
        for _ in range(50):  # devtmpfs creates the nodes asynchronously
            if Path(f"{loop}p1").exists():
                break
            time.sleep(0.05)
        yield LoopDisk(image, loop, tag)
    finally:
        if registered:
            subprocess.run(["partx", "-d", loop], capture_output=True, timeout=60, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60, check=False)
