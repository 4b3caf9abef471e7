"""The running server against its own ``/openapi.json`` (schemathesis, ``--checks all``).

A real server over TLS (with a director, so every route is live) is driven by the
schemathesis CLI in a subprocess, configured by ``schemathesis.toml`` beside this file:
device routes with a real enrolled, checked-in device's certificate (mutual TLS),
operator routes with the real admin token, enrollment with a real unspent enrollment
token. Every check runs: no 5xx, every status and body within the schema, no
schema-invalid request accepted, no schema-valid request refused (the few operations
whose rules JSON Schema cannot state are named in the config, with the reason).

Two passes, device first: the operator pass may quarantine or revoke any device it finds.
Bounded and deterministic (``--generation-deterministic``, a fixed example count), so CI
sees the same requests every run; ``SCHEMATHESIS_EXAMPLES`` raises the count
(``make schema-check``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import World, start_world
from otaguard.server.client import FleetClient

HERE = Path(__file__).parent
#: examples per operation and phase: bounded so the test stays within its wall budget
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "8"))
#: the wall budget of both passes on the 2-core CI machine (measured: 63 s at 8 examples)
WALL_BUDGET_SECONDS = float(os.environ.get("SCHEMATHESIS_BUDGET", "90"))
DEVICE_TAGS = ("repository", "device", "enrollment", "health")


def _schemathesis() -> str:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert found is not None, "schemathesis is not installed (pip install -e '.[dev]')"
    return found


@pytest.fixture
def live(tmp_path: Path) -> World:
    """A server with a director and a published release, over TLS."""
    return start_world(tmp_path, director=True)


def _run(world: World, env: dict[str, str], tags: tuple[str, ...], *, include: bool) -> str:
    flag = "--include-tag" if include else "--exclude-tag"
    cmd = [
        _schemathesis(),
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "run",
        f"{world.server.base_url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        *(arg for tag in tags for arg in (flag, tag)),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"schemathesis reported problems:\n{out[-20000:]}"
    return out


def test_every_operation_honours_the_schema(live: World) -> None:
    world = live
    try:
        world.release("1.0.0")
        dev = world.device("schema-dev")
        dev.checkin()  # the repository routes serve a device only after a check-in
        assert world.server.ca_cert is not None
        with FleetClient(
            server_url=world.server.base_url,
            ca_cert=world.server.ca_cert,
            token=world.server.operator_token,
        ) as fleet:
            enroll_token = fleet.add_device("schema-enroll", "test-hw").token
        env = {
            **os.environ,
            "OTAGUARD_ST_CA": str(world.server.ca_cert),
            "OTAGUARD_ST_CERT": str(dev.paths.device_cert),
            "OTAGUARD_ST_KEY": str(dev.paths.device_key),
            "OTAGUARD_ST_TOKEN": world.server.operator_token,
            "OTAGUARD_ST_ENROLL_SERIAL": "schema-enroll",
            "OTAGUARD_ST_ENROLL_TOKEN": enroll_token,
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join(
                [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        start = time.monotonic()
        device_out = _run(world, env, DEVICE_TAGS, include=True)
        operator_out = _run(world, env, DEVICE_TAGS, include=False)
        elapsed = time.monotonic() - start
    finally:
        world.server.stop()
    for name, out in (("device", device_out), ("operator", operator_out)):
        # the figures, for make schema-check (pytest -s shows them)
        lines = [ln.strip(" =") for ln in out.splitlines()]
        summary = [
            ln for ln in lines if " generated" in ln or ln.startswith(("Tested:", "Selected:"))
        ]
        print(
            f"schemathesis {name} pass ({MAX_EXAMPLES} examples): {' | '.join(summary)}; "
            f"{next(ln for ln in reversed(lines) if ln)}"
        )
    print(f"schemathesis: both passes in {elapsed:.0f} s")
    # Both passes reached every operation (a filter or auth slip would test nothing).
    assert "Tested: 15" in device_out, device_out[-3000:]
    assert "Tested: 44" in operator_out, operator_out[-3000:]
    if MAX_EXAMPLES <= 8:  # the CI bound; a longer local run may take its time
        assert elapsed < WALL_BUDGET_SECONDS, f"schemathesis took {elapsed:.0f} s"
