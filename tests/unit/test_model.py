"""Pure model types: versions and release fields."""

from __future__ import annotations

import pytest

from otaguard.model import ReleaseInfo, VerificationError, Version


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("1.0.0", "1.0.1"),
        ("1.9.0", "1.10.0"),
        ("1.0.0-rc.1", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-beta"),
        ("1.0.0-2", "1.0.0-10"),
        ("1.0.0-9", "1.0.0-a"),
        ("0.9.9", "1.0.0"),
    ],
)
def test_version_precedence(low: str, high: str) -> None:
    assert Version.parse(low) < Version.parse(high)
    assert not Version.parse(high) < Version.parse(low)


@pytest.mark.parametrize("bad", ["1.0", "01.0.0", "1.0.0.0", "v1.0.0", "", "1.0.0-", "x" * 100])
def test_invalid_versions_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid version"):
        Version.parse(bad)


def test_build_metadata_does_not_change_precedence() -> None:
    assert Version.parse("1.2.3+build.7") == Version.parse("1.2.3")
    assert str(Version.parse("1.2.3-rc.1+b")) == "1.2.3-rc.1"


def test_release_info_round_trip() -> None:
    info = ReleaseInfo(Version.parse("2.1.0"), 4, ("hw-a", "hw-b"), "security")
    assert ReleaseInfo.from_custom(info.to_custom()) == info


@pytest.mark.parametrize(
    "custom",
    [
        None,
        {},
        {
            "version": "1.0.0",
            "security_counter": "1",
            "hardware_ids": ["a"],
            "release_type": "feature",
        },
        {
            "version": "1.0.0",
            "security_counter": True,
            "hardware_ids": ["a"],
            "release_type": "feature",
        },
        {
            "version": "1.0.0",
            "security_counter": -1,
            "hardware_ids": ["a"],
            "release_type": "feature",
        },
        {"version": "1.0.0", "security_counter": 0, "hardware_ids": [], "release_type": "feature"},
        {"version": "1.0.0", "security_counter": 0, "hardware_ids": "a", "release_type": "feature"},
        {
            "version": "1.0.0",
            "security_counter": 0,
            "hardware_ids": ["a"],
            "release_type": "urgent",
        },
        {"version": "one", "security_counter": 0, "hardware_ids": ["a"], "release_type": "feature"},
        {
            "version": "1.0.0",
            "security_counter": 2**64,
            "hardware_ids": ["a"],
            "release_type": "feature",
        },
    ],
)
def test_malformed_custom_fields_are_refused(custom: object) -> None:
    with pytest.raises(VerificationError):
        ReleaseInfo.from_custom(custom)  # type: ignore[arg-type]
