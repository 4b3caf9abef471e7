"""The channel and rollout policy, pure: every rule of ADR 0011 and its edge cases."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from otaguard.model.release import ReleaseInfo
from otaguard.model.version import Version
from otaguard.server.channels import (
    MAX_SECURITY_DELAY,
    UP_TO_DATE,
    Decision,
    DeviceFacts,
    GroupPolicy,
    Rollout,
    RolloutView,
    Window,
    admitted,
    decide,
    evaluate,
    install_outcome,
    nothing_newer,
    orphan_releases,
)
from otaguard.server.director import DirectorRelease
from otaguard.server.storage.assignments import Assignment

# a Wednesday, 12:00 UTC
NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
HW = "gw"
MEMBERS = tuple(f"d{i:02d}" for i in range(20))


def rel(version: str, kind: str = "feature", hw: str = HW, counter: int = 1) -> DirectorRelease:
    info = ReleaseInfo(Version.parse(version), counter, (hw,), kind)
    return DirectorRelease(f"fw-{version}.img", 100, {"sha256": "ab" * 32}, info)


def dev(running: str | None = "2.3.0", **kw: object) -> DeviceFacts:
    kw.setdefault("groups", ("all",))
    return DeviceFacts(
        serial=str(kw.pop("serial", "d00")),
        hardware_id=HW,
        running=Version.parse(running) if running else None,
        **kw,  # type: ignore[arg-type]
    )


def ro(version: str, **kw: object) -> Rollout:
    defaults: dict[str, object] = {
        "name": "r1",
        "version": Version.parse(version),
        "group": "all",
        "phases": (1, 10, 50, 100),
        "success_threshold": 95,
        "failure_threshold": 5,
    }
    return Rollout(**(defaults | kw))  # type: ignore[arg-type]


def view(r: Rollout, members: tuple[str, ...] = MEMBERS) -> RolloutView:
    return RolloutView(r, members)


def choose(
    device: DeviceFacts,
    releases: list[DirectorRelease],
    rollouts: tuple[RolloutView, ...] = (),
    *,
    groups: dict[str, GroupPolicy] | None = None,
    first_seen: dict[str, dt.datetime] | None = None,
    now: dt.datetime = NOW,
) -> Decision:
    return decide(
        device=device,
        releases=releases,
        rollouts=rollouts,
        groups=groups or {},
        first_seen=first_seen
        if first_seen is not None
        else {r.name: NOW - dt.timedelta(days=30) for r in releases},
        now=now,
    )


def version_of(d: Decision) -> str | None:
    return str(d.release.info.version) if d.release else None


# -- security channel ----------------------------------------------------------------------
def test_security_release_goes_to_every_device_without_a_rollout() -> None:
    d = choose(dev(), [rel("2.3.1", "security")])
    assert version_of(d) == "2.3.1" and "security" in d.reason


def test_feature_release_without_a_rollout_goes_nowhere() -> None:
    d = choose(dev(), [rel("2.4.0")])
    assert d.release is None and d.reason == "up to date for its channels"


def test_security_fix_on_the_older_line_reaches_devices_that_stayed_on_it() -> None:
    releases = [rel("2.4.0", "security"), rel("2.4.1", "security"), rel("2.3.1", "security")]
    assert version_of(choose(dev("2.3.0"), releases)) == "2.3.1"
    assert version_of(choose(dev("2.4.0"), releases)) == "2.4.1"


def test_no_release_below_the_security_counter_of_what_runs_is_offered() -> None:
    """2.3.1 starts fix epoch 3; 2.4.0 (epoch 2) lacks that fix: a device on 2.3.1 is not
    sent 2.4.0 (its floor would refuse it as a downgrade) by a rollout, the security
    channel or an assignment, but is sent 2.4.1 (epoch 3); 2.4 devices never get 2.3.1."""
    releases = [
        rel("2.3.0", counter=1),
        rel("2.4.0", "security", counter=2),
        rel("2.3.1", "security", counter=3),
    ]
    done = ro("2.4.0", state="completed", phase=3)
    d = choose(dev("2.3.1"), releases, (view(done),))
    assert d.release is None
    assert "2.4.0 carries security counter 2, below the 3 of what runs" in d.reason
    assert version_of(choose(dev("2.3.0"), releases, (view(done),))) == "2.4.0"
    assert choose(dev("2.4.0"), releases).release is None  # never back to the older line
    assigned = dev("2.3.1", assignment=Assignment("d00", "release", "2.4.0", NOW))
    d = choose(assigned, releases)
    assert d.release is None and "below the security counter" in d.reason
    fixed = [*releases, rel("2.4.1", "security", counter=3)]
    assert version_of(choose(dev("2.3.1"), fixed)) == "2.4.1"
    assert version_of(choose(dev("2.4.0"), fixed)) == "2.4.1"


def test_security_fix_only_on_a_newer_line_is_not_withheld() -> None:
    assert version_of(choose(dev("2.2.0"), [rel("2.4.0", "security")])) == "2.4.0"


def test_security_release_not_newer_than_what_runs_is_not_sent() -> None:
    assert (
        choose(dev("2.3.1"), [rel("2.3.1", "security"), rel("2.3.0", "security")]).release is None
    )


def test_security_prerelease_is_not_on_the_security_channel() -> None:
    assert choose(dev(), [rel("2.3.1-rc.1", "security")]).release is None


def test_security_release_reaches_feature_opted_out_devices() -> None:
    groups = {"lab": GroupPolicy("lab", no_features=True)}
    d = choose(
        dev(groups=("all", "lab"), no_features=True), [rel("2.3.1", "security")], groups=groups
    )
    assert version_of(d) == "2.3.1"


def test_security_delay_postpones_from_first_seen_then_releases() -> None:
    groups = {"plant": GroupPolicy("plant", security_delay=dt.timedelta(days=2))}
    device = dev(groups=("all", "plant"))
    seen = {"fw-2.3.1.img": NOW - dt.timedelta(days=1)}
    d = choose(device, [rel("2.3.1", "security")], groups=groups, first_seen=seen)
    assert d.release is None and "postponed until" in d.reason
    seen = {"fw-2.3.1.img": NOW - dt.timedelta(days=2)}
    assert version_of(choose(device, [rel("2.3.1", "security")], groups=groups, first_seen=seen))


def test_a_first_sighting_recorded_after_this_check_in_read_its_clock_is_not_a_delay() -> None:
    # Two check-ins at once: the other one records the release as first seen a moment
    # after this one read "now". With no postponement the fix still goes out at once.
    seen = {"fw-2.3.1.img": NOW + dt.timedelta(milliseconds=3)}
    d = choose(dev(), [rel("2.3.1", "security")], first_seen=seen)
    assert version_of(d) == "2.3.1", d.reason
    groups = {"plant": GroupPolicy("plant", security_delay=dt.timedelta(hours=1))}
    device = dev(groups=("all", "plant"))
    d = choose(device, [rel("2.3.1", "security")], groups=groups, first_seen=seen)
    until = (NOW + dt.timedelta(hours=1)).isoformat()
    assert d.release is None and f"postponed until {until}" in d.reason


def test_an_older_due_fix_is_not_held_back_by_a_newer_postponed_one() -> None:
    groups = {"plant": GroupPolicy("plant", security_delay=dt.timedelta(days=2))}
    seen = {"fw-2.3.1.img": NOW - dt.timedelta(days=3), "fw-2.3.2.img": NOW}
    releases = [rel("2.3.1", "security"), rel("2.3.2", "security")]
    d = choose(dev(groups=("all", "plant")), releases, groups=groups, first_seen=seen)
    assert version_of(d) == "2.3.1"


def test_a_release_never_seen_before_counts_as_seen_now() -> None:
    groups = {"plant": GroupPolicy("plant", security_delay=dt.timedelta(hours=1))}
    d = choose(
        dev(groups=("all", "plant")), [rel("2.3.1", "security")], groups=groups, first_seen={}
    )
    assert d.release is None


def test_the_longest_delay_of_the_devices_groups_applies() -> None:
    groups = {
        "a": GroupPolicy("a", security_delay=dt.timedelta(hours=1)),
        "b": GroupPolicy("b", security_delay=dt.timedelta(days=3)),
    }
    seen = {"fw-2.3.1.img": NOW - dt.timedelta(days=1)}
    d = choose(
        dev(groups=("all", "a", "b")), [rel("2.3.1", "security")], groups=groups, first_seen=seen
    )
    assert d.release is None


def test_security_delay_is_bounded_to_seven_days() -> None:
    GroupPolicy("g", security_delay=MAX_SECURITY_DELAY)
    with pytest.raises(ValueError, match="between 0 and 7 days"):
        GroupPolicy("g", security_delay=MAX_SECURITY_DELAY + dt.timedelta(seconds=1))
    with pytest.raises(ValueError, match="between 0 and 7 days"):
        GroupPolicy("g", security_delay=-dt.timedelta(seconds=1))


def test_security_ignores_maintenance_windows() -> None:
    closed = Window.parse("Sat 02:00-03:00")
    groups = {"plant": GroupPolicy("plant", window=closed)}
    d = choose(dev(groups=("all", "plant")), [rel("2.3.1", "security")], groups=groups)
    assert version_of(d) == "2.3.1"


def test_other_hardware_is_never_chosen() -> None:
    assert choose(dev(), [rel("2.3.1", "security", hw="other")]).release is None


# -- rollouts ----------------------------------------------------------------------------
def _first(r: Rollout) -> str:
    return sorted(admitted(r, MEMBERS), key=lambda s: s)[0]


def test_rollout_admits_by_phase_and_others_are_told_none() -> None:
    r = ro("2.4.0")
    inside = admitted(r, MEMBERS)
    assert len(inside) == 1  # ceil(1% of 20)
    for s in MEMBERS:
        d = choose(dev(serial=s), [rel("2.4.0")], (view(r),))
        if s in inside:
            assert version_of(d) == "2.4.0" and d.reason == "rollout r1 phase 1/4"
        else:
            assert d.release is None and "not yet admitted to rollout r1" in d.reason


def test_admission_is_stable_nested_and_spread() -> None:
    phases = [admitted(ro("2.4.0", phase=k), MEMBERS) for k in range(4)]
    assert [len(p) for p in phases] == [1, 2, 10, 20]
    assert phases[0] <= phases[1] <= phases[2] <= phases[3] == set(MEMBERS)
    assert admitted(ro("2.4.0", phase=2), tuple(reversed(MEMBERS))) == phases[2]
    other = admitted(ro("2.4.0", name="r2", phase=2), MEMBERS)
    assert other != phases[2]  # another name, another order
    assert phases[2] != set(MEMBERS[:10])  # not the lowest serials


def test_admission_of_an_empty_group_is_empty() -> None:
    assert admitted(ro("2.4.0", phase=3), ()) == frozenset()


def test_device_not_in_the_rollouts_group_is_not_admitted() -> None:
    r = ro("2.4.0", state="completed")
    d = choose(dev(serial="zz"), [rel("2.4.0")], (view(r),))
    assert d.release is None


@pytest.mark.parametrize("state", ["paused", "halted", "cancelled"])
def test_stopped_rollout_admits_nobody(state: str) -> None:
    r = ro("2.4.0", state=state, phase=3)
    d = choose(dev(), [rel("2.4.0")], (view(r),))
    assert d.release is None and d.reason == f"rollout r1 is {state}"


def test_stopped_rollout_still_lets_security_through() -> None:
    r = ro("2.4.0", state="halted", phase=3)
    assert (
        version_of(choose(dev(), [rel("2.4.0"), rel("2.3.1", "security")], (view(r),))) == "2.3.1"
    )


def test_completed_rollout_admits_every_member() -> None:
    r = ro("2.4.0", state="completed", phase=3)
    assert all(version_of(choose(dev(serial=s), [rel("2.4.0")], (view(r),))) for s in MEMBERS)


def test_feature_opt_out_of_device_or_group() -> None:
    r = ro("2.4.0", state="completed", phase=3)
    d = choose(dev(no_features=True), [rel("2.4.0")], (view(r),))
    assert d.release is None and "opted out of feature releases" in d.reason
    groups = {"lab": GroupPolicy("lab", no_features=True)}
    d = choose(dev(groups=("all", "lab")), [rel("2.4.0")], (view(r),), groups=groups)
    assert d.release is None


def test_security_release_through_a_rollout_ignores_the_opt_out() -> None:
    r = ro("2.3.1", state="completed", phase=3)
    assert version_of(choose(dev(no_features=True), [rel("2.3.1", "security")], (view(r),)))


def test_prerelease_only_where_a_rollout_names_it() -> None:
    pre = rel("2.4.0-rc.1")
    assert choose(dev(), [pre]).release is None
    r = ro("2.4.0-rc.1", state="completed", phase=3)
    assert version_of(choose(dev(), [pre], (view(r),))) == "2.4.0-rc.1"
    assert choose(dev(no_features=True), [pre], (view(r),)).release is None


def test_rollout_of_what_runs_or_older_sends_nothing() -> None:
    r = ro("2.3.0", state="completed", phase=3)
    assert choose(dev("2.3.0"), [rel("2.3.0")], (view(r),)).release is None
    r = ro("2.2.0", state="completed", phase=3)
    assert choose(dev("2.3.0"), [rel("2.2.0")], (view(r),)).release is None


def test_rollout_of_a_release_not_served_sends_nothing() -> None:
    r = ro("2.4.0", state="completed", phase=3)
    assert choose(dev(), [rel("2.3.0")], (view(r),)).release is None
    assert choose(dev(), [rel("2.4.0", hw="other")], (view(r),)).release is None


def test_the_newest_candidate_wins() -> None:
    r = ro("2.4.0", state="completed", phase=3)
    both = [rel("2.4.0"), rel("2.3.1", "security")]
    assert version_of(choose(dev(), both, (view(r),))) == "2.4.0"
    r = ro("2.3.1", state="completed", phase=3)
    assert (
        version_of(choose(dev(), [rel("2.3.1"), rel("2.3.2", "security")], (view(r),))) == "2.3.2"
    )


def test_rollout_window_and_group_windows() -> None:
    r = ro("2.4.0", state="completed", phase=3, window=Window.parse("Wed 11:00-13:00"))
    assert version_of(choose(dev(), [rel("2.4.0")], (view(r),)))
    late = NOW + dt.timedelta(hours=2)
    d = choose(dev(), [rel("2.4.0")], (view(r),), now=late)
    assert d.release is None and "waiting for maintenance window Wed 11:00-13:00" in d.reason
    groups = {"plant": GroupPolicy("plant", window=Window.parse("Sat,Sun 00:00-06:00"))}
    r = ro("2.4.0", state="completed", phase=3)
    d = choose(dev(groups=("all", "plant")), [rel("2.4.0")], (view(r),), groups=groups)
    assert d.release is None and "Sat,Sun 00:00-06:00" in d.reason


# -- assignment and recovery ---------------------------------------------------------------
def test_assignment_wins_over_channels() -> None:
    hold = Assignment("d00", "hold", None, NOW)
    assert choose(dev(assignment=hold), [rel("2.3.1", "security")]).release is None
    pin = Assignment("d00", "release", "2.4.0", NOW)
    assert version_of(choose(dev(assignment=pin), [rel("2.4.0")])) == "2.4.0"
    old = Assignment("d00", "release", "2.3.0", NOW)
    assert choose(dev(assignment=old), [rel("2.3.0")]).release is None
    gone = Assignment("d00", "release", "9.9.9", NOW)
    assert "not served" in choose(dev(assignment=gone), [rel("2.4.0")]).reason


def test_recovery_gets_the_newest_final_release() -> None:
    d = choose(dev(None), [rel("2.4.0"), rel("2.5.0-rc.1"), rel("2.3.1", "security")])
    assert version_of(d) == "2.4.0"
    assert choose(dev(None), [rel("2.5.0-rc.1")]).release is None


# -- rollout construction ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"phases": ()}, "1 to 10 phases"),
        ({"phases": (*tuple(range(1, 12)), 100)}, "1 to 10 phases"),
        ({"phases": (10, 1, 100)}, "increasing"),
        ({"phases": (10, 10, 100)}, "increasing"),
        ({"phases": (0, 100)}, "increasing"),
        ({"phases": (50, 101)}, "increasing"),
        ({"phases": (1, 50)}, "last phase must be 100"),
        ({"success_threshold": 101}, "thresholds"),
        ({"failure_threshold": -1}, "thresholds"),
        ({"state": "running"}, "state"),
        ({"phase": 4}, "phase index"),
    ],
)
def test_invalid_rollouts_are_refused(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ro("2.4.0", **changes)


# -- windows -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "when", "inside"),
    [
        ("Mon-Fri 02:00-05:00", "2026-11-23T02:00", True),  # Monday
        ("Mon-Fri 02:00-05:00", "2026-11-23T05:00", False),  # end is exclusive
        ("Mon-Fri 02:00-05:00", "2026-11-28T03:00", False),  # Saturday
        ("Fri-Mon 10:00-11:00", "2026-11-29T10:30", True),  # Sunday, wrapped range
        ("Fri-Mon 10:00-11:00", "2026-11-25T10:30", False),  # Wednesday
        ("daily 22:00-02:00", "2026-11-25T23:00", True),
        ("daily 22:00-02:00", "2026-11-26T01:59", True),
        ("daily 22:00-02:00", "2026-11-26T02:00", False),
        ("Sat 22:00-02:00", "2026-11-29T01:00", True),  # Sunday morning after Saturday
        ("Sat 22:00-02:00", "2026-11-28T01:00", False),  # Saturday morning (Friday's night)
        ("Sat,Sun 00:00-24:00", "2026-11-29T23:59", True),
    ],
)
def test_windows(text: str, when: str, inside: bool) -> None:
    at = dt.datetime.fromisoformat(when).replace(tzinfo=dt.UTC)
    assert Window.parse(text).contains(at) is inside


def test_window_compares_in_utc() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    assert Window.parse("Mon 02:00-03:00").contains(dt.datetime(2026, 11, 23, 3, 30, tzinfo=cet))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Mon",
        "Mon 2:00-3:00",
        "Xyz 02:00-03:00",
        "Mon 25:00-03:00",
        "Mon 02:00-02:00",
        "Mon 02:60-03:00",
        "Mon 02:00-24:01",
        "Mon " + "x" * 80,
    ],
)
def test_invalid_windows_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"window|day|time"):
        Window.parse(text)


# -- outcomes and evaluation ---------------------------------------------------------------
V = Version.parse("2.4.0")


def test_install_outcome() -> None:
    assert install_outcome(V, running="2.4.0", last_result={}) == ("success", "")
    failed = {"outcome": "rolled-back", "version": "2.4.0", "error": "health"}
    assert install_outcome(V, running="2.3.0", last_result=failed) == (
        "failure",
        "rolled-back: health",
    )
    other = {"outcome": "rolled-back", "version": "2.3.5", "error": "health"}
    assert install_outcome(V, running="2.3.0", last_result=other) == ("pending", "")
    ok = {"outcome": "installed", "version": "2.4.0"}
    assert install_outcome(V, running="2.3.0", last_result=ok) == ("pending", "")


def _outcomes(ok: int = 0, bad: int = 0, r: Rollout | None = None) -> dict[str, tuple[str, str]]:
    order = sorted(admitted(r or ro("2.4.0", phase=3), MEMBERS))
    out = {s: ("success", "") for s in order[:ok]}
    out.update({s: ("failure", "rolled-back: health") for s in order[ok : ok + bad]})
    return out


def test_phase_advances_when_its_success_threshold_is_met() -> None:
    r = ro("2.4.0")
    first = _first(r)
    ev = evaluate(r, MEMBERS, {first: ("success", "")})
    # phase 1 (1 device) met; phase 2 (2 devices) has 1 of 2 = 50% < 95%: stops there
    assert ev.changed and ev.rollout.phase == 1 and ev.rollout.state == "active"
    assert ev.admitted == 2 and ev.succeeded == 1


def test_nothing_changes_below_the_threshold() -> None:
    r = ro("2.4.0")
    ev = evaluate(r, MEMBERS, {})
    assert not ev.changed and ev.rollout == r


def test_last_phase_met_completes() -> None:
    r = ro("2.4.0", phase=3)
    ev = evaluate(r, MEMBERS, {s: ("success", "") for s in MEMBERS})
    assert ev.changed and ev.rollout.state == "completed"


def test_failures_above_the_threshold_halt_with_the_devices_and_errors() -> None:
    r = ro("2.4.0", phase=2)  # 10 admitted
    ev = evaluate(r, MEMBERS, _outcomes(ok=9, bad=1, r=r))  # 10% > 5%
    assert ev.rollout.state == "halted" and ev.changed
    assert "1 of 10 admitted failed (10% > 5%)" in ev.rollout.reason
    assert "rolled-back: health" in ev.rollout.reason and next(iter(ev.failed)) in ev.rollout.reason


def test_failures_at_the_threshold_do_not_halt() -> None:
    r = ro("2.4.0", phase=2, failure_threshold=10, success_threshold=100)
    assert evaluate(r, MEMBERS, _outcomes(bad=1, r=r)).rollout.state == "active"


def test_a_halt_is_checked_before_an_advance() -> None:
    r = ro("2.4.0", phase=2, success_threshold=50)
    ev = evaluate(r, MEMBERS, _outcomes(ok=9, bad=1, r=r))
    assert ev.rollout.state == "halted" and ev.rollout.phase == 2


def test_failures_of_devices_not_admitted_do_not_count() -> None:
    r = ro("2.4.0")
    outside = sorted(set(MEMBERS) - admitted(r, MEMBERS))
    ev = evaluate(r, MEMBERS, {s: ("failure", "x") for s in outside})
    assert ev.rollout.state == "active" and not ev.failed


@pytest.mark.parametrize("state", ["paused", "halted", "cancelled", "completed"])
def test_only_active_rollouts_are_evaluated(state: str) -> None:
    r = ro("2.4.0", state=state)
    assert not evaluate(r, MEMBERS, {s: ("success", "") for s in MEMBERS}).changed


def test_empty_group_never_advances() -> None:
    assert not evaluate(ro("2.4.0", success_threshold=0), (), {}).changed


def test_zero_failure_threshold_halts_on_the_first_failure() -> None:
    r = ro("2.4.0", failure_threshold=0)
    ev = evaluate(r, MEMBERS, {_first(r): ("failure", "failed: write")})
    assert ev.rollout.state == "halted"


def test_evaluation_leaves_the_input_unchanged() -> None:
    r = ro("2.4.0")
    before = dataclasses.replace(r)
    evaluate(r, MEMBERS, {s: ("success", "") for s in MEMBERS})
    assert r == before


# -- releases for unknown hardware ---------------------------------------------------------
def test_orphan_releases_name_their_unknown_hardware() -> None:
    typo = rel("2.4.0", hw="gw-typo")
    found = orphan_releases([rel("2.3.0"), typo], {"gw"})
    assert found == [(typo, ("gw-typo",))]
    assert orphan_releases([rel("2.3.0")], {"gw"}) == []


@pytest.mark.parametrize(
    ("running", "listed", "newer"),
    [
        ("2.4.0", ["2.3.1", "2.4.0"], False),  # on the newest: nothing to decide
        ("2.3.0", ["2.3.1", "2.4.0"], True),  # a fix on its own line
        ("2.4.0", ["2.4.1-rc1"], True),  # a pre-release newer than what runs
        ("2.4.0-rc1", ["2.4.0"], True),  # the final release after its candidate
        (None, ["2.4.0"], False),  # recovery: decide() chooses (not "nothing newer")
    ],
)
def test_nothing_newer_is_exactly_when_decide_has_nothing_to_weigh(
    running: str | None, listed: list[str], newer: bool
) -> None:
    """The policy skips reading a device's groups, opt-out and rollouts when nothing newer
    is listed for its hardware (``nothing_newer``); decide() must then answer none with
    nothing to explain, whatever those facts are. Another hardware's newer release does
    not count."""
    releases = [rel(v, kind="security") for v in listed] + [rel("9.0.0", hw="other")]
    version = Version.parse(running) if running else None
    skip = nothing_newer(hardware_id=HW, running=version, releases=releases)
    assert skip == (running is not None and not newer)
    everything = (view(ro(listed[-1], phases=(100,))),)
    for facts in (dev(running), dev(running, no_features=True, groups=("all", "lab"))):
        d = choose(facts, releases, everything)
        if skip:
            assert d == Decision(None, UP_TO_DATE)
        else:
            assert d.release is not None or d.reason != UP_TO_DATE
