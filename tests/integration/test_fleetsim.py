"""The fleet simulator against a real server with a director (real TLS, real database).

Simulated devices run the agent's own check-in, manifest, director verification and
selection code in one asyncio process; these tests drive it through its library API.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HW, World, start_world
from otaguard.server.client import FleetClient
from otaguard.sim.director_attacks import CompromisedDirector
from otaguard.sim.fleetsim import FleetSim, SimSettings


@pytest.fixture
def dworld(tmp_path: Path) -> Iterator[World]:
    """A world whose server runs a director; 1.0.0 published."""
    w = start_world(tmp_path, director=True)
    try:
        w.release("1.0.0")
        yield w
    finally:
        w.server.stop()


def _settings(w: World, devices: int, **kw: object) -> SimSettings:
    assert w.server.ca_cert is not None and w.director_root is not None
    return SimSettings(
        server_url=w.server.base_url,
        ca_cert=w.server.ca_cert,
        trusted_root=(w.repo.metadata_dir / "root.json").read_bytes(),
        director_root=w.director_root.read_bytes(),
        hardware_id=HW,
        devices=devices,
        identity_dir=w.tmp / "sim-identities",
        **kw,  # type: ignore[arg-type]
    )


def _fleet(w: World) -> FleetClient:
    return FleetClient(
        server_url=w.server.base_url, ca_cert=w.server.ca_cert, token=w.server.operator_token
    )


def _enrolled(w: World, devices: int, **kw: object) -> FleetSim:
    sim = FleetSim(_settings(w, devices, **kw))
    asyncio.run(sim.enroll(operator_token=w.server.operator_token))
    assert not sim.stats.errors, sim.stats.error_examples
    assert sim.stats.running == {"1.0.0": devices}
    return sim


def test_simulated_fleet_updates_through_the_director(dworld: World) -> None:
    """60 devices enroll, check in, verify the director's instruction and install 1.1.0."""
    sim = _enrolled(dworld, 60)
    dworld.release("1.1.0", security=True)
    stats = asyncio.run(sim.run(cycles=2))
    assert not stats.errors, stats.error_examples
    assert stats.checkins == 120
    assert stats.installs == {"1.1.0": 60}
    assert stats.running == {"1.1.0": 60}
    assert 0 < stats.percentile(50) <= stats.percentile(99)
    # The server saw it: each device's newest check-in reports 1.1.0, updated.
    with _fleet(dworld) as f:
        latest = f.checkins(sim.devices[0].serial).checkins[0]
    assert latest.running_version == "1.1.0"
    assert "outcome=updated" in latest.detail


def test_fail_rate_reaches_the_check_in_history(dworld: World) -> None:
    """A fraction of devices fail 1.1.0's health check: they stay on 1.0.0, report
    ``rolled-back`` in the next signed manifest (the server records it), and do not retry
    the rejected image; the others run 1.1.0."""
    sim = _enrolled(dworld, 100, fail_rate=0.3, fail_release="1.1.0")
    failing = {d.serial for d in sim.devices if d.fails}
    assert 15 <= len(failing) <= 45  # drawn from the serial: about 30 of 100
    dworld.release("1.1.0", security=True)
    stats = asyncio.run(sim.run(cycles=3))
    assert not stats.errors, stats.error_examples
    assert stats.failed_installs == {"1.1.0": len(failing)}  # once each: never retried
    assert stats.installs == {"1.1.0": 100 - len(failing)}
    assert stats.running == {"1.0.0": len(failing), "1.1.0": 100 - len(failing)}
    bad, good = sorted(failing)[0], next(d.serial for d in sim.devices if not d.fails)
    with _fleet(dworld) as f:
        bad_latest = f.checkins(bad).checkins[0]
        good_latest = f.checkins(good).checkins[0]
    assert bad_latest.running_version == "1.0.0"
    assert "outcome=rolled-back" in bad_latest.detail
    assert "version=1.1.0" in bad_latest.detail
    assert good_latest.running_version == "1.1.0"
    assert "outcome=updated" in good_latest.detail


def test_identity_cache_makes_a_rerun_skip_enrollment(dworld: World) -> None:
    """A second simulator on the same identity cache enrolls nobody and checks in."""
    first = _enrolled(dworld, 5)
    asyncio.run(first.run(cycles=1))
    again = FleetSim(_settings(dworld, 5))
    asyncio.run(again.enroll(operator_token=dworld.server.operator_token))
    assert [d.identity for d in again.devices] == [d.identity for d in first.devices]
    stats = asyncio.run(again.run(cycles=1))
    assert (stats.checkins, dict(stats.errors)) == (5, {})


def test_compromised_director_is_refused_counted_and_reported(dworld: World) -> None:
    """The director's real key names an image the image repository lacks: every
    simulated device refuses (counted, nothing installed) and flags it at its next
    check-in, which the server surfaces as an alert."""
    sim = _enrolled(dworld, 20)
    attacker = CompromisedDirector(dworld.server.app.state.director, dworld.server.data_dir)
    attacker.instruct(name="evil-9.9.9.img", length=1000, sha256="ab" * 32)
    stats = asyncio.run(sim.run(cycles=1))
    assert stats.errors == {"DirectorMismatchError": 20}
    assert "the image repository lacks" in stats.error_examples["DirectorMismatchError"]
    assert stats.running == {"1.0.0": 20} and not stats.installs
    attacker.restore()
    stats = asyncio.run(sim.run(cycles=1))
    assert stats.checkins == 40
    with _fleet(dworld) as f:
        alerts = f.checkins(sim.devices[0].serial).alerts
    assert ("attack", "device refused: director-image-mismatch") in [(k, d) for _, k, d in alerts]


def _cli(w: World, *args: str, root: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert w.server.ca_cert is not None and w.director_root is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    env["OTAGUARD_OPERATOR_TOKEN"] = w.server.operator_token
    base = [
        *w.cli(), "sim", "--server", w.server.base_url, "--ca", str(w.server.ca_cert),
        "--root", str(root or w.repo.metadata_dir / "root.json"),
        "--director-root", str(w.director_root), "--hardware-id", HW,
    ]  # fmt: skip
    return subprocess.run(
        [*base, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_sim_prints_the_summary(dworld: World) -> None:
    dworld.release("1.1.0", security=True)
    done = _cli(
        dworld, "--devices", "12", "--cycles", "2", "--initial-version", "1.0.0",
        "--fail-rate", "0.5", "--fail-release", "1.1.0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "24 in" in done.stdout  # check-ins
    assert "p99" in done.stdout
    assert re.search(r"version 1\.1\.0\s+│ \d+ running, \d+ installed, \d+ failed", done.stdout)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "0"], "at least one device"),
        (["--devices", "2", "--fail-rate", "0.5"], "--fail-rate needs --fail-release"),
        (["--devices", "2", "--fail-rate", "7"], "a fraction between 0 and 1"),
        (["--devices", "2", "--initial-version", "9.9.9"], "no release 9.9.9"),
    ],
)
def test_cli_sim_refuses_bad_input_in_one_line(
    dworld: World, args: list[str], message: str
) -> None:
    done = _cli(dworld, *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]  # argparse prints usage first
    assert "Traceback" not in done.stderr


def test_cli_sim_refuses_a_hostile_root_file(dworld: World) -> None:
    """A root file of 2 MB is not read whole: one line, exit 2, no traceback."""
    bad = dworld.tmp / "bad-root.json"
    bad.write_bytes(b"{" * 2_000_000)
    done = _cli(dworld, "--devices", "1", root=bad)
    assert done.returncode == 2, done.stderr
    assert "larger than" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
