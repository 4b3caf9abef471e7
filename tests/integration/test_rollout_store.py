"""The rollout store's SQL adapter on SQLite and PostgreSQL: rollouts round-trip, a state
change is compare-and-set, channel settings, first-seen times recorded once, and a
rollout's evaluation is a few set-based queries whatever the group's size."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, update
from sqlalchemy.engine import Engine

from otaguard.model.manifest import BootMeasurement, DeviceManifest, InstalledTarget
from otaguard.model.version import Version
from otaguard.server._signal import ChangeSignal
from otaguard.server.channels import GroupPolicy, Rollout, Window, evaluate
from otaguard.server.inventory import Inventory
from otaguard.server.rollouts import ChannelPolicy, Rollouts
from otaguard.server.storage.assignments import SQLAssignmentStore
from otaguard.server.storage.checkins import SQLCheckinStore, checkins_table
from otaguard.server.storage.devices import SQLDeviceStore, devices_table
from otaguard.server.storage.fleet_base import NameExistsError, UnknownNameError
from otaguard.server.storage.inventory import SQLInventoryStore
from otaguard.server.storage.notify import ROLLOUT_LIST_SECONDS, NotifyingRolloutStore
from otaguard.server.storage.rollouts import SQLRolloutStore, rollouts_table
from otaguard.server.storage.unit import unit_of_work

NOW = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)


def _rollout(**kw: object) -> Rollout:
    base: dict[str, object] = {
        "name": "r1",
        "version": Version.parse("1.2.0-rc.1"),
        "group": "pilot",
        "phases": (1, 10, 50, 100),
        "success_threshold": 95,
        "failure_threshold": 5,
        "window": Window.parse("Mon-Fri 02:00-05:00"),
    }
    return Rollout(**(base | kw))  # type: ignore[arg-type]


def _sql_rollouts(db_engine: Engine) -> tuple[SQLRolloutStore, Rollouts]:
    """The rollout store and the rollouts over the SQL stores, no releases, at NOW."""
    store = SQLRolloutStore(db_engine)
    inventory = Inventory(
        devices=SQLDeviceStore(db_engine),
        checkins=SQLCheckinStore(db_engine),
        store=SQLInventoryStore(db_engine),
    )
    return store, Rollouts(store=store, inventory=inventory, releases=list, clock=lambda: NOW)


def test_rollouts_round_trip_and_names_are_unique(db_engine: Engine) -> None:
    store = SQLRolloutStore(db_engine)
    r = _rollout()
    store.create(r, now=NOW)
    assert store.get("r1") == r
    with pytest.raises(NameExistsError, match="a rollout named 'r1' exists"):
        store.create(r, now=NOW)
    with pytest.raises(UnknownNameError, match="no rollout named 'r2'"):
        store.get("r2")
    store.create(_rollout(name="a0", window=None), now=NOW)
    assert [x.name for x in store.list()] == ["a0", "r1"]


def test_a_change_is_compare_and_set_on_the_state(db_engine: Engine) -> None:
    store = SQLRolloutStore(db_engine)
    r = _rollout()
    store.create(r, now=NOW)
    halted = dataclasses.replace(r, state="halted", reason="x" * 10_000)
    assert store.change(halted, expect_state="active", now=NOW)
    # a second process that decided from "active" does not undo the halt
    advanced = dataclasses.replace(r, phase=1)
    assert not store.change(advanced, expect_state="active", now=NOW)
    got = store.get("r1")
    assert got.state == "halted" and got.phase == 0 and len(got.reason) == 4000


def test_channel_settings(db_engine: Engine) -> None:
    store = SQLRolloutStore(db_engine)
    assert store.group_policies() == {}
    p = GroupPolicy("plant", True, dt.timedelta(days=2), Window.parse("Sat,Sun 00:00-06:00"))
    store.set_group_policy(p)
    store.set_group_policy(dataclasses.replace(p, no_features=False))
    assert store.group_policies() == {"plant": dataclasses.replace(p, no_features=False)}
    assert store.device_no_features("d1") is False
    store.set_device_no_features("d1", True)
    assert store.device_no_features("d1") is True
    store.set_device_no_features("d1", False)
    assert store.device_no_features("d1") is False
    assert "d1" not in store.group_policies()  # a device's setting is not a group's


def test_first_seen_is_recorded_once(db_engine: Engine) -> None:
    store = SQLRolloutStore(db_engine)
    assert store.first_seen(["a.img"], now=NOW) == {"a.img": NOW}
    later = NOW + dt.timedelta(hours=5)
    assert store.first_seen(["a.img", "b.img"], now=later) == {"a.img": NOW, "b.img": later}


# -- set-based evaluation (issue 7: a rollout of 10,000 members) --------------------------
def _manifest(serial: str, *, running: str, result: dict[str, str], checked: bool = True) -> bytes:
    """A stored manifest envelope as the check-in store keeps it (it was verified when
    received; its signatures do not matter here). ``checked=False``: one stored before
    manifests refused unprintable text."""
    signed = DeviceManifest(
        serial=serial,
        nonce="n" * 32,
        time="2026-11-22T08:00:00+00:00",
        installed=InstalledTarget(f"fw-{running}.img", 1, "a" * 64, running, 0),
        last_result=result,
        boot=BootMeasurement(sha256="a" * 64, slot="A", attested=False),
        quote=None,
    ).to_dict()
    if checked:
        DeviceManifest.from_dict(signed)  # what the evaluation parses must be valid
    return json.dumps({"signed": signed, "signatures": []}).encode()


Rows = list[dict[str, Any]]


def _fleet_rows(n: int, *, runs: int, failed: int) -> tuple[Rows, Rows]:
    """``n`` devices: the first ``runs`` run 2.0.0, the next ``failed`` rolled it back, the
    rest run 1.0.0 (each with an older check-in that said something else first)."""
    devices, checkins = [], []
    for i in range(n):
        serial = f"s{i:05d}"
        devices.append({"serial": serial, "hardware_id": "hw", "status": "enrolled",
                        "reason": "", "created_at": NOW, "updated_at": NOW})  # fmt: skip
        if i < runs:
            last = ("2.0.0", {"outcome": "updated", "version": "2.0.0"})
        elif i < runs + failed:
            last = ("1.0.0", {"outcome": "rolled-back", "version": "2.0.0", "error": "health"})
        else:
            last = ("1.0.0", {})
        # an older check-in first: a failure of 2.0.0 for the successes (only the last
        # counts), a success for the rest (it is not what they say now)
        first = ("1.0.0", {"outcome": "failed", "version": "2.0.0"}) if i < runs else (
            "2.0.0", {"outcome": "updated", "version": "2.0.0"})  # fmt: skip
        for k, (running, result) in enumerate((first, last)):
            checkins.append({
                "serial": serial, "cert_serial": "c", "time": NOW + dt.timedelta(seconds=k),
                "device_time": "", "running_version": running, "target": "",
                "boot_sha256": "a" * 64, "attested": False, "reset_count": None,
                "outcome": "accepted", "detail": "",
                "manifest": _manifest(serial, running=running, result=result),
            })  # fmt: skip
    return devices, checkins


def _load_fleet(engine: Engine, n: int, *, runs: int, failed: int) -> None:
    devices, checkins = _fleet_rows(n, runs=runs, failed=failed)
    with engine.begin() as conn:
        conn.execute(insert(devices_table), devices)
        # the older check-ins first (ids follow the order check-ins were recorded in)
        conn.execute(insert(checkins_table), checkins[0::2])
        conn.execute(insert(checkins_table), checkins[1::2])


def test_last_reports_are_one_query_of_the_newest_check_ins(db_engine: Engine) -> None:
    """Only each device's newest check-in counts; successes come without a manifest,
    failures with theirs; devices saying nothing about the release are not returned."""
    _load_fleet(db_engine, 6, runs=2, failed=1)
    reports = SQLRolloutStore(db_engine).last_reports(Version.parse("2.0.0"))
    by = {r.serial: r for r in sorted(reports, key=lambda r: r.serial)}
    assert sorted(by) == ["s00000", "s00001", "s00002"]
    assert by["s00000"].running_version == "2.0.0" and by["s00000"].manifest is None
    failed = by["s00002"].manifest
    assert failed is not None and json.loads(failed)["signed"]["last_result"]["outcome"] == (
        "rolled-back"
    )
    assert SQLRolloutStore(db_engine).last_reports(Version.parse("2.0.1")) == []


def _count_queries(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _log(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    _count_queries.last = _log  # type: ignore[attr-defined]
    return seen


@pytest.mark.parametrize("size", [20, 10_000])
def test_evaluating_a_rollout_costs_the_same_queries_for_20_or_10000_members(
    db_engine: Engine, size: int
) -> None:
    """Phase evaluation is set-based: the number of SQL statements does not grow with the
    group (the former per-member history read made it 10,000 statements), and the
    result is the pure evaluation's from the outcomes the fleet was built with."""
    _load_fleet(db_engine, size, runs=size // 2, failed=size // 4)
    store, rollouts = _sql_rollouts(db_engine)
    r = _rollout(version=Version.parse("2.0.0"), group="all", window=None,
                 phases=(1, 10, 50, 100), success_threshold=95, failure_threshold=30)  # fmt: skip
    store.create(r, now=NOW)
    queries = _count_queries(db_engine)
    status = rollouts.status(store.get("r1"))
    # what the pure evaluation says from the outcomes the fleet was built with
    runs, failed = size // 2, size // 4
    outcomes = {f"s{i:05d}": ("success", "") for i in range(runs)} | {
        f"s{i:05d}": ("failure", "rolled-back: health") for i in range(runs, runs + failed)
    }
    expected = evaluate(r, [f"s{i:05d}" for i in range(size)], outcomes)
    assert status.evaluation == expected
    assert store.get("r1") == expected.rollout
    assert status.members == size
    # reading the rollout, its members, the last reports; writing a change at most, after
    # re-reading the rollout once the fleet monitor let the phase advance (ADR 0026); and
    # the store.get above: a constant, whatever the group's size
    assert len(queries) <= 6, queries


def test_a_hostile_manifest_does_not_stop_the_evaluation(db_engine: Engine) -> None:
    """A stored manifest from before check-ins refused unprintable text may carry a NUL
    escape and a lone surrogate in its error (which a JSON cast in SQL, e.g. PostgreSQL's
    jsonb, refuses for the whole query): they do not keep the rollout from counting the
    failure and halting."""
    devices, checkins = _fleet_rows(4, runs=0, failed=0)
    hostile = {"outcome": "failed", "version": "2.0.0", "error": "bad\u0000\ud800x"}
    for row in checkins:
        if row["serial"] == "s00000":
            row["manifest"] = _manifest("s00000", running="1.0.0", result=hostile, checked=False)
    with db_engine.begin() as conn:
        conn.execute(insert(devices_table), devices)
        conn.execute(insert(checkins_table), checkins)
    store, rollouts = _sql_rollouts(db_engine)
    store.create(_rollout(version=Version.parse("2.0.0"), group="all", window=None,
                          phases=(100,)), now=NOW)  # fmt: skip
    status = rollouts.status(store.get("r1"))
    assert status.evaluation.rollout.state == "halted"
    assert "s00000 (failed: bad??x)" in status.evaluation.rollout.reason
    assert store.get("r1").state == "halted"  # the reason with it was written


def test_a_check_in_decision_does_not_read_past_rollouts(db_engine: Engine) -> None:
    """Rollouts of what a device runs or older change nothing for it: the director's
    decision reads no member list for them, so its statements do not grow with them."""
    _load_fleet(db_engine, 20, runs=20, failed=0)  # everybody runs 2.0.0
    store, rollouts = _sql_rollouts(db_engine)
    policy = ChannelPolicy(rollouts=rollouts)

    def statements() -> int:
        queries = _count_queries(db_engine)
        decision = policy.decision(serial="s00000", hardware_id="hw",
                                   running=Version.parse("2.0.0"), assignment=None,
                                   releases=[])  # fmt: skip
        assert decision.release is None
        count = len(queries)
        event.remove(db_engine, "before_cursor_execute", _count_queries.last)  # type: ignore[attr-defined]
        return count

    def past(k: int) -> None:
        old = _rollout(name=f"old{k}", version=Version.parse(f"1.{k}.0"), group="all",
                       window=None, state="completed", phase=3)  # fmt: skip
        store.create(old, now=NOW)

    past(0)
    store.create(_rollout(name="same", version=Version.parse("2.0.0"), group="all",
                          window=None), now=NOW)  # fmt: skip
    one = statements()
    for k in range(1, 8):
        past(k)
    assert statements() == one


def test_the_orphan_check_reads_the_fleets_hardware_ids_in_one_query(db_engine: Engine) -> None:
    """The evaluator's periodic orphan check (every few seconds in every worker) reads the
    distinct hardware ids in one statement, not every device: its cost does not grow with
    the fleet (ADR 0019), and a release for a hardware id no device has is still named."""
    from otaguard.model.release import ReleaseInfo
    from otaguard.server.director import DirectorRelease

    _load_fleet(db_engine, 2_000, runs=0, failed=0)
    devices = SQLDeviceStore(db_engine)
    devices.add("odd-1", "other-hw", token_hash="x" * 64, token_expires=NOW, now=NOW)

    def release(version: str, hw: str) -> DirectorRelease:
        info = ReleaseInfo.from_custom(
            {"version": version, "hardware_ids": [hw], "release_type": "feature",
             "security_counter": 1}
        )  # fmt: skip
        return DirectorRelease(f"fw-{version}", 1, {"sha256": "0" * 64}, info)

    good, typo = release("2.0.0", "hw"), release("2.0.1", "typo-hw")
    inventory = Inventory(
        devices=devices, checkins=SQLCheckinStore(db_engine), store=SQLInventoryStore(db_engine)
    )
    rollouts = Rollouts(
        store=SQLRolloutStore(db_engine),
        inventory=inventory,
        releases=lambda: [good, typo],
        clock=lambda: NOW,
    )

    def listed() -> list[object]:
        raise AssertionError("the orphan check listed every device")

    devices.list = listed  # type: ignore[method-assign]
    queries = _count_queries(db_engine)
    assert devices.hardware_ids() == {"hw", "other-hw"}
    assert rollouts.orphans() == [(typo, ("typo-hw",))]
    assert len(queries) == 2, queries  # one read each, whatever the fleet's size


def test_a_status_read_answers_the_monitors_pause_not_the_advance_it_stopped(
    db_engine: Engine,
) -> None:
    """Fleet monitoring pauses a rollout just before a phase advance (ADR 0026): the
    advance is then not stored, and the status read that triggered it answers the stored
    pause (it answered the unstored advance: "active, phase 2" for a paused rollout)."""
    _load_fleet(db_engine, 20, runs=20, failed=0)
    store, rollouts = _sql_rollouts(db_engine)
    store.create(_rollout(version=Version.parse("2.0.0"), group="all", window=None,
                          phases=(10, 50, 100)), now=NOW)  # fmt: skip

    def pause(current: Rollout) -> None:  # what Monitor.before_advance does on a finding
        paused = dataclasses.replace(current, state="paused", reason="paused by alert x: y")
        assert store.change(paused, expect_state="active", now=NOW)

    rollouts.before_advance = pause
    status = rollouts.status(store.get("r1"))
    stored = store.get("r1")
    assert (stored.state, stored.phase) == ("paused", 0)
    assert status.evaluation.rollout == stored
    assert not status.evaluation.changed


def test_the_kept_rollout_list_sees_a_halt_by_another_process_at_once(
    db_engine: Engine, tmp_path: Path
) -> None:
    """Every check-in asks for the rollout list; it is kept between announcements (ADR
    0036). A halt written by another process sharing the data directory is announced and
    seen by the very next read; a write that was not announced within
    ROLLOUT_LIST_SECONDS; a write of this process at once (its own unit reads it)."""
    signal = ChangeSignal(tmp_path, "rollouts")
    here = NotifyingRolloutStore(db_engine, on_change=signal.touch, changes=signal.token)
    there = NotifyingRolloutStore(db_engine, on_change=signal.touch, changes=signal.token)
    r = _rollout()
    here.create(r, now=NOW)
    assert [x.state for x in there.list()] == ["active"]
    reads: list[str] = []
    event.listen(db_engine, "before_cursor_execute", lambda *a: reads.append(a[2]))
    assert [x.state for x in there.list()] == ["active"]
    assert not reads  # kept: no statement
    assert here.change(dataclasses.replace(r, state="halted"), expect_state="active", now=NOW)
    assert [x.state for x in there.list()] == ["halted"]  # announced: read again at once
    # A writer that does not announce (not sharing the data directory): within the bound.
    with db_engine.begin() as conn:
        conn.execute(update(rollouts_table).values(reason="by hand"))
    assert there.list()[0].reason != "by hand"
    time.sleep(ROLLOUT_LIST_SECONDS + 0.1)
    assert there.list()[0].reason == "by hand"
    # This process's own write, inside a unit that reads the list again before committing.
    with unit_of_work(db_engine):
        assert there.change(
            dataclasses.replace(r, state="paused", reason="p"), expect_state="halted", now=NOW
        )
        assert [x.state for x in there.list()] == ["paused"]


def test_the_kept_group_settings_see_a_change_by_another_process_at_once(
    db_engine: Engine, tmp_path: Path
) -> None:
    """The groups' channel settings are kept between announcements like the rollout list:
    a group's new security delay set through another process is seen at the next read."""
    signal = ChangeSignal(tmp_path, "rollouts")
    here = NotifyingRolloutStore(db_engine, on_change=signal.touch, changes=signal.token)
    there = NotifyingRolloutStore(db_engine, on_change=signal.touch, changes=signal.token)
    here.set_group_policy(GroupPolicy("plant-a", security_delay=dt.timedelta(days=1)))
    assert there.group_policies()["plant-a"].security_delay == dt.timedelta(days=1)
    reads: list[str] = []
    event.listen(db_engine, "before_cursor_execute", lambda *a: reads.append(a[2]))
    assert there.group_policies()["plant-a"].security_delay == dt.timedelta(days=1)
    assert not reads  # kept: no statement
    here.set_group_policy(GroupPolicy("plant-a", security_delay=dt.timedelta(days=2)))
    assert there.group_policies()["plant-a"].security_delay == dt.timedelta(days=2)


def test_the_kept_assignments_see_a_change_by_another_process_at_once(
    db_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check-in's answer asks for the device's assignment; the few an operator made
    are kept until a write is announced (at most ASSIGNMENTS_SECONDS): a hold set through
    another process is seen by the very next check-in; past MAX_KEPT_ASSIGNMENTS each
    check-in reads its own row."""
    from otaguard.server.storage import notify
    from otaguard.server.storage.assignments import Assignment
    from otaguard.server.storage.notify import ASSIGNMENTS_SECONDS, NotifyingAssignmentStore

    devices = SQLDeviceStore(db_engine)
    for serial in ("a1", "a2", "a3"):
        devices.add(serial, "hw", token_hash=serial * 32, token_expires=NOW, now=NOW)
    signal = ChangeSignal(tmp_path, "assignments")
    signal.ensure()
    here = NotifyingAssignmentStore(db_engine, on_change=signal.touch, changes=signal.token)
    there = NotifyingAssignmentStore(db_engine, on_change=signal.touch, changes=signal.token)
    assert there.get("a1") is None
    reads: list[str] = []
    event.listen(db_engine, "before_cursor_execute", lambda *a: reads.append(a[2]))
    assert there.get("a2") is None and there.get("a1") is None
    assert not reads  # kept: no statement
    here.set(Assignment("a1", "hold", None, NOW))
    got = there.get("a1")
    assert got is not None and got.mode == "hold"  # announced: read again at once
    # A writer that does not announce: within the bound.
    SQLAssignmentStore(db_engine).set(Assignment("a2", "release", "1.2.0", NOW))
    assert there.get("a2") is None
    time.sleep(ASSIGNMENTS_SECONDS + 0.1)
    got = there.get("a2")
    assert got is not None and got.version == "1.2.0"
    # Too many to keep: each asks for its own row (and still sees the newest).
    monkeypatch.setattr(notify, "MAX_KEPT_ASSIGNMENTS", 1)
    here.clear("a1")
    here.set(Assignment("a3", "hold", None, NOW))
    reads.clear()
    assert there.get("a1") is None
    got = there.get("a2")
    assert got is not None and got.version == "1.2.0"
    assert len([r for r in reads if "director_assignments" in r]) == 3  # all + 2 own rows
