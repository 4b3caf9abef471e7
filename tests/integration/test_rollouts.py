"""Rollouts and channels end to end: a real server with a director, real devices (mutual
TLS, signed manifests, A/B installs with health checks), the operator API with roles.

Devices poll in rounds (each ``update()`` is a check-in, the director's answer, and the
install it instructs); the server evaluates rollouts at check-in and periodically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import HW, World, start_world
from db_support import ENGINES, fresh_database
from otaguard.agent import Device
from otaguard.model.errors import (
    AccessDeniedError,
    DowngradeError,
    InsecureModeWarning,
    OperatorError,
)
from otaguard.model.version import Version
from otaguard.server.channels import Rollout, admitted
from otaguard.server.client import FleetClient
from otaguard.server.rollout_client import RolloutClient, RolloutInfo
from otaguard.server.storage import upgrade_database
from otaguard.server.storage.fleet_base import UnknownNameError
from otaguard.sim import make_image
from otaguard.sim.director_attacks import CompromisedDirector
from sbom_support import sbom_beside


@pytest.fixture
def rworld(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """A world whose server runs a director, evaluating rollouts every 0.2 s; 1.0.0 out.

    On the embedded SQLite database; a test marked
    ``@pytest.mark.parametrize("rworld", ENGINES, indirect=True)`` runs on PostgreSQL too.
    """
    engine = getattr(request, "param", "sqlite")
    with ExitStack() as stack:
        url = None
        if engine != "sqlite":
            url = stack.enter_context(fresh_database(request.config, engine, tmp_path))
            upgrade_database(url)
        w = start_world(tmp_path, director=True, rollout_interval=0.2, database_url=url)
        stack.callback(w.server.stop)
        w.release("1.0.0")
        yield w


def _client(w: World, token: str | None = None) -> RolloutClient:
    return RolloutClient(
        server_url=w.server.base_url,
        ca_cert=w.server.ca_cert,
        token=token or w.server.operator_token,
    )


def _running(dev: Device) -> str:
    booted = dev.status().booted
    assert booted is not None
    return booted.version


def _round(devs: list[Device]) -> dict[str, str]:
    """Every device polls once; what each runs afterwards."""
    for d in devs:
        d.update()
    return {d.config.serial: _running(d) for d in devs}


def _unhealthy(w: World, version: str) -> None:
    """The next ``w.release(version)`` publishes an image that fails its health check."""
    w.images[version] = make_image(
        w.tmp / f"fw-{version}.img", size=256 * 1024, seed=version, unhealthy=True
    )


def _fleet(w: World, n: int) -> list[Device]:
    return [w.device(f"d{i:02d}") for i in range(n)]


def test_a_four_phase_rollout_advances_to_completion(rworld: World) -> None:
    """Phase k admits exactly its share in the hashed order; nobody outside it installs;
    each phase advances by itself once its admitted devices report success."""
    devs = _fleet(rworld, 10)
    serials = [d.config.serial for d in devs]
    rworld.release("1.1.0")
    with _client(rworld) as c:
        r = c.create_rollout(
            release="1.1.0", group="all", phases=[10, 30, 60, 100],
            success_threshold=95, failure_threshold=5, name="r-feature",
        )  # fmt: skip
    assert (r.state, r.phase, r.percent) == ("active", 1, 10)
    seen: list[int] = []
    for _ in range(12):
        with _client(rworld) as c:
            status = c.rollout("r-feature")
        if status.state == "completed":
            break
        seen.append(status.phase)
        model = Rollout("r-feature", Version.parse("1.1.0"), "all", (10, 30, 60, 100), 95, 5,
                        phase=status.phase - 1)  # fmt: skip
        inside = admitted(model, serials)
        assert status.admitted == len(inside) == [1, 3, 6, 10][status.phase - 1]
        running = _round(devs)
        updated = {s for s, v in running.items() if v == "1.1.0"}
        # only admitted devices (of this phase, or the next one it advanced to meanwhile)
        later = admitted(dataclasses.replace(model, phase=min(status.phase, 3)), serials)
        assert updated <= inside | later, (status.phase, updated, inside)
    with _client(rworld) as c:
        final = c.rollout("r-feature")
    assert final.state == "completed", final
    assert seen[0] == 1 and seen == sorted(seen) and len(set(seen)) >= 3, seen
    assert all(_running(d) == "1.1.0" for d in devs)
    assert final.succeeded == final.admitted == 10


@pytest.mark.parametrize("rworld", ENGINES, indirect=True)
def test_a_failing_rollout_halts_by_itself_and_the_rest_stays(rworld: World) -> None:
    """An image failing its health check: the first admitted device rolls back, reports it,
    and the rollout halts in phase 1, naming the device and its error; the untouched
    devices stay on 1.0.0 whatever they poll."""
    devs = _fleet(rworld, 10)
    _unhealthy(rworld, "1.1.0")
    rworld.release("1.1.0")
    with _client(rworld) as c:
        c.create_rollout(
            release="1.1.0", group="all", phases=[10, 50, 100],
            success_threshold=95, failure_threshold=5, name="r-bad",
        )  # fmt: skip
    for _ in range(3):
        assert set(_round(devs).values()) == {"1.0.0"}
    with _client(rworld) as c:
        status = c.rollout("r-bad")
    assert status.state == "halted" and status.phase == 1, status
    assert status.failed is not None and len(status.failed) == 1
    serial, error = status.failed[0]
    assert "rolled-back" in error
    assert f"{serial} (rolled-back" in status.reason and "1 of 1 admitted failed" in status.reason
    # exactly one device ever tried it
    tried = [d for d in devs if d.status().booted and _last_outcome(d) == "rolled-back"]
    assert [d.config.serial for d in tried] == [serial]


def _last_outcome(dev: Device) -> str | None:
    from otaguard.agent.install import InstallState

    result = InstallState.load(dev.paths.install_state).last_result or {}
    return result.get("outcome")


def test_security_release_reaches_every_device_even_opted_out_without_a_rollout(
    rworld: World,
) -> None:
    """Security 1.0.1 goes out at once, to a feature-opted-out device and group too; a
    feature 1.1.0 without a rollout goes nowhere, and its rollout skips the opted-out."""
    devs = _fleet(rworld, 4)
    with _client(rworld) as c:
        assert c.set_device_channels("d00", no_features=True) is True
        c.create_group("lab", where=None)
        c.change_members("lab", add=["d01"])
        g = c.set_group_channels("lab", no_features=True)
        assert g.no_features and g.security_delay_seconds == 0
    rworld.release("1.0.1", security=True)
    assert set(_round(devs).values()) == {"1.0.1"}
    rworld.release("1.1.0")
    assert set(_round(devs).values()) == {"1.0.1"}  # a feature release needs a rollout
    with _client(rworld) as c:
        c.create_rollout(release="1.1.0", group="all", phases=[100], success_threshold=50,
                         failure_threshold=50)  # fmt: skip
    running = _round(devs)
    assert running == {"d00": "1.0.1", "d01": "1.0.1", "d02": "1.1.0", "d03": "1.1.0"}


def test_security_delay_postpones_a_group_and_windows_make_rollouts_wait(rworld: World) -> None:
    devs = _fleet(rworld, 3)
    closed_day = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).strftime("%a")
    with _client(rworld) as c:
        c.create_group("plant", where=None)
        c.change_members("plant", add=["d00"])
        c.set_group_channels("plant", security_delay_seconds=2 * 86400)
        c.create_group("night", where=None)
        c.change_members("night", add=["d01"])
        g = c.set_group_channels("night", window=f"{closed_day} 00:00-24:00")
        assert g.window == f"{closed_day} 00:00-24:00"
    rworld.release("1.0.1", security=True)
    assert _round(devs) == {"d00": "1.0.0", "d01": "1.0.1", "d02": "1.0.1"}
    rworld.release("1.1.0")
    with _client(rworld) as c:
        c.create_rollout(release="1.1.0", group="all", phases=[100], success_threshold=50,
                         failure_threshold=50)  # fmt: skip
    running = _round(devs)
    assert running["d01"] == "1.0.1"  # outside its window: told to wait
    assert running["d02"] == "1.1.0"
    with _client(rworld) as c:
        c.set_group_channels("night", window="")  # removed
    assert _round(devs)["d01"] == "1.1.0"


@pytest.mark.parametrize("rworld", ENGINES, indirect=True)
def test_pause_resume_cancel(rworld: World) -> None:
    devs = _fleet(rworld, 2)
    rworld.release("1.1.0")
    with _client(rworld) as c:
        c.create_rollout(release="1.1.0", group="all", phases=[100], success_threshold=100,
                         failure_threshold=0, name="r")  # fmt: skip
        assert c.rollout_action("r", "pause").state == "paused"
        with pytest.raises(OperatorError, match="cannot pause rollout r: it is paused"):
            c.rollout_action("r", "pause")
    assert set(_round(devs).values()) == {"1.0.0"}  # paused: nobody new
    with _client(rworld) as c:
        assert c.rollout_action("r", "resume").state == "active"
    assert _round(devs)["d00"] == "1.1.0"
    with _client(rworld) as c:
        assert c.rollout_action("r", "cancel").state == "cancelled"
        with pytest.raises(OperatorError, match="cannot resume rollout r: it is cancelled"):
            c.rollout_action("r", "resume")
        assert [r.name for r in c.rollouts()] == ["r"]
        actions = [(e.action, e.target) for e in c.audit() if e.action.startswith("rollout.")]
    assert actions[:4] == [("rollout.create", "r"), ("rollout.pause", "r"),
                           ("rollout.pause", "r"), ("rollout.resume", "r")]  # fmt: skip
    assert ("rollout.cancel", "r") in actions


def test_roles_viewer_reads_release_manager_changes(rworld: World) -> None:
    rworld.release("1.1.0")
    with _client(rworld) as admin:
        viewer = admin.add_operator("ann", "viewer").token
        operator = admin.add_operator("bob", "operator").token
        manager = admin.add_operator("cat", "release-manager").token
    kw = {"release": "1.1.0", "group": "all", "phases": [100], "success_threshold": 90,
          "failure_threshold": 10, "name": "r"}  # fmt: skip
    for token in (viewer, operator):
        with _client(rworld, token) as c, pytest.raises(AccessDeniedError, match="release-manager"):
            c.create_rollout(**kw)  # type: ignore[arg-type]
        with _client(rworld, token) as c, pytest.raises(AccessDeniedError, match="release-manager"):
            c.set_group_channels("all", no_features=True)
    with _client(rworld, manager) as c:
        c.create_rollout(**kw)  # type: ignore[arg-type]
    with _client(rworld, viewer) as c:
        assert c.rollout("r").state == "active"
        with pytest.raises(AccessDeniedError, match="release-manager"):
            c.rollout_action("r", "pause")
    with _client(rworld) as c:
        refused = [e for e in c.audit() if e.action == "rollout.create" and e.actor != "cat"]
        assert {e.actor for e in refused} == {"ann", "bob"}
        assert all(e.result.startswith("refused") for e in refused)


def test_refusals_of_bad_rollouts_name_their_cause(rworld: World) -> None:
    with _client(rworld) as c:
        with pytest.raises(OperatorError, match=r"release 9\.9\.9 is not served"):
            c.create_rollout(release="9.9.9", group="all", phases=[100], success_threshold=1,
                             failure_threshold=1)  # fmt: skip
        with pytest.raises(OperatorError, match=r"increasing percentages"):
            c.create_rollout(release="1.0.0", group="all", phases=[50, 10, 100],
                             success_threshold=1, failure_threshold=1)  # fmt: skip
        with pytest.raises(OperatorError, match=r"body.window: .* is not of the form"):
            c.create_rollout(release="1.0.0", group="all", phases=[100], success_threshold=1,
                             failure_threshold=1, window="whenever")  # fmt: skip
        with pytest.raises(OperatorError, match=r"7 days|less than or equal"):
            c.set_group_channels("all", security_delay_seconds=8 * 86400)
        with pytest.raises(UnknownNameError, match="no group named 'nope'"):
            c.create_rollout(release="1.0.0", group="nope", phases=[100], success_threshold=1,
                             failure_threshold=1)  # fmt: skip


def _cli_env(w: World) -> dict[str, str]:
    return {
        "OTAGUARD_SERVER": w.server.base_url,
        "OTAGUARD_CA": str(w.server.ca_cert),
        "OTAGUARD_OPERATOR_TOKEN": w.server.operator_token,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


def _cli(w: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*w.cli(), *args], env=_cli_env(w), capture_output=True, text=True, check=False,
        timeout=60,
    )  # fmt: skip


def test_release_check_flags_an_unknown_hardware_id(
    rworld: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in a hardware id is flagged: WARNING in the server log, ``release check``
    lists it and exits 1."""
    rworld.device("d00")
    ok = _cli(rworld, "release", "check")
    assert ok.returncode == 0 and "every release names" in ok.stdout, ok.stderr
    with caplog.at_level("WARNING", logger="otaguard.server.rollouts"):
        image = rworld.image("1.2.0")
        rworld.repo.add_release(image, version="1.2.0", hardware_ids=[HW + "-typo"],
                                security=False, security_counter=None,
                                sbom=sbom_beside(image))  # fmt: skip
        rworld.wait_served()
        bad = _cli(rworld, "release", "check")
        for _ in range(50):
            if "no registered device has" in caplog.text:
                break
            import time

            time.sleep(0.1)
    assert bad.returncode == 1
    assert f"names hardware id {HW}-typo, which no registered device has" in bad.stdout
    assert f"hardware id {HW}-typo, which no registered device has" in caplog.text


def test_by_hand_through_the_cli(rworld: World) -> None:
    """The README's by-hand rollout: create, status, pause, resume, cancel; hostile input
    is a one-line error."""
    devs = _fleet(rworld, 2)
    rworld.release("1.1.0")
    run = _cli(rworld, "rollout", "create", "--release", "1.1.0", "--group", "all",
               "--phases", "50,100", "--success-threshold", "95", "--failure-threshold", "5",
               "--window", "daily 00:00-24:00", "--name", "cli")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "rollout cli: 1.1.0 to group all, active, phase 1/2 (50%" in run.stdout
    _round(devs)
    _round(devs)
    status = _cli(rworld, "rollout", "status", "cli")
    assert status.returncode == 0, status.stderr
    assert "members 2" in status.stdout
    assert _cli(rworld, "rollout", "pause", "cli").stdout.count("paused") >= 1
    listed = _cli(rworld, "rollout", "list")
    assert "cli  1.1.0  all  paused" in listed.stdout
    assert "active" in _cli(rworld, "rollout", "resume", "cli").stdout
    assert "cancelled" in _cli(rworld, "rollout", "cancel", "cli").stdout
    again = _cli(rworld, "rollout", "cancel", "cli")
    assert again.returncode != 0 and len(again.stderr.strip().splitlines()) == 1
    assert "cannot cancel rollout cli: it is cancelled" in again.stderr
    for bad in (
        ["rollout", "create", "--release", "1.1.0", "--group", "all", "--phases", "a,b"],
        ["rollout", "create", "--release", "1.1.0", "--group", "all", "--window", "x" * 100],
        ["rollout", "status", "no/such"],
        ["group", "set", "all", "--security-delay", "8d"],
        ["group", "set", "all"],
        ["fleet", "set", "ghost", "--no-features"],
    ):
        res = _cli(rworld, *bad)
        assert res.returncode != 0, bad
        assert "Traceback" not in res.stderr, (bad, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 or lines[0].startswith("usage:"), (bad, res.stderr)
    gs = _cli(rworld, "group", "set", "all", "--no-features", "--security-delay", "2d")
    assert gs.returncode == 0, gs.stderr
    assert "features off, security delay 172800s" in gs.stdout
    fs = _cli(rworld, "fleet", "set", "d00", "--no-features")
    assert fs.returncode == 0 and "d00: features off" in fs.stdout


def test_rollout_info_parses_strictly() -> None:
    from otaguard.model.errors import TransportError

    with pytest.raises(TransportError, match="rollout answer is malformed"):
        RolloutInfo.parse({"name": 1})


def test_a_failure_report_halts_the_rollout_at_that_check_in(tmp_path: Path) -> None:
    """No periodic evaluation in time (an hour apart), no status read (it evaluates):
    the failing device's own next check-in halts the rollout before the director answers."""
    w = start_world(tmp_path, director=True, rollout_interval=3600)
    try:
        w.release("1.0.0")
        devs = _fleet(w, 2)
        _unhealthy(w, "1.1.0")
        w.release("1.1.0")
        with _client(w) as c:
            c.create_rollout(release="1.1.0", group="all", phases=[50, 100],
                             success_threshold=95, failure_threshold=5, name="r")  # fmt: skip
        _round(devs)  # the admitted device installs, fails its health check, rolls back
        with _client(w) as c:
            assert [r.state for r in c.rollouts()] == ["active"]  # not reported yet
        _round(devs)  # its check-in reports the rolled-back install
        with _client(w) as c:
            (listed,) = c.rollouts()
        assert listed.state == "halted" and "rolled-back" in listed.reason
    finally:
        w.server.stop()


def test_the_periodic_task_advances_a_phase_nobody_reports_on(rworld: World) -> None:
    """Success reported while paused; after resume no device checks in and nobody reads
    the status: the server's periodic evaluation advances the phase by itself."""
    import time

    devs = _fleet(rworld, 2)
    rworld.release("1.1.0")
    with _client(rworld) as c:
        c.create_rollout(release="1.1.0", group="all", phases=[50, 100],
                         success_threshold=95, failure_threshold=5, name="r")  # fmt: skip
    _round(devs)  # the admitted device installs
    with _client(rworld) as c:
        c.rollout_action("r", "pause")
    _round(devs)  # it reports success; paused: nothing changes
    with _client(rworld) as c:
        assert c.rollout_action("r", "resume").phase == 1
        for _ in range(50):
            (listed,) = c.rollouts()
            if listed.phase == 2:
                break
            time.sleep(0.1)
    assert (listed.state, listed.phase) == ("active", 2)


def test_a_security_fix_on_an_older_line_reaches_the_devices_that_stayed_on_it(
    rworld: World,
) -> None:
    """1.1.0 (feature) is rolled out to a group; d00 opted out of features and d01 is not
    in the group: both stay on 1.0.0. The security fix 1.0.1 on the older line is then
    published (``release add`` accepts it below 1.1.0) and reaches exactly them; the
    devices on 1.1.0 are never offered it, and a director instruction for it forged with
    the director's real key is refused by their own floor and reported. 1.0.1 starts a
    new fix epoch, so 1.1.0 (without the fix) is not offered to its devices either, even
    once they join the completed rollout's group; 1.1.1, the fix on the newer line,
    reaches everybody."""
    devs = _fleet(rworld, 4)
    rworld.release("1.1.0")
    with _client(rworld) as c:
        c.set_device_channels("d00", no_features=True)
        c.create_group("fleet", where=None)
        c.change_members("fleet", add=["d00", "d02", "d03"])
        c.create_rollout(release="1.1.0", group="fleet", phases=[100], success_threshold=50,
                         failure_threshold=50, name="r-110")  # fmt: skip
    assert _round(devs) == {"d00": "1.0.0", "d01": "1.0.0", "d02": "1.1.0", "d03": "1.1.0"}
    fix = rworld.release("1.0.1", security=True)
    assert (fix.info.release_type, fix.info.security_counter) == ("security", 1)
    assert _round(devs) == {"d00": "1.0.1", "d01": "1.0.1", "d02": "1.1.0", "d03": "1.1.0"}
    # the server does not offer 1.0.1 to a device on 1.1.0 (it says none) ...
    assert devs[2].update().outcome == "up-to-date"
    # ... and a forged instruction for it is refused by the device's floor, and reported
    attacker = CompromisedDirector(rworld.server.app.state.director, rworld.server.data_dir)
    attacker.instruct(name=fix.path, length=fix.length, sha256=fix.sha256, version="1.0.1",
                      security_counter=1)  # fmt: skip
    with pytest.raises(DowngradeError, match=r"version 1\.0\.1 < running 1\.1\.0"):
        devs[3].update()
    attacker.restore()
    devs[3].checkin()
    with FleetClient(server_url=rworld.server.base_url, ca_cert=rworld.server.ca_cert,
                     token=rworld.server.operator_token) as f:  # fmt: skip
        alerts = [(kind, detail) for _, kind, detail in f.checkins("d03").alerts]
    assert ("attack", "device refused: downgrade") in alerts, alerts
    # 1.1.0 (counter 0) lacks the fix of 1.0.1 (counter 1): not offered to d01 even in the
    # completed rollout's group; 1.1.1 (the newer line's fix, counter 2) reaches everybody
    with _client(rworld) as c:
        c.change_members("fleet", add=["d01"])
        assert c.rollout("r-110").state == "completed"
    assert _round(devs)["d01"] == "1.0.1"
    rworld.release("1.1.1", security=True)
    assert set(_round(devs).values()) == {"1.1.1"}


def test_a_device_without_a_director_root_warns_at_every_update_that_it_ignores_the_director(
    rworld: World,
) -> None:
    """The named unsafe mode (ADR 0011): without a director root a device picks the newest
    release itself, so a feature release reaches it without a rollout; every update warns
    that the server's director is ignored. A device with the root is told none."""
    alone = rworld.device("alone", director_root=None)
    steered = rworld.device("steered")
    rworld.release("1.1.0")
    with pytest.warns(InsecureModeWarning, match="ignoring the server's director"):
        assert alone.update().to_version == "1.1.0"
    with pytest.warns(InsecureModeWarning, match="ignoring the server's director"):
        assert alone.update().outcome == "up-to-date"
    assert steered.update().outcome == "up-to-date"
    assert _running(steered) == "1.0.0"


def test_cli_sim_drives_a_rollout_until_it_halts(rworld: World) -> None:
    """``otaguard sim --until-rollout``: simulated devices poll in rounds, half of them
    fail 1.1.0's health check, the rollout halts by itself; each round's status is printed,
    then the reason; exit 0 (the rollout settled, no device error)."""
    rworld.release("1.1.0")
    with _client(rworld) as c:
        c.create_rollout(release="1.1.0", group="all", phases=[50, 100], success_threshold=95,
                         failure_threshold=5, name="cli-sim")  # fmt: skip
    assert rworld.director_root is not None
    done = _cli(
        rworld, "sim", "--root", str(rworld.repo.metadata_dir / "root.json"),
        "--director-root", str(rworld.director_root), "--hardware-id", HW,
        "--initial-version", "1.0.0", "--devices", "8", "--fail-rate", "0.5",
        "--fail-release", "1.1.0", "--until-rollout", "cli-sim",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"round 1: (active|halted), phase \d/2", done.stdout), done.stdout
    assert re.search(r"rollout cli-sim halted: halted in phase \d: \d+ of \d+ admitted failed",
                     done.stdout.replace("\n", " ")), done.stdout  # fmt: skip
    assert "Traceback" not in done.stderr
    with _client(rworld) as c:
        assert c.rollout("cli-sim").state == "halted"
