"""The soak in CI (issue 12 item 5): 50 installs against a real ``otaguard server``
process, each cut by a SIGKILL of the agent's process group or, in one run in ten, of the
server's; every device checked after each run, the served repository audited from the
offline root. ``make soak`` runs the same code 1,000 times (``tools/soak.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from otaguard.sim.soak import SoakSettings, run_soak

pytestmark = pytest.mark.slow

RUNS = 50
SEED = 20261212
#: cut phases that lie inside the install (between its first persisted step and its end)
INSIDE = {"selected", "streaming", "downloaded", "written", "verified", "armed", "healthy"}
TOOL = Path(__file__).resolve().parents[2] / "tools" / "soak.py"


def test_fifty_cut_installs_all_end_on_a_verified_image_at_the_floor(tmp_path: Path) -> None:
    report = run_soak(SoakSettings(runs=RUNS, seed=SEED, work_dir=tmp_path / "soak"))

    assert report.failures == [], report.failures
    assert report.safe == report.runs == RUNS, report.line()
    assert report.server_kills == RUNS // 10
    # The agent runs: nearly all were SIGKILLed while working, across the install's steps.
    assert report.agent_kills + report.finished_before_cut == RUNS - report.server_kills
    assert report.agent_kills >= (RUNS - report.server_kills) * 3 // 4, report.line()
    assert len(INSIDE & set(report.cut_at)) >= 3, report.line()
    # a fresh client verified the chain and every blob the server serves, at the end
    assert report.blobs_checked >= report.releases, report.line()
    assert report.line().startswith(f"soak: {RUNS}/{RUNS} safe ({report.agent_kills} agent kills")


def test_soak_tool_refuses_a_non_empty_work_dir_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")

    proc = subprocess.run(
        [sys.executable, str(TOOL), "--runs", "1", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == (
        f"soak: cannot run: {tmp_path} is not empty: give the soak a new or empty directory"
    )
    assert (tmp_path / "precious.txt").read_text() == "keep me"
