"""The health check of simulated devices: ``python -m otaguard.healthcheck``.

The agent runs a device's health command after a new image boots, with
``OTAGUARD_DEVICE_DIR`` and ``OTAGUARD_SLOT`` set. On a simulated device the "image" is a
file slot; an image built to fail (``otaguard.sim.make_image(..., unhealthy=True)``)
carries :data:`UNHEALTHY_MARKER` in its first bytes, the way a real image would crash
or fail its self-test. Exit 0 healthy, 1 unhealthy, 2 misconfigured.

Deliberately imports nothing heavy: it runs once per trial boot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

__all__ = ["UNHEALTHY_MARKER", "main"]

UNHEALTHY_MARKER: Final = b"OTAGUARD-SIM-UNHEALTHY"
# The marker sits at the start of an image; reading this much is enough.
HEADER_BYTES: Final = 4096


def main() -> int:
    """Check the slot named by the environment; return the exit code."""
    device_dir = os.environ.get("OTAGUARD_DEVICE_DIR")
    slot = os.environ.get("OTAGUARD_SLOT")
    if not device_dir or slot not in ("A", "B"):
        print("health check: OTAGUARD_DEVICE_DIR and OTAGUARD_SLOT must be set", file=sys.stderr)
        return 2
    try:
        with open(Path(device_dir) / "slots" / f"{slot.lower()}.img", "rb") as f:
            header = f.read(HEADER_BYTES)
    except OSError as e:
        print(f"health check: cannot read slot {slot}: {e.strerror}", file=sys.stderr)
        return 1
    if UNHEALTHY_MARKER in header:
        print(f"health check: the image in slot {slot} fails its self-test", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
