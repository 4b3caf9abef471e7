"""The director's per-device instruction: names and limits both ends agree on.

The director answers each accepted check-in with TUF ``targets`` metadata signed by its
online key (the director root's ``targets`` role), naming the one image this device
should install, or none. Its signed top-level ``custom`` field binds it to the check-in::

    {"signed": {"_type": "targets", "version": 1, "expires": ...,
                "custom": {"otaguard_director": {"serial": ..., "nonce": ...}},
                "targets": {"<name>": {"length": ..., "hashes": {...},
                                       "custom": {"hardware_id": ...}}}},
     "signatures": [...]}

Pure constants only; the server builds it (:mod:`otaguard.server.director`), the device
verifies it (:mod:`otaguard.agent.director`).
"""

from __future__ import annotations

import datetime as dt
from typing import Final

__all__ = [
    "DIRECTOR_BINDING_KEY",
    "DIRECTOR_TARGETS_LIFETIME",
    "MAX_DIRECTOR_ROOT_BYTES",
    "MAX_DIRECTOR_TARGETS",
    "MAX_DIRECTOR_TARGETS_BYTES",
]

#: key of the binding record in the signed ``custom`` field of the director's targets
DIRECTOR_BINDING_KEY: Final = "otaguard_director"
#: an instruction answers one check-in and is verified within seconds of it; short, so a
#: captured one is useless soon even to a device whose nonce check were bypassed
DIRECTOR_TARGETS_LIFETIME: Final = dt.timedelta(minutes=5)
#: one device installs one image at a time (Uptane: one target per ECU; one ECU here)
MAX_DIRECTOR_TARGETS: Final = 1
#: one target and one Ed25519 or ML-DSA-65 signature (3.3 kB) fit easily; more is hostile
MAX_DIRECTOR_TARGETS_BYTES: Final = 12 * 1024
#: a hybrid root (two keys of each role, one of them ML-DSA-65) is about 10 kB
MAX_DIRECTOR_ROOT_BYTES: Final = 512 * 1024
