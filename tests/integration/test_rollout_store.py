"""The rollout store's SQL adapter on SQLite and PostgreSQL: rollouts round-trip, a state
change is compare-and-set, channel settings, first-seen times recorded once."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from sqlalchemy.engine import Engine

from otaguard.model.version import Version
from otaguard.server.channels import GroupPolicy, Rollout, Window
from otaguard.server.storage.fleet_base import NameExistsError, UnknownNameError
from otaguard.server.storage.rollouts import SQLRolloutStore

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
