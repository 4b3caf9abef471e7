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
    Step,
    next_step,
    select_update,
)
from otaguard.model import ConfigError, DowngradeError, ReleaseInfo, Version


def offer(version: str, counter: int = 0, length: int = 10) -> Offer:
    tf = TargetFile(length, {"sha256": "0" * 64}, f"fw-{version}.img")
    return Offer(tf, ReleaseInfo(Version.parse(version), counter, ("hw",), "feature"))


def select(offers: list[Offer], running: str = "1.0.0", floor: int = 0, max_length: int = 100):  # type: ignore[no-untyped-def]
    return select_update(
        offers, running=Version.parse(running), floor_counter=floor, max_length=max_length
    )


def test_selects_newest_above_running() -> None:
    sel = select([offer("1.0.0"), offer("1.2.0"), offer("1.1.0")])
    assert sel.chosen is not None and str(sel.chosen.info.version) == "1.2.0"
    assert sel.refused == []


def test_nothing_newer_is_up_to_date_not_refused() -> None:
    sel = select([offer("0.9.0"), offer("1.0.0")])
    assert sel.chosen is None and sel.refused == []


def test_only_older_offered_is_a_refused_downgrade() -> None:
    sel = select([offer("0.9.0")], running="1.0.0")
    assert sel.chosen is None
    assert sel.refused and "0.9.0" in sel.refused[0][1]


def test_newer_version_with_lower_counter_is_refused_and_next_best_chosen() -> None:
    sel = select([offer("1.2.0", counter=1), offer("1.1.0", counter=3)], floor=3)
    assert sel.chosen is not None and str(sel.chosen.info.version) == "1.1.0"
    assert sel.refused[0][0] == "fw-1.2.0.img"


def test_image_larger_than_slot_is_refused() -> None:
    sel = select([offer("1.1.0", length=1000)], max_length=100)
    assert sel.chosen is None and "exceeds" in sel.refused[0][1]


IMAGE = SlotImage("fw-1.1.0.img", "1.1.0", 1, "a" * 64, 10)


@pytest.mark.parametrize(
    ("phase", "booted", "try_slot", "expected"),
    [
        (Phase.IDLE, "A", None, Step.DONE),
        (Phase.SELECTED, "A", None, Step.DOWNLOAD),
        (Phase.DOWNLOADED, "A", None, Step.WRITE),
        (Phase.WRITTEN, "A", None, Step.VERIFY_SLOT),
        (Phase.VERIFIED, "A", None, Step.ARM),
        (Phase.ARMED, "A", "B", Step.REBOOT),
        (Phase.ARMED, "B", "B", Step.HEALTH_CHECK),
        (Phase.ARMED, "A", None, Step.ROLL_BACK),  # bootloader gave up on B
        (Phase.HEALTHY, "B", "B", Step.COMMIT),
        (Phase.HEALTHY, "B", None, Step.COMMIT),  # commit's boot-env write done, floor not yet
        (Phase.HEALTHY, "A", None, Step.ROLL_BACK),  # never commit a slot that is not running
        (Phase.ROLLING_BACK, "B", "B", Step.ROLL_BACK),
    ],
)
def test_next_step(phase: Phase, booted: str, try_slot: str | None, expected: Step) -> None:
    state = InstallState(phase=phase, target=IMAGE, from_slot="A", to_slot="B")
    assert next_step(state, booted_slot=booted, try_slot=try_slot) is expected


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
        phase=Phase.ARMED, target=IMAGE, from_slot="A", to_slot="B", history=["arm"]
    )
    state.save(tmp_path / "s.json")
    assert InstallState.load(tmp_path / "s.json") == state
