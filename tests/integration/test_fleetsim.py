"""The fleet simulator against a real server with a director (real TLS, real database).

Simulated devices run the agent's own check-in, manifest, director verification and
selection code in one asyncio process; these tests drive it through its library API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HW, World, start_world
from otaguard.server.client import FleetClient
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
    dworld.release("1.1.0")
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
