"""The shipped server unit passes ``systemd-analyze verify`` and keeps its hardening.

``verify`` checks that the executable exists, so the unit is verified as installed here:
``/usr/bin/otaguard`` pointed at this environment's ``otaguard`` script. A directive systemd
ignores (a typo) prints a warning but exits 0, so any output naming the unit fails too.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "otaguard-server.service"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "systemd-analyze is missing (Debian package systemd)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return tool


def _verify(
    tmp_path: Path, edit: tuple[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    otaguard = Path(sys.executable).parent / "otaguard"
    assert otaguard.is_file(), "the otaguard console script is installed in this venv"
    text = UNIT.read_text().replace("/usr/bin/otaguard", str(otaguard))
    if edit is not None:
        assert edit[0] in text
        text = text.replace(*edit)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return subprocess.run(
        [_systemd_analyze(), "verify", str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_server_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    got = _verify(tmp_path)
    assert got.returncode == 0, got.stderr
    assert [ln for ln in (got.stdout + got.stderr).splitlines() if "otaguard" in ln] == []


def test_a_typo_in_the_server_unit_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a misspelt hardening directive is reported."""
    got = _verify(tmp_path, ("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "Unknown key 'NoNewPrivilege'" in got.stderr


def test_server_unit_is_hardened() -> None:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read(UNIT)
    svc = p["Service"]
    assert svc["DynamicUser"] == "yes"
    assert svc["StateDirectory"] == "otaguard-server"
    assert (svc["NoNewPrivileges"], svc["ProtectSystem"], svc["ProtectHome"]) == (
        "yes",
        "strict",
        "yes",
    )
    assert svc["CapabilityBoundingSet"] == ""
    assert svc["PrivateDevices"] == "yes"
    # the data directory it is told to use is the state directory it gets
    assert "--data /var/lib/otaguard-server" in svc["ExecStart"]
    assert "--config /etc/otaguard/server.toml" in svc["ExecStart"]
