"""Attack flags: what the device refused, kept until an accepted check-in reports them.

A refusal (a forged image, a downgrade, a director instruction the image repository does
not back, a director instruction that fails verification) is recorded here at once, in
a small JSON file written atomically, and goes into the signed manifest of the next
check-in (:mod:`.checkin`). The server's acceptance of that manifest clears exactly the
flags it carried, so a refusal between the two is not lost.
"""

from __future__ import annotations

import json
import logging

from otaguard._fs import atomic_write_json
from otaguard.agent.config import DevicePaths
from otaguard.model.errors import (
    DirectorMetadataError,
    DirectorMismatchError,
    DowngradeError,
    OtaguardError,
)
from otaguard.model.manifest import ATTACK_FLAGS

__all__ = ["clear_flags", "flag_for", "read_flags", "record_flag"]

logger = logging.getLogger(__name__)


def read_flags(paths: DevicePaths) -> tuple[str, ...]:
    """The flags recorded and not yet reported (sorted; unknown or corrupt entries dropped)."""
    try:
        raw = json.loads(paths.attack_flags.read_text())
    except FileNotFoundError:
        return ()
    except (OSError, ValueError):
        # Losing a report is better than wedging every future check-in on a corrupt file.
        logger.warning("attack flag file %s is unreadable; starting anew", paths.attack_flags)
        return ()
    if not isinstance(raw, list):
        return ()
    return tuple(sorted({f for f in raw if isinstance(f, str) and f in ATTACK_FLAGS}))


def record_flag(paths: DevicePaths, flag: str) -> None:
    """Remember ``flag`` for the next check-in (atomic; idempotent)."""
    if flag not in ATTACK_FLAGS:
        raise ValueError(f"unknown attack flag {flag!r}")
    flags = set(read_flags(paths)) | {flag}
    atomic_write_json(paths.attack_flags, sorted(flags), mode=0o600)
    logger.warning("attack flag raised: %s (reported at the next check-in)", flag)


def clear_flags(paths: DevicePaths, reported: tuple[str, ...]) -> None:
    """Forget the flags an accepted check-in carried (those raised since stay)."""
    if not reported:
        return
    left = set(read_flags(paths)) - set(reported)
    atomic_write_json(paths.attack_flags, sorted(left), mode=0o600)


def flag_for(error: OtaguardError) -> str | None:
    """The attack flag a refusal stands for, ``None`` for other failures."""
    if isinstance(error, DirectorMismatchError):
        return "director-image-mismatch"
    if isinstance(error, DirectorMetadataError):
        return "director-metadata-invalid"
    if isinstance(error, DowngradeError):
        return "downgrade"
    return None
