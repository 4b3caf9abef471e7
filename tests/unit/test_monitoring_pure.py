"""The pure parts of fleet monitoring: the telemetry parser's bounds, the anomaly
detectors' arithmetic, the alert policy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from otaguard.fleet.anomaly import (
    COHORT_MIN_DEVICES,
    BootSession,
    CohortDevice,
    PhaseCounts,
    boot_session_conflict,
    cohort_findings,
    phase_failure_finding,
    robust_threshold,
    silent_finding,
)
from otaguard.fleet.policy import DEFAULT_ACTIONS, Action, parse_policy
from otaguard.model.errors import ConfigError
from otaguard.model.telemetry import (
    MAX_TELEMETRY_BYTES,
    TELEMETRY_SCHEMA,
    TelemetryError,
    hint_topic,
    parse_telemetry,
    serial_of_topic,
    telemetry_topic,
)

BOOT = "0123456789abcdef0123456789abcdef"


def report(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": TELEMETRY_SCHEMA,
        "serial": "dev1",
        "time": "2026-11-22T12:00:00Z",
        "boot_id": BOOT,
        "seq": 3,
        "uptime_s": 60,
        "boot_count": 4,
        "rollbacks": 0,
        "free_storage_bytes": 1 << 20,
        "agent_errors": 0,
        "running_version": "1.0.0",
        "last_install": {"result": "updated", "version": "1.0.0", "duration_s": 12.5},
        "attestation": "none",
        "refused_attacks": 0,
    }
    doc.update(over)
    return doc


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def test_a_report_round_trips() -> None:
    t = parse_telemetry(raw(report()), serial="dev1")
    assert (t.boot_count, t.seq, t.last_install.duration_s) == (4, 3, 12.5)
    assert parse_telemetry(t.to_bytes(), serial="dev1") == t


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"x" * (MAX_TELEMETRY_BYTES + 1), "larger than 4096 bytes"),
        (b"[" * 3 + b"]" * 3, "nests deeper than 2 levels"),
        # a nesting bomb well inside the size limit never reaches json.loads
        (b"[" * 2000 + b"]" * 2000, "nests deeper than 2 levels"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"schema": "x", "schema": "y"}', "repeats the key 'schema'"),
        (raw(report(schema="otaguard.telemetry/2")), "schema must be"),
        (raw(report(extra=1)), "unknown key 'extra'"),
        (raw(report(serial="dev2")), "names device 'dev2', but comes from 'dev1'"),
        (raw(report(boot_count=-1)), "boot_count is out of range"),
        (raw(report(boot_count=2**60)), "boot_count is out of range"),
        (raw(report(seq=True)), "seq must be an integer"),
        (raw(report(uptime_s=1.5)), "uptime_s must be an integer"),
        (raw(report(boot_id="XYZ")), "boot_id must be 32 lowercase hex"),
        (raw(report(running_version="1\x00")), "printable ASCII"),
        (raw(report(running_version="v" * 65)), "at most 64 chars"),
        (raw(report(attestation="maybe")), "attestation 'maybe' is not one"),
        (raw(report(last_install=[])), "last_install must be an object"),
        (raw(report(last_install={"result": "won"})), "last_install.result 'won' is not"),
        (
            raw(report(last_install={"result": "updated", "version": "1", "duration_s": 1e9})),
            "duration_s is out of range",
        ),
        (raw(report()).replace(b"12.5", b"NaN"), "holds NaN"),
    ],
)
def test_hostile_reports_are_refused_with_the_problem_named(data: bytes, problem: str) -> None:
    with pytest.raises(TelemetryError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_telemetry(data, serial="dev1")


def test_topics_name_one_device() -> None:
    assert serial_of_topic(telemetry_topic("dev-1")) == "dev-1"
    assert serial_of_topic(hint_topic("dev-1")) is None
    assert serial_of_topic("otaguard/v1/devices/a/b/telemetry") is None
    assert serial_of_topic("otaguard/v1/devices/+/telemetry") is None


def test_one_device_rebooting_is_not_a_clone() -> None:
    a1 = BootSession("a" * 32, boot_count=5, seq=1)
    assert boot_session_conflict(None, a1) is None
    assert boot_session_conflict(a1, BootSession("a" * 32, 5, 2)) is None
    assert boot_session_conflict(a1, BootSession("a" * 32, 5, 1)) is None  # a retried POST
    assert boot_session_conflict(a1, BootSession("b" * 32, 6, 0)) is None  # a reboot


def test_two_devices_under_one_certificate_conflict() -> None:
    original = BootSession("a" * 32, boot_count=5, seq=7)
    clone = BootSession("b" * 32, boot_count=6, seq=0)  # looks like a reboot ...
    assert boot_session_conflict(original, clone) is None
    # ... until the original reports again: its boot count did not advance.
    why = boot_session_conflict(clone, BootSession("a" * 32, 5, 8))
    assert why is not None and "without the count advancing" in why
    # Same boot, sequence going back: two senders of one session.
    why = boot_session_conflict(original, BootSession("a" * 32, 5, 3))
    assert why is not None and "seq 3 after seq 7" in why


def test_silence_counts_poll_intervals() -> None:
    assert silent_finding(serial="d", silent_for=299, poll_interval=100, intervals=3,
                          image="fw") is None  # fmt: skip
    f = silent_finding(serial="d", silent_for=301, poll_interval=100, intervals=3, image="fw")
    assert f is not None and f.signal == "silent-after-install"
    assert f.observed == "silent 301 s" and f.threshold.startswith("300 s (3 poll intervals")


def cohort(version: str, n: int, boots: int, *, reports: int = 4) -> list[CohortDevice]:
    return [
        CohortDevice(f"{version}-{i}", "hw", version, reports, boots + (i % 2), 0, 0)
        for i in range(n)
    ]


def test_a_crash_looping_cohort_departs_from_its_baseline() -> None:
    devices = cohort("1.0.0", 40, boots=0) + cohort("2.0.0", COHORT_MIN_DEVICES, boots=8)
    (f,) = cohort_findings(devices)
    assert f.signal == "cohort-anomaly" and f.subject == "cohort:hw@2.0.0"
    assert f.version == "2.0.0"
    assert "median boot rate 2.00/report" in f.observed
    # half the baseline rebooted once in 4 reports: median 0.125, MAD 0.125
    assert f.threshold.startswith("1.05/report (baseline median 0.12, MAD 0.12, 40 devices")


def test_healthy_cohorts_and_small_ones_raise_nothing() -> None:
    assert cohort_findings(cohort("1.0.0", 40, boots=0) + cohort("2.0.0", 40, boots=1)) == []
    # Too few devices to say anything about a release.
    small = cohort("2.0.0", COHORT_MIN_DEVICES - 1, boots=50)
    assert cohort_findings(cohort("1.0.0", 40, boots=0) + small) == []


def test_robust_threshold_ignores_outliers() -> None:
    med, mad, limit = robust_threshold([1, 1, 1, 2, 2, 100])
    assert (med, mad) == (1.5, 0.5) and limit == pytest.approx(1.5 + 5 * 1.4826 * 0.5)


def test_a_phase_failing_more_than_earlier_ones_departs() -> None:
    phases = {0: PhaseCounts(succeeded=10, failed=0), 1: PhaseCounts(succeeded=60, failed=3)}
    assert phase_failure_finding("r", phases) is None  # 4.8% vs 0% + 5% margin
    phases[1] = PhaseCounts(succeeded=50, failed=13)
    f = phase_failure_finding("r", phases)
    assert f is not None and f.rollout == "r" and f.signal == "rollout-phase-failure"
    assert f.observed == "phase 2 failure rate 20.6% (13/63)"
    assert f.threshold.startswith("5.0% (earlier phases 0.0% over 10 reports")
    # Too few reports in the phase, or nothing earlier to compare with: no finding.
    assert phase_failure_finding("r", {0: PhaseCounts(0, 0), 1: PhaseCounts(0, 9)}) is None
    assert phase_failure_finding("r", {0: PhaseCounts(0, 50)}) is None


def test_policy_overrides_and_refusals() -> None:
    assert parse_policy("").action("cloned-credentials") is Action.QUARANTINE
    p = parse_policy("cloned-credentials=record, cohort-anomaly=record")
    assert p.action("cloned-credentials") is Action.RECORD
    assert p.action("unpublished-image") is DEFAULT_ACTIONS["unpublished-image"]
    with pytest.raises(ConfigError, match="SIGNAL one of"):
        parse_policy("no-such-signal=record")
    with pytest.raises(ConfigError, match="'explode' is not one of"):
        parse_policy("attack-flags=explode")
    with pytest.raises(ConfigError, match="cohort-anomaly cannot quarantine"):
        parse_policy("cohort-anomaly=quarantine")
    with pytest.raises(ConfigError, match="attack-flags cannot pause-rollout"):
        parse_policy("attack-flags=pause-rollout")
