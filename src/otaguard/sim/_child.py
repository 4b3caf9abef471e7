"""Run one device's update in a child process and report it as one JSON line.

A device whose key lives in a TPM presents it in TLS through the tpm2 OpenSSL provider,
and a process with that provider loaded cannot also sign with a software key through
Python's ``ssl`` (ADR 0006) -- which the demo's in-process server does. So the demo and
the fleet simulator run TPM-backed devices here, as a real device runs its own agent.

Output: ``{"result": {...UpdateResult...}}`` or ``{"error": {"kind": CLASS, "message": M}}``.
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
    try:
        result = Device(Path(argv[0])).update()
    except OtaguardError as e:
        print(json.dumps({"error": {"kind": type(e).__name__, "message": str(e)}}))
        return 0
    print(json.dumps({"result": dataclasses.asdict(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
