"""``make soak``: installs against a running server, the agent or the server SIGKILLed at
random moments, every device checked after each (:mod:`otaguard.sim.soak`).

Prints a progress line per round and, last, one summary line:
``soak: N/N safe (K agent kills, M server kills, ...)``; exits 1 if any run was unsafe
(the first failures are printed above it), 2 if the soak could not be set up.
"""

from __future__ import annotations

import argparse
import faulthandler
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from otaguard.model.errors import InsecureModeWarning, OtaguardError
from otaguard.sim.soak import SoakReport, SoakSettings, run_soak


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print."""
    p = argparse.ArgumentParser(prog="tools/soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--work-dir", type=Path,
        help="new or empty; kept afterwards (default: a temporary one, kept if a run failed)",
    )  # fmt: skip
    a = p.parse_args(argv)
    # a crash of the driver (it runs devices' updates in threads) shows every thread's stack
    faulthandler.enable()
    # The soak's devices have development file keys and no director root: each install
    # would warn twice. Said once here instead.
    print("soak: devices with development file keys and no director (warned once here)")
    warnings.filterwarnings("ignore", category=InsecureModeWarning)

    shown = 0

    def failures(r: SoakReport) -> None:
        nonlocal shown
        for failure in r.failures[shown:]:
            print(f"UNSAFE {failure}", flush=True)
        shown = len(r.failures)

    def show(r: SoakReport) -> None:
        failures(r)
        print(f"  {r.runs} runs, {r.safe} safe, {r.releases} releases, {r.elapsed:.0f} s",
              flush=True)  # fmt: skip

    work = a.work_dir or Path(tempfile.mkdtemp(prefix="otaguard-soak-"))
    try:
        settings = SoakSettings(
            runs=a.runs, seed=a.seed, devices=a.devices, workers=a.workers, work_dir=work
        )
        report = run_soak(settings, progress=show)
    except OtaguardError as e:
        print(f"soak: cannot run: {e}", file=sys.stderr)
        return 2
    if report.ok and a.work_dir is None:
        shutil.rmtree(work)
    elif not report.ok:
        print(f"the devices, the server's data and its log are in {work}")
    failures(report)
    print(report.line())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
