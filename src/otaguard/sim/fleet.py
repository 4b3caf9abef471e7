"""A fleet of simulated devices, provisioned and updated concurrently."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import urllib3

from otaguard.agent import Device, UpdateResult
from otaguard.healthcheck import UNHEALTHY_MARKER
from otaguard.model import errors
from otaguard.model.errors import NotReadyError, OtaguardError
from otaguard.repo import ImageRepository
from otaguard.server import RunningServer

__all__ = ["SIM_HEALTH_COMMAND", "DeviceRun", "Fleet", "make_image", "wait_served"]

logger = logging.getLogger(__name__)

# How long to wait for a server to pick up a repository change (it polls every second).
SYNC_TIMEOUT_S: Final = 30.0
# Two cores here: more threads only add contention (hashing releases the GIL).
MAX_PARALLEL: Final = 8


#: the health command of simulated devices (see :mod:`otaguard.healthcheck`)
SIM_HEALTH_COMMAND: Final = [sys.executable, "-m", "otaguard.healthcheck"]


def make_image(path: Path, *, size: int, seed: str, unhealthy: bool = False) -> Path:
    """Write a deterministic pseudo-random firmware image of ``size`` bytes.

    With ``unhealthy``, the image fails the simulated health check when it boots.
    """
    block = hashlib.sha256(seed.encode()).digest() * 2048  # 64 KiB
    with open(path, "wb") as f:
        if unhealthy:
            f.write(UNHEALTHY_MARKER)
        remaining = size - (len(UNHEALTHY_MARKER) if unhealthy else 0)
        counter = 0
        while remaining > 0:
            chunk = hashlib.sha256(block + counter.to_bytes(8, "big")).digest() + block
            f.write(chunk[:remaining])
            remaining -= min(len(chunk), remaining)
            counter += 1
    return path


def _served_targets_version(http: urllib3.PoolManager, base_url: str) -> int | None:
    """Targets version the server's timestamp leads to (unverified: only for waiting)."""
    resp = http.request("GET", f"{base_url}/metadata/timestamp.json")
    if resp.status != 200:
        return None
    try:
        snap_version = json.loads(resp.data)["signed"]["meta"]["snapshot.json"]["version"]
        resp = http.request("GET", f"{base_url}/metadata/{int(snap_version)}.snapshot.json")
        if resp.status != 200:
            return None
        return int(json.loads(resp.data)["signed"]["meta"]["targets.json"]["version"])
    except (ValueError, KeyError, TypeError):
        return None


def wait_served(server: RunningServer, repo: ImageRepository) -> None:
    """Block until ``server`` serves ``repo``'s current state.

    In server mode: the newest root and the newest targets version (the server signs
    the snapshot and timestamp leading to it). In server-less mode: the repository's own
    timestamp, byte for byte.

    Raises:
        NotReadyError: the server did not pick up the change within the timeout.
    """
    if repo.server_signed:
        want_targets = repo.latest_version("targets")
        want_root = (repo.metadata_dir / "root.json").read_bytes()
    else:
        want_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    # The operator may read what is served (devices need their certificate).
    http = urllib3.PoolManager(
        ca_certs=str(server.ca_cert) if server.ca_cert else None,
        timeout=5.0,
        headers={"Authorization": f"Bearer {server.operator_token}"},
    )
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if repo.server_signed:
                root = http.request("GET", f"{server.base_url}/metadata/root.json")
                if (
                    root.status == 200
                    and root.data == want_root
                    and _served_targets_version(http, server.base_url) == want_targets
                ):
                    return
            else:
                resp = http.request("GET", f"{server.base_url}/metadata/timestamp.json")
                if resp.status == 200 and resp.data == want_timestamp:
                    return
            time.sleep(0.1)
    finally:
        http.clear()
    raise NotReadyError("the server did not pick up the repository change in time")


@dataclass
class DeviceRun:
    """What one device's update attempt produced."""

    name: str
    result: UpdateResult | None
    error: OtaguardError | None

    @property
    def refused(self) -> bool:
        """True when the device refused (an error, or nothing installed)."""
        return self.error is not None


ProgressFn = Callable[[str, str, int, int], None]


class Fleet:
    """Devices provisioned in ``root/device-NN`` directories."""

    def __init__(self, root: Path, names: list[str]):
        self.root = root
        self.names = names

    def device(self, name: str) -> Device:
        """Open one device."""
        return Device(self.root / name)

    @classmethod
    def provision(
        cls,
        root: Path,
        *,
        count: int,
        server_url: str,
        root_json: Path,
        ca_pem: Path,
        hardware_id: str,
        factory_image: Path,
        factory_version: str,
        health_command: list[str],
        enrollment_token: Callable[[str, str], str],
        tpm_tctis: dict[str, str] | None = None,
        director_root: Path | None = None,
    ) -> Fleet:
        """Provision ``count`` devices running the factory image, each enrolled.

        ``enrollment_token(serial, hardware_id)`` registers a device with the server and
        returns its single-use token (the operator's ``fleet add-device``); each device
        then makes its key and enrolls: in its TPM when ``tpm_tctis`` names one for it
        (its anti-rollback floor goes there too), otherwise a file key (development).
        With ``director_root`` each device installs only what the director instructs.
        """
        names = [f"device-{i:02d}" for i in range(1, count + 1)]
        tctis = tpm_tctis or {}
        for name in names:
            dev = Device.provision(
                root / name,
                server_url=server_url,
                root_json=root_json,
                ca_pem=ca_pem,
                hardware_id=hardware_id,
                serial=name,
                factory_image=factory_image,
                factory_version=factory_version,
                health_command=health_command,
                tpm_tcti=tctis.get(name),
                director_root=director_root,
            )
            dev.enroll(enrollment_token(name, hardware_id), key_store=dev.key_store)
        return cls(root, names)

    def update_all(self, *, progress: ProgressFn | None = None) -> list[DeviceRun]:
        """Run ``update`` on every device concurrently; errors are collected, not raised."""

        def one(name: str) -> DeviceRun:
            def on_progress(stage: str, n: int, total: int) -> None:
                if progress:
                    progress(name, stage, n, total)

            dev = self.device(name)
            if dev.config.tpm is not None:
                return _update_in_child(name, dev.paths.root, on_progress)
            try:
                return DeviceRun(name, dev.update(progress=on_progress), None)
            except OtaguardError as e:
                return DeviceRun(name, None, e)

        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(self.names))) as pool:
            return list(pool.map(one, self.names))

    def tpm_backed(self) -> list[str]:
        """The devices whose key (and anti-rollback floor) live in a TPM."""
        return [n for n in self.names if self.device(n).config.tpm is not None]

    def versions(self) -> dict[str, str]:
        """What each device runs now (the booted slot's version)."""
        out = {}
        for name in self.names:
            st = self.device(name).status()
            out[name] = st.booted.version if st.booted else "?"
        return out


#: a child update downloads, verifies and installs an image: generous, but bounded
CHILD_UPDATE_TIMEOUT_S: Final = 300.0


def _update_in_child(name: str, root: Path, progress: Callable[[str, int, int], None]) -> DeviceRun:
    """``update`` in a child process (a TPM-held TLS key cannot share this process's ssl).

    The child's error comes back as the same otaguard error class, so callers branch on
    it as for an in-process run.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", "otaguard.sim._child", str(root)],
            capture_output=True,
            text=True,
            timeout=CHILD_UPDATE_TIMEOUT_S,
            check=False,
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return DeviceRun(name, None, OtaguardError(f"the device's agent failed: {e}"))
    if "result" in answer:
        if "downloaded" in answer:  # what a delta or compressed stream moved, as in-process
            progress("downloaded", int(answer["downloaded"][0]), int(answer["downloaded"][1]))
        return DeviceRun(name, UpdateResult(**answer["result"]), None)
    kind = getattr(errors, str(answer["error"]["kind"]), OtaguardError)
    if not (isinstance(kind, type) and issubclass(kind, OtaguardError)):
        kind = OtaguardError
    return DeviceRun(name, None, kind(str(answer["error"]["message"])))
