"""The nonce for the next check-in, handed out with an accepted one (ADR 0036).

An accepted check-in's answer carries a fresh server nonce for the device's next check-in,
so that one is a single request (the signed manifest) instead of two (ask for a nonce,
then answer it). The agent keeps it in the device directory (written atomically, mode
0600), replaces it with the next one when the server answers, and drops it when the
server refuses it. A check-in that never got an answer (the server down, a power cut)
leaves it in place — a failed check-in changes nothing on the device — and if the server
did spend it, the next check-in is refused as a replay and asks for a fresh one.

Nothing here is trusted more than a nonce fetched on demand: the server still checks that
it issued the nonce to this device and certificate, unused and unexpired, and a refusal of
a stored nonce makes the agent ask for a fresh one and check in again (:mod:`.checkin`).
A missing, unreadable or expired file just means asking first, as before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Final

from otaguard._fs import atomic_write_json
from otaguard.agent.config import DevicePaths

__all__ = [
    "MAX_NONCE_FILE_BYTES",
    "StoredNonce",
    "discard_next_nonce",
    "read_next_nonce",
    "store_next_nonce",
]

logger = logging.getLogger(__name__)

#: the file holds a nonce (at most 128 characters), a flag and a time; more is not ours
MAX_NONCE_FILE_BYTES: Final = 1024


@dataclass(frozen=True)
class StoredNonce:
    """A nonce for the next check-in, as the server handed it out."""

    nonce: str
    #: the server holds this device's attestation key (so no registration is needed first)
    attestation_key_registered: bool
    #: the server's expiry (its clock): past it by ours, the nonce is not worth a request
    expires: dt.datetime


def store_next_nonce(paths: DevicePaths, nonce: StoredNonce) -> None:
    """Keep ``nonce`` for the next check-in (atomic; a failure only costs a request)."""
    doc = {
        "nonce": nonce.nonce,
        "attestation_key_registered": nonce.attestation_key_registered,
        "expires": nonce.expires.isoformat(),
    }
    try:
        atomic_write_json(paths.next_nonce, doc, mode=0o600)
    except OSError as e:
        logger.warning("cannot keep the next check-in's nonce (%s); it will ask for one", e)


def discard_next_nonce(paths: DevicePaths) -> None:
    """Forget the kept nonce (the server refused it, or handed out none)."""
    with contextlib.suppress(FileNotFoundError, OSError):
        paths.next_nonce.unlink()


def read_next_nonce(paths: DevicePaths, *, now: dt.datetime) -> StoredNonce | None:
    """The kept nonce; ``None`` when there is none, or it is unreadable or expired by this
    device's clock (then it is dropped)."""
    path = paths.next_nonce
    try:
        with path.open("rb") as f:
            data = f.read(MAX_NONCE_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.warning("cannot read the kept check-in nonce %s: %s", path, e)
        discard_next_nonce(paths)
        return None
    try:
        doc = json.loads(data) if len(data) <= MAX_NONCE_FILE_BYTES else {}
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        stored = StoredNonce(
            nonce=str(doc["nonce"]),
            attestation_key_registered=doc["attestation_key_registered"] is True,
            expires=dt.datetime.fromisoformat(str(doc["expires"])),
        )
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        logger.warning("ignoring the kept check-in nonce %s: unreadable", path)
        discard_next_nonce(paths)
        return None
    if stored.expires.tzinfo is None or stored.expires <= now:
        discard_next_nonce(paths)
        return None
    return stored
