"""Pure agent logic: update selection, the install state machine, anti-rollback floor."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from otaguard.agent import (
    FileMonotonicStore,
    Floor,
    InstallState,
    Offer,
    Phase,
    SlotImage,
    select_update,
)
from otaguard.agent.install import (
    MAX_STALLED_RUNS,
    ActionFailed,
    Arm,
    DeviceView,
    DiscardStaged,
    Done,
    HealthCheck,
    HealthResult,
    InvalidateSlot,
    Observation,
    RaiseFloor,
    Reboot,
    Resumed,
    RetireBelowFloor,
    SetPrimary,
    Streamed,
    StreamToSlot,
    transition,
)
from otaguard.model import ConfigError, DowngradeError, ReleaseInfo, Version


def offer(version: str, counter: int = 0, length: int = 10) -> Offer:
    tf = TargetFile(length, {"sha256": "0" * 64}, f"fw-{version}.img")
    return Offer(tf, ReleaseInfo(Version.parse(version), counter, ("hw",), "feature"))


def select(  # type: ignore[no-untyped-def]
    offers: list[Offer],
    running: str | None = "1.0.0",
    floor: int = 0,
    max_length: int = 100,
    floor_version: str = "1.0.0",
):
    return select_update(
        offers,
        running=Version.parse(running) if running else None,
        floor=Floor(Version.parse(floor_version), floor),
        max_length=max_length,
        rejected=frozenset(),
    )


def test_selects_newest_above_running() -> None:
    sel = select([offer("1.0.0"), offer("1.2.0"), offer("1.1.0")])
    assert sel.chosen is not None and str(sel.chosen.info.version) == "1.2.0"
    assert sel.refused == []


def test_nothing_newer_is_up_to_date_not_refused() -> None:
    sel = select([offer("0.9.0"), offer("1.0.0")])
    assert sel.chosen is None and sel.refused == []


def test_only_older_offered_is_a_device_ahead_not_an_attack() -> None:
    # e.g. the release it runs was withdrawn: nothing to install, nothing refused; only a
    # director that names the older image makes it a downgrade attempt (agent/device.py)
    sel = select([offer("0.9.0")], running="1.0.0")
    assert sel.chosen is None and sel.refused == [] and not sel.downgrade
    assert sel.behind and "1.0.0 is ahead of the repository (newest offered: 0.9.0)" in sel.why_none


def test_newer_version_with_lower_counter_is_refused_and_next_best_chosen() -> None:
    sel = select([offer("1.2.0", counter=1), offer("1.1.0", counter=3)], floor=3)
    assert sel.chosen is not None and str(sel.chosen.info.version) == "1.1.0"
    assert sel.refused[0][0] == "fw-1.2.0.img"


def test_image_larger_than_slot_is_refused() -> None:
    sel = select([offer("1.1.0", length=1000)], max_length=100)
    assert sel.chosen is None and "exceeds" in sel.refused[0][1]


def test_offer_above_running_but_below_the_floor_version_is_not_chosen() -> None:
    # The device booted an older slot (1.0.0) than its floor (1.2.0): an offer of 1.1.0
    # is newer than what runs but older than what it committed; it must not install.
    sel = select([offer("1.1.0")], running="1.0.0", floor_version="1.2.0")
    assert sel.chosen is None
    assert sel.downgrade and "anti-rollback floor 1.2.0" in sel.refused[0][1]


def test_recovery_accepts_the_floor_version_itself() -> None:
    sel = select([offer("1.1.0"), offer("1.0.0")], running=None, floor_version="1.1.0")
    assert sel.chosen is not None and str(sel.chosen.info.version) == "1.1.0"
    below = select([offer("1.0.0")], running=None, floor_version="1.1.0")
    assert below.chosen is None and below.downgrade


IMAGE = SlotImage("fw-1.1.0.img", "1.1.0", 1, "a" * 64, 10)
FLOOR = Floor(Version.parse("1.0.0"), 0)
NOW = "2026-01-01T00:00:00+00:00"


def view(booted: str | None = "A", try_slot: str | None = None, **kw: object) -> DeviceView:
    return DeviceView(booted=booted, try_slot=try_slot, floor=kw.pop("floor", FLOOR), **kw)  # type: ignore[arg-type]


def step(state: InstallState, event: object, v: DeviceView | None = None):  # type: ignore[no-untyped-def]
    return transition(state, Observation(event, v or view()), now=NOW)  # type: ignore[arg-type]


def at(phase: Phase) -> InstallState:
    return InstallState(phase=phase, target=IMAGE, from_slot="A", to_slot="B")


@pytest.mark.parametrize(
    ("phase", "v", "actions"),
    [
        (Phase.IDLE, view(), ()),
        (Phase.SELECTED, view(), (InvalidateSlot("B"), StreamToSlot("B"))),
        (Phase.VERIFIED, view(), (Arm("B", IMAGE), DiscardStaged())),
        (Phase.ARMED, view("A", "B"), (Reboot(),)),
        (Phase.ARMED, view("B", "B"), (HealthCheck("B"),)),
        (
            Phase.HEALTHY,
            view("B", None),  # commit's boot-env write done, floor not yet: commit again
            (SetPrimary("B"), RaiseFloor("1.1.0", 1), RetireBelowFloor("B"), DiscardStaged()),
        ),
    ],
)
def test_resume_reissues_the_phase_actions(
    phase: Phase, v: DeviceView, actions: tuple[object, ...]
) -> None:
    state, got = step(at(phase), Resumed(), v)
    assert got == actions
    assert state.phase is phase


def test_happy_path_event_by_event() -> None:
    s, a = step(at(Phase.SELECTED), Resumed())
    assert s.phase is Phase.SELECTED and a == (InvalidateSlot("B"), StreamToSlot("B"))
    s, a = step(s, Streamed())
    assert s.phase is Phase.VERIFIED and a == (Arm("B", IMAGE), DiscardStaged())
    s, a = step(s, Done())
    assert s.phase is Phase.ARMED and a == (Reboot(),)
    s, a = step(s, Done(), view("B", "B"))
    assert a == (HealthCheck("B"),)
    s, a = step(s, HealthResult(None), view("B", "B"))
    assert s.phase is Phase.HEALTHY and SetPrimary("B") in a
    s, a = step(s, Done(), view("B", None))
    assert s.phase is Phase.IDLE and a == ()
    assert s.last_result is not None and s.last_result["outcome"] == "updated"


def test_below_the_floor_at_arm_is_a_refusal_not_a_wedge() -> None:
    raised = view(floor=Floor(Version.parse("1.2.0"), 1))
    s, a = step(at(Phase.SELECTED), Streamed(), raised)
    assert s.phase is Phase.ABANDONING
    assert a == (InvalidateSlot("B"), DiscardStaged())
    assert s.pending == {"outcome": "refused", "error": "downgrade"}
    s, a = step(s, Done(), raised)
    assert s.phase is Phase.IDLE and a == ()
    assert s.last_result is not None
    assert s.last_result["outcome"] == "refused" and s.last_result["error"] == "downgrade"
    assert "below the installed 1.2.0" in s.last_result["detail"]


def test_refused_download_abandons_and_records_the_cause() -> None:
    s, a = step(at(Phase.SELECTED), ActionFailed("stream_to_slot", "verification", "hash mismatch"))
    assert s.phase is Phase.ABANDONING and a == (InvalidateSlot("B"), DiscardStaged())
    s, _ = step(s, Done())
    assert s.last_result is not None and s.last_result["outcome"] == "refused"
    assert s.last_result["detail"] == "hash mismatch"


@pytest.mark.parametrize("phase", [Phase.DOWNLOADED, Phase.WRITTEN])
def test_a_staged_install_of_an_older_agent_streams_afresh(phase: Phase) -> None:
    old = at(phase)
    old.written, old.written_sha256 = 5, "b" * 64
    s, a = step(old, Resumed())
    assert s.phase is Phase.SELECTED and a == (InvalidateSlot("B"), StreamToSlot("B"))
    assert s.written == 0 and s.written_sha256 is None


def test_dropped_connection_keeps_the_slot_progress_until_stalled_too_often() -> None:
    """A transport failure while streaming waits for the next run (which resumes with a
    Range request); only MAX_STALLED_RUNS failures in a row without progress abandon."""
    s = at(Phase.SELECTED)
    s.written, s.written_sha256 = 4, "c" * 64
    cut = ActionFailed("stream_to_slot", "transport", "connection reset")
    for n in range(1, MAX_STALLED_RUNS):
        s, a = step(s, cut)
        assert s.phase is Phase.SELECTED and a == () and s.stalled_runs == n
        assert s.written == 4, "the checkpoint survives"
    s, a = step(s, cut)
    assert s.phase is Phase.ABANDONING and s.pending == {"outcome": "failed", "error": "transport"}
    s, _ = step(s, Done())
    assert s.phase is Phase.IDLE and s.written == 0 and s.stalled_runs == 0


def test_transport_failure_before_a_checkpoint_ends_the_install_as_before() -> None:
    s, a = step(at(Phase.SELECTED), ActionFailed("stream_to_slot", "transport", "HTTP 404"))
    assert s.phase is Phase.ABANDONING and a == (InvalidateSlot("B"), DiscardStaged())


def test_unhealthy_image_rolls_back_and_is_remembered() -> None:
    s, a = step(at(Phase.ARMED), HealthResult("exit 1"), view("B", "B"))
    assert s.phase is Phase.ROLLING_BACK and a == (InvalidateSlot("B"), Reboot())
    s, _ = step(s, Done(), view("A", None))
    assert s.phase is Phase.IDLE and s.rejected == [IMAGE.sha256]
    assert s.last_result is not None and s.last_result["outcome"] == "rolled-back"


@pytest.mark.parametrize(
    ("fallback", "bad"), [("tries-exhausted", True), ("verification-failed", False)]
)
def test_bootloader_giving_up_rolls_back(fallback: str, bad: bool) -> None:
    s, a = step(at(Phase.ARMED), Resumed(), view("A", None, boot_fallback=fallback))
    assert s.phase is Phase.ROLLING_BACK and s.bad_image is bad
    assert a == (InvalidateSlot("B"),)  # A runs: no reboot needed


def test_never_commits_a_slot_that_is_not_running() -> None:
    s, _ = step(at(Phase.HEALTHY), Resumed(), view("A", None))
    assert s.phase is Phase.ROLLING_BACK


def test_failure_after_arming_waits_instead_of_abandoning() -> None:
    s, a = step(at(Phase.HEALTHY), ActionFailed("raise_floor", "storage", "disk"), view("B"))
    assert s.phase is Phase.HEALTHY and a == ()


def test_armed_before_a_power_cut_is_never_re_armed() -> None:
    # Arm ran, the state still said "verified", the bootloader then used up the tries.
    v = view("A", None, boot_fallback="tries-exhausted", slots={"B": IMAGE})
    s, a = step(at(Phase.VERIFIED), Resumed(), v)
    assert s.phase is Phase.ROLLING_BACK and s.bad_image
    assert Arm("B", IMAGE) not in a


def test_transition_is_pure() -> None:
    state = at(Phase.VERIFIED)
    before = InstallState(**{**state.__dict__})
    step(state, Done())
    assert state == before


def test_floor_only_moves_up(tmp_path: Path) -> None:
    store = FileMonotonicStore.create(tmp_path / "m.json", Floor(Version.parse("1.1.0"), 2))
    store.raise_to(Version.parse("1.2.0"), 2)
    assert store.read() == Floor(Version.parse("1.2.0"), 2)
    with pytest.raises(DowngradeError):
        store.raise_to(Version.parse("1.1.9"), 5)
    with pytest.raises(DowngradeError):
        store.raise_to(Version.parse("1.3.0"), 1)
    assert store.read() == Floor(Version.parse("1.2.0"), 2)


def test_corrupt_floor_is_an_error_not_a_reset(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("{garbage")
    with pytest.raises(ConfigError, match="corrupt"):
        FileMonotonicStore(path).read()


def test_install_state_round_trip(tmp_path: Path) -> None:
    state = InstallState(
        phase=Phase.ARMED,
        target=IMAGE,
        from_slot="A",
        to_slot="B",
        history=["armed"],
        pending={"outcome": "refused", "error": "downgrade"},
    )
    state.save(tmp_path / "s.json")
    assert InstallState.load(tmp_path / "s.json") == state
