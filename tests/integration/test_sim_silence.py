"""The simulator's "go silent" scenario (issue 11 item 6) against a real server: a device
told to install never comes back, and the server's ``silent-after-install`` signal raises
an alert naming the signal, the observed silence and the threshold; the devices that
installed and checked in again raise none."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from conftest import HW, World, start_world

#: the server's notion of the devices' poll interval, and the polls they may miss
POLL_S = 1.0
INTERVALS = 2


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[World]:
    """A director server whose monitor counts silence in 1 s polls and sweeps often."""
    w = start_world(tmp_path, director=True, device_poll_interval=POLL_S,
                    silent_intervals=INTERVALS, monitor_interval=0.3)  # fmt: skip
    try:
        w.release("1.0.0")
        yield w
    finally:
        w.server.stop()


def _alerts(w: World) -> list[dict[str, Any]]:
    http = urllib3.PoolManager(ca_certs=str(w.server.ca_cert), retries=False)
    resp = http.request("GET", f"{w.server.base_url}/api/v1/alerts?all=true",
                        headers={"Authorization": f"Bearer {w.server.operator_token}"})  # fmt: skip
    assert resp.status == 200, resp.data
    return list(json.loads(resp.data))


def test_a_device_that_goes_silent_after_being_told_to_install_raises_an_alert(
    quick: World,
) -> None:
    w = quick
    assert w.server.ca_cert is not None and w.director_root is not None
    # a security release: the director instructs it to every device at once
    w.release("1.1.0", security=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    env["OTAGUARD_OPERATOR_TOKEN"] = w.server.operator_token
    done = subprocess.run(
        [*w.cli(), "sim", "--server", w.server.base_url, "--ca", str(w.server.ca_cert),
         "--root", str(w.repo.metadata_dir / "root.json"),
         "--director-root", str(w.director_root), "--hardware-id", HW,
         "--devices", "4", "--cycles", "2", "--initial-version", "1.0.0",
         "--go-silent", "sim-00002"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sim-00002: goes silent once told to install" in done.stdout
    assert "1 device(s) told to install went silent" in done.stdout
    # 3 installed and reported 1.1.0 at their second check-in (nothing more to install)
    assert "version 1.1.0" in done.stdout and "3 installed" in done.stdout
    deadline = time.monotonic() + 20
    while not (alerts := _alerts(w)) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # more sweeps: nothing else may fire
    (alert,) = _alerts(w)
    assert (alert["signal"], alert["serial"], alert["subject"]) == (
        "silent-after-install", "sim-00002", "device:sim-00002")  # fmt: skip
    silent_for = float(alert["observed"].removeprefix("silent ").removesuffix(" s"))
    assert silent_for >= POLL_S * INTERVALS  # rounded to whole seconds
    assert alert["threshold"] == f"{POLL_S * INTERVALS:.0f} s ({INTERVALS} poll intervals of 1 s)"
    assert "1.1.0" in alert["detail"]
    assert (alert["action"], alert["outcome"]) == ("record", "recorded")
    assert alerts  # the first sweep past the threshold raised it
