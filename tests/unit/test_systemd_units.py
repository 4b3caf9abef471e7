"""The shipped systemd units pass ``systemd-analyze verify`` and keep their ordering.

``verify`` checks the executables exist, so the units are verified as installed here:
``/usr/bin/otaguard`` pointed at this environment's ``otaguard`` script, the example
health check at ``/bin/true``. A directive systemd ignores (a typo) prints a warning but
exits 0, so any output naming a unit fails the test as well.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
NAMES = (
    "otaguard-agent.service",
    "otaguard-mark-good.service",
    "otaguard-measure-boot.service",
    "otaguard-health-example.service",
)


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "systemd-analyze is missing (systemd)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return tool


def _installed(tmp_path: Path, text_edit: tuple[str, str] | None = None) -> list[Path]:
    otaguard = Path(sys.executable).parent / "otaguard"
    assert otaguard.is_file(), "the otaguard console script is installed in this venv"
    out = []
    for name in NAMES:
        text = (UNITS / name).read_text()
        text = text.replace("/usr/bin/otaguard", str(otaguard))
        text = text.replace("/usr/local/bin/device-health-check --timeout 60", "/bin/true")
        if text_edit is not None:
            text = text.replace(*text_edit)
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def _verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), "verify", *map(str, units)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    got = _verify(_installed(tmp_path))
    ours = [line for line in (got.stdout + got.stderr).splitlines() if "otaguard" in line]
    assert got.returncode == 0, got.stderr
    assert ours == []


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a typo in a hardening directive is reported."""
    got = _verify(_installed(tmp_path, ("ProtectSystem=strict", "ProtectSystem=strickt")))
    assert "Failed to parse protect system value" in got.stderr


def _unit(name: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read(UNITS / name)
    return p


def test_mark_good_runs_after_boot_complete_and_health_checks_before_it() -> None:
    mark = _unit("otaguard-mark-good.service")
    assert mark["Unit"]["Requires"] == "boot-complete.target"
    assert mark["Unit"]["After"] == "boot-complete.target"
    assert mark["Service"]["ExecStart"].endswith(" mark-good")
    health = _unit("otaguard-health-example.service")
    assert health["Unit"]["Before"] == "boot-complete.target"
    assert health["Install"]["RequiredBy"] == "boot-complete.target"
    assert health["Unit"]["FailureAction"] == "reboot"
    for name in (
        "otaguard-agent.service",
        "otaguard-mark-good.service",
        "otaguard-measure-boot.service",
    ):
        svc = _unit(name)["Service"]
        assert (svc["NoNewPrivileges"], svc["ProtectSystem"]) == ("yes", "strict"), name
        assert svc["CapabilityBoundingSet"] == "", name


def test_the_boot_is_measured_before_the_agent_and_mark_good_run() -> None:
    """The agent's first check-in of a boot must carry this boot's measurement (ADR 0038);
    the unit needs no network and writes only the device directory."""
    measure = _unit("otaguard-measure-boot.service")
    assert measure["Unit"]["Before"].split() == [
        "otaguard-agent.service",
        "otaguard-mark-good.service",
    ]
    assert measure["Service"]["ExecStart"].endswith(" measure-boot")
    assert measure["Service"]["PrivateNetwork"] == "yes"
    assert measure["Service"]["ReadWritePaths"] == "/var/lib/otaguard"


def _enabled_boot(tmp_path: Path, text_edit: tuple[str, str] | None = None) -> str:
    """``verify multi-user.target`` with the units enabled as their [Install] says (the
    wants/requires links in a unit directory searched first): systemd builds the boot's
    start transaction and reports an ordering cycle it would break by dropping a job."""
    tmp_path.mkdir()
    _installed(tmp_path, text_edit)
    for target, unit in (
        ("multi-user.target.wants", "otaguard-mark-good.service"),
        ("multi-user.target.wants", "otaguard-measure-boot.service"),
        ("boot-complete.target.requires", "otaguard-health-example.service"),
    ):
        (tmp_path / target).mkdir(exist_ok=True)
        (tmp_path / target / unit).symlink_to(tmp_path / unit)
    got = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", "multi-user.target"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )  # fmt: skip
    return got.stdout + got.stderr


def test_enabled_units_form_no_ordering_cycle_at_boot(tmp_path: Path) -> None:
    """mark-good is wanted by multi-user.target, so that target starts after it; a health
    unit ordered after multi-user.target closes a cycle through boot-complete.target and
    systemd skips mark-good: the new slot would never be committed (seen on the virtual
    board). The shipped units have none; the old example's ``After=`` makes one."""
    assert "ordering cycle" not in _enabled_boot(tmp_path / "shipped")
    cyclic = _enabled_boot(
        tmp_path / "cyclic",
        ("Before=boot-complete.target\n", "Before=boot-complete.target\nAfter=multi-user.target\n"),
    )
    assert "Found ordering cycle" in cyclic and "otaguard-mark-good.service" in cyclic, cyclic
