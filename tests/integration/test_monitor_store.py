"""The monitor store's sweep reads and the metrics' counts, on SQLite and on PostgreSQL: the
database hands back the rows a sweep may raise for and the counts, not the whole fleet
(ADR 0026)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update
from sqlalchemy.engine import Engine

from otaguard.server.storage.base import DeviceState
from otaguard.server.storage.devices import SQLDeviceStore
from otaguard.server.storage.monitoring import HealthNote, SQLMonitorStore, health_table

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def _fleet(engine: Engine) -> SQLMonitorStore:
    """Five devices: told to install and silent for an hour (a), told and just seen (b),
    silent but told nothing (c), told and silent on other hardware (d), never seen (e)."""
    devices, store = SQLDeviceStore(engine), SQLMonitorStore(engine)
    seen = {
        "a": ("hw1", "1.0.0", "fw-2.0.0.img", NOW - HOUR),
        "b": ("hw1", "2.0.0", "fw-2.0.0.img", NOW),
        "c": ("hw1", "1.0.0", None, NOW - HOUR),
        "d": ("hw2", "1.0.0", "fw-hw2.img", NOW - 2 * HOUR),
    }
    for serial in "abcde":
        hw = seen[serial][0] if serial in seen else "hw1"
        devices.add(serial, hw, token_hash=serial * 64, token_expires=NOW + HOUR, now=NOW)
    for serial, (hw, running, image, when) in seen.items():
        store.note_checkin(HealthNote(serial, hw, running, image, when))
    return store


def test_the_silence_sweep_reads_only_instructed_devices_silent_past_the_limit(
    db_engine: Engine,
) -> None:
    store = _fleet(db_engine)
    silent = store.silent_instructed(seen_before=NOW - dt.timedelta(minutes=30))
    assert sorted((h.serial, h.instructed_image) for h in silent) == [
        ("a", "fw-2.0.0.img"),
        ("d", "fw-hw2.img"),
    ]
    # the limit is strict: a device last seen exactly at it is not silent yet
    assert [h.serial for h in store.silent_instructed(seen_before=NOW - 2 * HOUR)] == []


def test_the_cohort_sweep_reads_only_devices_that_reported_their_release(
    db_engine: Engine,
) -> None:
    store = _fleet(db_engine)
    assert store.reporting() == []
    with db_engine.begin() as conn:  # b reported telemetry about 2.0.0 three times
        conn.execute(
            update(health_table)
            .where(health_table.c.serial == "b")
            .values(release_version="2.0.0", release_reports=3, rollbacks_now=1)
        )
        conn.execute(  # c names a release but never reported on it
            update(health_table)
            .where(health_table.c.serial == "c")
            .values(release_version="1.0.0", release_reports=0)
        )
    (b,) = store.reporting()
    assert (b.serial, b.release_version, b.release_reports, b.release_rollbacks) == (
        "b",
        "2.0.0",
        3,
        1,
    )


def test_running_versions_are_counted_by_the_database(db_engine: Engine) -> None:
    store = _fleet(db_engine)
    assert store.running_counts() == {
        ("hw1", "1.0.0"): 2,
        ("hw1", "2.0.0"): 1,
        ("hw2", "1.0.0"): 1,
    }


def test_device_states_are_counted_by_the_database(db_engine: Engine) -> None:
    """/metrics counts devices per state with one grouped read, not a list of the fleet."""
    _fleet(db_engine)
    devices = SQLDeviceStore(db_engine)
    devices.set_status("a", DeviceState.QUARANTINED, reason="test", now=NOW)
    devices.set_status("b", DeviceState.QUARANTINED, reason="test", now=NOW)
    devices.set_status("c", DeviceState.REVOKED, reason="test", now=NOW)
    assert devices.status_counts() == {
        DeviceState.QUARANTINED: 2,
        DeviceState.REVOKED: 1,
        DeviceState.REGISTERED: 2,
    }
