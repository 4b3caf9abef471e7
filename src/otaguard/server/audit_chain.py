"""The audit log's hash chain: hashing an entry and verifying a chain. Pure.

Every entry carries the hash of the entry before it (``prev``; the first one carries
:data:`GENESIS`) and its own hash over its content and ``prev``. Editing an entry in
place breaks its own hash; deleting or re-inserting one breaks the ``prev`` link (and the
contiguous sequence numbers) of the entry after it; re-hashing an edited entry moves the
break to its successor. What the chain cannot show on its own is the loss of the newest
entries: ``otaguard audit --verify`` prints the head hash so an operator can keep it
elsewhere and compare (ADR 0010).

The hashed form is the canonical JSON (sorted keys, no spaces, UTF-8) of the fields
below with the time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``: the database adapter and the
CLI's verifier hash exactly the same bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from otaguard.model.errors import VerificationError

__all__ = [
    "GENESIS",
    "AuditChainError",
    "AuditEntry",
    "entry_hash",
    "format_time",
    "verify_chain",
]

#: ``prev`` of the first entry
GENESIS: Final = "0" * 64


class AuditChainError(VerificationError):
    """The audit chain is broken; the message names the first entry that fails."""


def format_time(value: dt.datetime) -> str:
    """The hashed form of a time: UTC, microseconds, ``Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AuditEntry:
    """One audit entry: who did what to what, when, with what result.

    Attributes:
        seq: position in the log, 1, 2, 3, ... without gaps.
        time: server time of the action.
        actor: the operator token's name (never the token), ``local`` for commands run
            on the server's data directory.
        role: the actor's role then.
        action: what was asked, e.g. ``device.quarantine``.
        target: what it was asked of (a serial, group or operator name), or ``""``.
        result: ``ok``, or ``refused 403: <reason>`` / ``failed 500`` and the like.
        request_id: the request's id (``X-Request-ID``), to find it in server logs.
        detail: a short note (the reason given, the tags set), never a secret.
        prev: the hash of the entry before (:data:`GENESIS` for the first).
        hash: this entry's hash (:func:`entry_hash`).
    """

    seq: int
    time: dt.datetime
    actor: str
    role: str
    action: str
    target: str
    result: str
    request_id: str
    detail: str
    prev: str
    hash: str


def entry_hash(
    *,
    seq: int,
    time: dt.datetime,
    actor: str,
    role: str,
    action: str,
    target: str,
    result: str,
    request_id: str,
    detail: str,
    prev: str,
) -> str:
    """SHA-256 (hex) of an entry's canonical JSON, ``prev`` included."""
    content = {
        "seq": seq,
        "time": format_time(time),
        "actor": actor,
        "role": role,
        "action": action,
        "target": target,
        "result": result,
        "request_id": request_id,
        "detail": detail,
        "prev": prev,
    }
    data = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


def verify_chain(entries: Iterable[AuditEntry]) -> tuple[int, str]:
    """Check a whole log, oldest first, from entry 1.

    Checks, per entry, in order: (1) its sequence number follows the previous one (a
    gap is a deleted entry); (2) its ``prev`` is the previous entry's hash (a deleted,
    inserted or re-hashed entry before it); (3) its hash is the hash of its content.

    Returns:
        The number of entries and the head hash (:data:`GENESIS` for an empty log).

    Raises:
        AuditChainError: the first entry failing a check, named by its number.
    """
    expected_seq, prev = 1, GENESIS
    for e in entries:
        if e.seq != expected_seq:
            raise AuditChainError(
                f"audit chain broken at entry {e.seq}: expected entry {expected_seq} "
                f"(entries {expected_seq}..{e.seq - 1} deleted?)"
            )
        if e.prev != prev:
            raise AuditChainError(
                f"audit chain broken at entry {e.seq}: it does not follow entry "
                f"{e.seq - 1} (that entry was altered, removed or re-inserted)"
            )
        recomputed = entry_hash(
            seq=e.seq,
            time=e.time,
            actor=e.actor,
            role=e.role,
            action=e.action,
            target=e.target,
            result=e.result,
            request_id=e.request_id,
            detail=e.detail,
            prev=e.prev,
        )
        if recomputed != e.hash:
            raise AuditChainError(
                f"audit chain broken at entry {e.seq}: its content does not match its hash "
                "(the entry was altered)"
            )
        expected_seq, prev = e.seq + 1, e.hash
    return expected_seq - 1, prev
