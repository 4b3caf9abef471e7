"""Pure verification of a complete set of repository metadata files.

Bytes in, report out; no I/O. Used by ``otaguard repo verify`` (with target blobs
checked by the caller) and by the server before it accepts a publication.

Checklist (TUF specification, client workflow §5, applied to a whole repository):

1. Every root version verifies against its predecessor's and its own keys and thresholds,
   versions are sequential, starting from the trusted root (or ``1.root.json``).
2. The newest root is not expired.
3. ``timestamp.json`` is signed by a threshold of the root's timestamp keys, not expired.
4. The snapshot it names exists, matches its length and hashes when given, is signed by
   a threshold of snapshot keys, has the named version, and is not expired.
5. The targets metadata the snapshot names exists, is signed by a threshold of targets
   keys (both halves of a hybrid pair), has the named version, and is not expired.
6. Every target carries valid otaguard custom fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from otaguard.model.errors import VerificationError
from otaguard.model.release import ReleaseInfo

__all__ = [
    "MAX_ROOT_VERSIONS",
    "RoleCheck",
    "VerificationReport",
    "check_metadata",
    "verify_published",
]

# Versioned metadata file names are `<N>.<role>.json`; anything else is refused.
VERSIONED_NAME: Final = re.compile(r"^([1-9][0-9]{0,9})\.(root|targets|snapshot)\.json$")
# More root versions than this in one repository is not a rotation history but an attack.
MAX_ROOT_VERSIONS: Final = 1024


@dataclass
class RoleCheck:
    """Outcome of checking one role's metadata."""

    role: str
    version: int | None = None
    expires: datetime | None = None
    signed: int = 0
    threshold: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the role passed every check."""
        return not self.problems


@dataclass
class VerificationReport:
    """Everything :func:`check_metadata` found; fails closed (``ok`` needs every role)."""

    roles: dict[str, RoleCheck]
    targets: dict[str, ReleaseInfo | None] = field(default_factory=dict)
    target_meta: Targets | None = None
    newest_root: bytes | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True only when all four top-level roles were found and verified."""
        names = ("root", "timestamp", "snapshot", "targets")
        return not self.problems and all(n in self.roles and self.roles[n].ok for n in names)

    def all_problems(self) -> list[str]:
        """Every problem found, each one line naming the role."""
        out = list(self.problems)
        for check in self.roles.values():
            out.extend(f"{check.role}: {p}" for p in check.problems)
        return out


def _load(data: bytes, cls: type[Signed], name: str) -> Metadata[Any]:
    try:
        md = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise VerificationError(f"{name} is not valid TUF metadata: {e}") from e
    if not isinstance(md.signed, cls):
        raise VerificationError(f"{name} is not {cls.type} metadata")
    return md


def _check_signatures(root: Root, role: str, md: Metadata, check: RoleCheck) -> None:  # type: ignore[type-arg]
    result = root.get_verification_result(role, md.signed_bytes, md.signatures)
    check.signed, check.threshold = len(result.signed), result.threshold
    if not result.verified:
        check.problems.append(
            f"signed by {len(result.signed)} of the {result.threshold} required keys"
        )


def _check_expiry(md: Metadata, check: RoleCheck, now: datetime) -> None:  # type: ignore[type-arg]
    check.version, check.expires = md.signed.version, md.signed.expires
    if md.signed.is_expired(now):
        check.problems.append(f"expired at {md.signed.expires:%Y-%m-%d %H:%M:%S} UTC")


def _verify_roots(
    files: Mapping[str, bytes], trusted_root: bytes | None, now: datetime
) -> tuple[Root, bytes, RoleCheck]:
    check = RoleCheck("root")
    versions = sorted(
        int(m.group(1)) for n in files if (m := VERSIONED_NAME.match(n)) and m.group(2) == "root"
    )
    if len(versions) > MAX_ROOT_VERSIONS:
        raise VerificationError(f"too many root versions ({len(versions)})")
    if trusted_root is not None:
        current = _load(trusted_root, Root, "trusted root")
        current_bytes = trusted_root
    elif 1 in versions:
        current_bytes = files["1.root.json"]
        current = _load(current_bytes, Root, "1.root.json")
        first = current.signed.get_root_verification_result(
            None, current.signed_bytes, current.signatures
        )
        if not first.verified:
            raise VerificationError("1.root.json is not signed by a threshold of its own keys")
    else:
        raise VerificationError("no root metadata (1.root.json) found")
    root: Root = current.signed
    for v in versions:
        if v <= root.version:
            continue
        if v != root.version + 1:
            raise VerificationError(f"root versions are not sequential: {root.version} then {v}")
        name = f"{v}.root.json"
        new = _load(files[name], Root, name)
        new_root: Root = new.signed
        if new_root.version != v:
            raise VerificationError(f"{name} carries version {new_root.version}")
        result = new_root.get_root_verification_result(root, new.signed_bytes, new.signatures)
        if not result.verified:
            raise VerificationError(f"{name} is not signed by a threshold of old and new root keys")
        root, current, current_bytes = new_root, new, files[name]
    _check_signatures(root, Root.type, current, check)
    _check_expiry(current, check, now)
    return root, current_bytes, check


def _load_linked(
    files: Mapping[str, bytes],
    meta: MetaFile,
    cls: type[Signed],
    *,
    parent: str,
    root: Root,
    check: RoleCheck,
    now: datetime,
) -> Metadata[Any]:
    """Load the role file ``parent`` names in ``meta`` and check it against that link."""
    name = f"{meta.version}.{cls.type}.json"
    if name not in files:
        raise VerificationError(f"{parent} names {name}, which is missing")
    try:
        meta.verify_length_and_hashes(files[name])
    except LengthOrHashMismatchError as e:
        raise VerificationError(f"{name} does not match the {parent}: {e}") from e
    md = _load(files[name], cls, name)
    _check_signatures(root, cls.type, md, check)
    _check_expiry(md, check, now)
    if md.signed.version != meta.version:
        check.problems.append(f"{name} carries version {md.signed.version}")
    return md


def check_metadata(
    files: Mapping[str, bytes], *, trusted_root: bytes | None, now: datetime
) -> VerificationReport:
    """Check a whole repository's metadata files and report every finding.

    Args:
        files: file name (``1.root.json``, ``timestamp.json``, ``3.snapshot.json`` ...)
            to the exact signed bytes.
        trusted_root: root metadata already trusted (e.g. the one a server or device
            holds); ``None`` trusts ``1.root.json`` on first use.
        now: reference time for expiry, captured once by the caller.

    Returns:
        A report; structural failures (no root, broken root chain) are in ``problems``.
    """
    report = VerificationReport(roles={})
    try:
        root, report.newest_root, report.roles["root"] = _verify_roots(files, trusted_root, now)
        ts_check = report.roles.setdefault("timestamp", RoleCheck("timestamp"))
        if "timestamp.json" not in files:
            raise VerificationError("timestamp.json is missing")
        ts = _load(files["timestamp.json"], Timestamp, "timestamp.json")
        _check_signatures(root, Timestamp.type, ts, ts_check)
        _check_expiry(ts, ts_check, now)

        sn_check = report.roles.setdefault("snapshot", RoleCheck("snapshot"))
        snap = _load_linked(
            files,
            ts.signed.snapshot_meta,
            Snapshot,
            parent="timestamp",
            root=root,
            check=sn_check,
            now=now,
        )
        tmeta = snap.signed.meta.get("targets.json")
        if tmeta is None:
            raise VerificationError("snapshot does not list targets.json")
        tg_check = report.roles.setdefault("targets", RoleCheck("targets"))
        tg = _load_linked(
            files, tmeta, Targets, parent="snapshot", root=root, check=tg_check, now=now
        )
        report.target_meta = tg.signed
        for path, target in tg.signed.targets.items():
            try:
                report.targets[path] = ReleaseInfo.from_custom(target.custom)
            except VerificationError as e:
                report.targets[path] = None
                tg_check.problems.append(f"target {path}: {e}")
    except VerificationError as e:
        report.problems.append(str(e))
    return report


def verify_published(
    files: Mapping[str, bytes], *, trusted_root: bytes | None, now: datetime
) -> VerificationReport:
    """Like :func:`check_metadata` but raise on the first failure.

    Raises:
        VerificationError: any role fails any check; the message names the first problem.
    """
    report = check_metadata(files, trusted_root=trusted_root, now=now)
    if not report.ok:
        problems = report.all_problems() or ["incomplete metadata"]
        raise VerificationError(problems[0])
    return report
