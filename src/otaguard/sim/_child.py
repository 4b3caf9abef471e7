"""Run one device's update in a child process and report it as one JSON line.

A device whose key lives in a TPM presents it in TLS through the tpm2 OpenSSL provider,
and a process with that provider loaded cannot also sign with a software key through
Python's ``ssl`` (ADR 0006) -- which the demo's in-process server does. So the demo and
the fleet simulator run TPM-backed devices here, as a real device runs its own agent.

Output: ``{"result": {...UpdateResult...}, "downloaded": [N, TOTAL]}`` (the bytes a delta or
compressed stream downloaded, when one did) or ``{"error": {"kind": CLASS, "message": M}}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

from otaguard.agent import Device
from otaguard.model.errors import InsecureModeWarning, OtaguardError

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Update the device in ``argv[0]``; print the outcome as JSON; exit 0 (reported)."""
    warnings.filterwarnings("ignore", category=InsecureModeWarning)
    downloaded: list[int] = []

    def on_progress(stage: str, n: int, total: int) -> None:
        if stage == "downloaded":  # the parent's progress display cannot see this process
            downloaded[:] = [(downloaded[0] if downloaded else 0) + n, total]

    try:
        result = Device(Path(argv[0])).update(progress=on_progress)
    except OtaguardError as e:
        print(json.dumps({"error": {"kind": type(e).__name__, "message": str(e)}}))
        return 0
    answer: dict[str, object] = {"result": dataclasses.asdict(result)}
    if downloaded:
        answer["downloaded"] = downloaded
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
