"""Issue 7's rollout acceptance with the fleet simulator: 500 devices, a real server.

One enrolled fleet (module scope: enrolling 500 devices is the slow part) goes through a
4-phase rollout of a feature release to completion, then through a rollout of a release
that a fifth of the devices fail (``fail_rate``/``fail_release``, the simulator's injected
health-check failure): it halts by itself in an early phase and every device it never
admitted stays on the old version. The server (``otaguard server``, its own process) runs a
director and evaluates rollouts every 0.2 s; the devices run the agent's own check-in,
manifest and director verification code over mutual TLS (:mod:`otaguard.sim.fleetsim`),
driven in rounds by :mod:`otaguard.sim.rollout_driver`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator
from typing import Final

import pytest

from conftest import HW, World, same_passphrase
from otaguard.crypto import read_public_key
from otaguard.model.version import Version
from otaguard.repo import ImageRepository
from otaguard.repo.director import init_director
from otaguard.server import init_data_dir
from otaguard.server.channels import Rollout, admitted
from otaguard.server.rollout_client import RolloutClient
from otaguard.sim.fleetsim import FleetSim, SimSettings
from otaguard.sim.rollout_driver import drive_rollout, running
from process_server import ProcessServer

DEVICES: Final = 500
PHASES: Final = (1, 10, 50, 100)
#: a fifth of the fleet fails the bad release's health check (drawn from the serial)
FAIL_RATE: Final = 0.2
BAD: Final = "2.1.0"


@dataclasses.dataclass
class Fleet:
    world: World
    sim: FleetSim

    def client(self) -> RolloutClient:
        s = self.world.server
        return RolloutClient(server_url=s.base_url, ca_cert=s.ca_cert, token=s.operator_token)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """500 enrolled simulated devices on 1.0.0 against a server with a director (its own
    process, rollouts evaluated every 0.2 s)."""
    tmp = tmp_path_factory.mktemp("rollout-fleet")
    paths = init_data_dir(tmp / "server")
    repo = ImageRepository.init(tmp / "repo", keys_dir=tmp / "keys", passphrases=same_passphrase,
                                online_key=read_public_key(paths.online_public_key))  # fmt: skip
    director_root = init_director(
        tmp / "director",
        keys_dir=tmp / "director-keys",
        passphrases=same_passphrase,
        online_key=read_public_key(paths.director_public_key),
    )
    server = ProcessServer(tmp, repo=repo.dir, director=tmp / "director",
                           data_dir=paths.data_dir, ca=paths.ca_cert)  # fmt: skip
    w = World(tmp, repo, server, {}, {}, director_root)  # type: ignore[arg-type]
    try:
        w.release("1.0.0")
        sim = FleetSim(
            SimSettings(
                server_url=server.base_url,
                ca_cert=server.ca_cert,
                trusted_root=(repo.metadata_dir / "root.json").read_bytes(),
                director_root=director_root.read_bytes(),
                hardware_id=HW,
                devices=DEVICES,
                identity_dir=tmp / "identities",
                fail_rate=FAIL_RATE,
                fail_release=BAD,
            )
        )
        asyncio.run(sim.enroll(operator_token=server.operator_token))
        assert not sim.stats.errors, sim.stats.error_examples
        assert sim.stats.running == {"1.0.0": DEVICES}
        yield Fleet(w, sim)
    finally:
        server.stop()


def _model(name: str, version: str, phase: int) -> Rollout:
    """The rollout as the server holds it in ``phase`` (1-based), for :func:`admitted`."""
    return Rollout(name, Version.parse(version), "all", PHASES, 95, 5, phase=phase - 1)


def test_500_devices_go_through_a_4_phase_rollout_to_completion(fleet: Fleet) -> None:
    """Phases advance by themselves as the admitted devices report; no device installs
    before a phase admits it; the rollout completes and every device runs 2.0.0."""
    fleet.world.release("2.0.0")
    serials = [d.serial for d in fleet.sim.devices]
    with fleet.client() as c:
        c.create_rollout(release="2.0.0", group="all", phases=list(PHASES),
                         success_threshold=95, failure_threshold=5, name="r-500")  # fmt: skip
        rounds = drive_rollout(fleet.sim, c, "r-500")
    assert not fleet.sim.stats.errors, fleet.sim.stats.error_examples
    final = rounds[-1].status
    assert final.state == "completed", [(r.status.state, r.status.phase) for r in rounds]
    assert set(rounds[-1].running.values()) == {"2.0.0"}
    # every phase was passed through, in order
    phases = [r.status.phase for r in rounds if r.status.state == "active"]
    assert phases == sorted(phases), phases
    # no device ran 2.0.0 before the phase reached by the end of that round admitted it
    for r in rounds:
        if r.status.state == "active":
            inside = admitted(_model("r-500", "2.0.0", r.status.phase), serials)
            updated = {s for s, v in r.running.items() if v == "2.0.0"}
            assert updated <= inside, (r.round, r.status.phase, len(updated - inside))
    assert final.succeeded == final.admitted == DEVICES


def test_a_failing_release_halts_in_an_early_phase_and_the_rest_stays(fleet: Fleet) -> None:
    """2.1.0 fails on a fifth of the devices: the first failure reported halts the rollout
    in phase 1 or 2 (at that device's check-in, before the director answers it), naming
    the failed devices; every device polls on after the halt within the round, and those
    never admitted stay on the old version."""
    before = running(fleet.sim)  # 2.0.0 after the test above (1.0.0 if run alone)
    fleet.world.release(BAD)
    serials = [d.serial for d in fleet.sim.devices]
    failing = {d.serial for d in fleet.sim.devices if d.fails}
    with fleet.client() as c:
        c.create_rollout(release=BAD, group="all", phases=list(PHASES),
                         success_threshold=95, failure_threshold=5, name="r-bad")  # fmt: skip
        rounds = drive_rollout(fleet.sim, c, "r-bad")
    status = rounds[-1].status
    assert status.state == "halted", [(r.status.state, r.status.phase) for r in rounds]
    assert status.phase in (1, 2), status
    inside = admitted(_model("r-bad", BAD, status.phase), serials)
    assert status.admitted == len(inside)
    # the reason names the phase, the counts and failed devices with their error
    assert status.failed, status
    assert {s for s, _ in status.failed} <= inside & failing
    assert all("rolled-back" in e for _, e in status.failed)
    # (more failures than the halt counted may arrive: devices instructed just before it)
    assert re.search(
        rf"halted in phase {status.phase}: \d+ of {len(inside)} admitted", status.reason
    )
    assert "rolled-back" in status.reason
    now = rounds[-1].running
    on_bad = {s for s, v in now.items() if v == BAD}
    on_old = {s for s, v in now.items() if v == before[s]}
    assert on_bad <= inside - failing  # only admitted devices that do not fail it
    assert set(serials) - inside <= on_old  # never admitted: untouched
    assert failing & inside <= on_old  # failed and rolled back
    assert len(on_old) == DEVICES - len(on_bad) == DEVICES - fleet.sim.stats.installs[BAD]
    assert len(on_old) >= DEVICES - len(inside)
    assert not fleet.sim.stats.errors, fleet.sim.stats.error_examples
