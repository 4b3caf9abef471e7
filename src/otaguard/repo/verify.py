"""Verifying TUF metadata exactly as a device does, with python-tuf's own client logic.

Bytes in, verified objects out, :class:`~otaguard.model.errors.VerificationError`
otherwise; no I/O. This module holds otaguard's only walker of the
root → timestamp → snapshot → targets chain outside python-tuf itself. The server runs
it before it accepts a publication (:mod:`otaguard.server.publish`, as two simulated
devices) and ``otaguard repo verify`` runs it as a device fresh from the factory, so
neither can accept what a device refuses.

Every check of the client workflow is made by python-tuf's ``TrustedMetadataSet``, the
state machine ngclient's ``Updater`` drives. It is internal API of python-tuf: otaguard
pins ``tuf>=7.0.1,<8`` (``pyproject.toml``), and :class:`_Walk` follows
``Updater.refresh()`` of that release line step by step (``tuf/ngclient/updater.py``:
``_load_root``, ``_load_timestamp``, ``_load_snapshot``, ``_load_targets``). Re-read
that file and this one whenever the pin moves.

Checklist (TUF specification v1.0, "Detailed client workflow"; §5.n.m below), in the
order a device makes them:

1. §5.1 One reference time for the whole update: the caller's ``now``, set as the
   trusted set's ``reference_time``.
2. §5.2 Load the trusted root: it must be signed by a threshold of its own root keys
   (its expiry does not matter yet).
3. §5.3.3-5.3.9 Root rotation: for N = trusted version + 1 ... while ``N.root.json``
   exists (at most :data:`MAX_ROOT_ROTATIONS`, as ngclient): a cached copy first, then
   the remote one; each must be signed by a threshold of the old and of the new root
   keys (§5.3.4) and carry version N exactly (§5.3.5); otaguard: meet the hybrid
   policy of the old root and of its own (ADR 0014; before python-tuf for a cached root,
   after it for a fetched one, so python-tuf's refusal is named when it has one).
4. §5.3.10 The final root is not expired. (§5.3.11 fast-forward recovery: a cached
   timestamp or snapshot signed by rotated-out keys no longer verifies and is ignored.)
5. §5.4 Timestamp: the cached one is loaded first, even expired, to guard against
   rollback; the remote ``timestamp.json`` (at most :data:`DEVICE_MAX_LENGTHS` bytes) must
   be signed by a threshold of timestamp keys (§5.4.2), must not roll back the trusted
   timestamp version nor the snapshot version it names (§5.4.3; an equal version keeps
   the cached file), and must not be expired (§5.4.4).
6. §5.5 Snapshot: the cached one is used if still valid as final (``trusted=True``, as
   ngclient); otherwise ``N.snapshot.json`` for the version the timestamp names must
   match the timestamp's length and hashes (§5.5.2), be signed by a threshold of
   snapshot keys (§5.5.3), carry that version (§5.5.4), neither drop nor roll back any
   role the trusted snapshot lists (§5.5.5), and not be expired (§5.5.6).
7. §5.6 Targets: the cached one if still valid; otherwise ``N.targets.json`` for the
   version the snapshot names must match the snapshot's length and hashes (§5.6.2), be
   signed by a threshold of targets keys (§5.6.3) - and, for every role root marks
   hybrid, a valid classical and a valid ML-DSA signature among them (ADR 0014) - carry
   that version (§5.6.4), and not be expired (§5.6.5).
8. otaguard: every target's ``custom`` field parses as :class:`ReleaseInfo`.

A repository directory that holds only offline roles (``N.root.json`` and
``N.targets.json``; snapshot and timestamp are signed by the server's online key) is
checked by :func:`verify_offline_roles`: steps 1-4 as above, then the newest targets
against the newest root (§5.6.3-5.6.5 without a snapshot to name its version), then 8.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeVar, overload

from tuf.api.exceptions import (
    BadVersionNumberError,
    DownloadLengthMismatchError,
    EqualVersionNumberError,
    ExpiredMetadataError,
    RepositoryError,
    UnsignedMetadataError,
)
from tuf.api.metadata import Metadata, Root, Signed, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

# Internal API of python-tuf, pinned by tuf<8 (see the module docstring).
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from otaguard.crypto.hybrid import check_hybrid, check_hybrid_bytes, check_root_update
from otaguard.model.errors import HybridPolicyError, VerificationError
from otaguard.model.limits import MAX_ROOT_ROTATIONS, METADATA_MAX_LENGTHS
from otaguard.model.release import ReleaseInfo
from otaguard.model.transfer import Encodings, is_auxiliary_target

__all__ = [
    "DEVICE_MAX_LENGTHS",
    "MAX_ROOT_ROTATIONS",
    "SERVER_SIGNED_NOTE",
    "FileSource",
    "OfflineRoles",
    "RoleCheck",
    "VerificationReport",
    "VerifiedRepository",
    "check_repository",
    "load_role",
    "verify_offline_roles",
    "verify_update",
]

# A device stops rotating after MAX_ROOT_ROTATIONS new roots (otaguard.model.limits), so
# the server must not accept a rotation history a device would stop short of.
# The most bytes a device downloads per role when the parent names no length
# (otaguard.model.limits, the same caps the agent configures ngclient with).
# A larger file is refused here because every device would refuse to download it.
DEVICE_MAX_LENGTHS: Final = METADATA_MAX_LENGTHS
# What repo verify reports for the online roles of a repository without them.
SERVER_SIGNED_NOTE: Final = "signed by the server"

ROLES: Final = (Root.type, Timestamp.type, Snapshot.type, Targets.type)


_Role = TypeVar("_Role", Root, Timestamp, Snapshot, Targets)


@overload
def load_role(name: str, data: bytes, cls: type[_Role]) -> Metadata[_Role]: ...
@overload
def load_role(name: str, data: bytes, cls: type[Signed]) -> Metadata[Any]: ...
def load_role(name: str, data: bytes, cls: type[Signed]) -> Metadata[Any]:
    """Parse ``data`` as metadata of role class ``cls`` (no signature is checked here).

    Raises:
        VerificationError: the bytes are not TUF metadata of that role.
    """
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise VerificationError(f"{name} is not valid TUF metadata: {e}") from e
    if not isinstance(md.signed, cls):
        raise VerificationError(f"{name} is not {cls.type} metadata")
    return md


TIMESTAMP_FILE: Final = "timestamp.json"
_TARGETS_NAME: Final = re.compile(r"([1-9][0-9]{0,17})\.targets\.json")
# What python-tuf raises for data it refuses: RepositoryError subclasses (including
# DeserializationError), ValueError from parsing, and the download cap.
_REFUSALS: Final = (RepositoryError, DownloadLengthMismatchError, ValueError)


class FileSource(Protocol):
    """Where a device fetches metadata files: exact bytes by file name, ``None`` if absent.

    A ``Mapping[str, bytes]`` is one; the server passes a view that looks names up in
    the publication and its database. The verifier only ever looks names up.
    """

    def get(self, name: str, /) -> bytes | None:
        """Return the exact bytes served as ``name``, or ``None`` (HTTP 404)."""


@dataclass(frozen=True)
class VerifiedRepository:
    """What a device trusts after a successful update of its top-level metadata.

    Attributes:
        root: the newest trusted root.
        timestamp: the trusted timestamp.
        snapshot: the trusted snapshot.
        targets: the trusted top-level targets.
        root_bytes: exact bytes of the newest trusted root.
        releases: every target's parsed otaguard fields, by target path.
        fetched: the remote file names the device downloaded and accepted.
    """

    root: Root
    timestamp: Timestamp
    snapshot: Snapshot
    targets: Targets
    root_bytes: bytes
    releases: Mapping[str, ReleaseInfo]
    fetched: frozenset[str]


@dataclass(frozen=True)
class OfflineRoles:
    """The offline roles of a repository directory, verified (see :func:`verify_offline_roles`).

    Attributes:
        root: the newest trusted root.
        targets: the newest targets, verified against ``root``.
        root_bytes: exact bytes of the newest trusted root.
        targets_file: file name of the newest targets (``N.targets.json``).
        releases: every target's parsed otaguard fields, by target path.
    """

    root: Root
    targets: Targets
    root_bytes: bytes
    targets_file: str
    releases: Mapping[str, ReleaseInfo]


@dataclass
class RoleCheck:
    """One row of ``repo verify``: what was found for one top-level role."""

    role: str
    file: str | None = None
    version: int | None = None
    expires: datetime | None = None
    signed: int | None = None
    threshold: int | None = None
    problem: str | None = None
    note: str | None = None
    checked: bool = False

    @property
    def ok(self) -> bool:
        """True when the role was checked (or is signed elsewhere) and passed."""
        return self.checked and self.problem is None


@dataclass
class VerificationReport:
    """Everything :func:`check_repository` found; fails closed (``ok`` needs every role)."""

    roles: dict[str, RoleCheck]
    targets: Targets | None = None
    releases: dict[str, ReleaseInfo] = field(default_factory=dict)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """True only when every top-level role was verified or is signed by the server."""
        return self.problem is None and all(
            role in self.roles and self.roles[role].ok for role in ROLES
        )

    def all_problems(self) -> list[str]:
        """Every problem found, each one line naming the role and file (a walk stops at one)."""
        if self.problem is not None:
            return [self.problem]
        return [f"{c.role}: not checked" for c in self.roles.values() if not c.ok]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _accepts(load: Callable[[bytes], object], data: bytes) -> bool:
    """Load a cached file as ngclient does: a RepositoryError only means "fetch it"."""
    try:
        load(data)
    except RepositoryError:
        return False
    return True


def _hybrid(check: Callable[[], object]) -> None:
    """Run a hybrid policy check as a python-tuf refusal (so a cached file that fails it
    is only "fetch it again", and a fetched one is refused like an unsigned one)."""
    try:
        check()
    except HybridPolicyError as e:
        raise UnsignedMetadataError(str(e)) from e
    except VerificationError as e:  # not metadata at all: python-tuf's own wording
        raise DeserializationError(str(e)) from e


class _Walk:
    """One simulated ``Updater.refresh()``: the only walker of the chain."""

    def __init__(self, now: datetime):
        self.now = now
        self.tms: TrustedMetadataSet | None = None
        # Per role, the file the trusted set now holds: (name, exact bytes).
        self.loaded: dict[str, tuple[str, bytes]] = {}
        self.fetched: set[str] = set()
        # The step under way; left set when it raised (for the report).
        self.failed: tuple[str, str, bytes | None] | None = None

    @property
    def trusted(self) -> TrustedMetadataSet:
        if self.tms is None:
            raise RuntimeError("the trusted root is not loaded")
        return self.tms

    @contextmanager
    def _step(self, role: str, name: str, data: bytes | None) -> Iterator[None]:
        """Translate python-tuf's refusal of ``role`` file ``name`` into VerificationError."""
        self.failed = (role, name, data)
        try:
            yield
        except _REFUSALS as e:
            raise VerificationError(f"{role} {name}: {type(e).__name__}: {_one_line(e)}") from e
        self.failed = None

    @staticmethod
    def _download(role: str, name: str, data: bytes | None, max_length: int) -> bytes:
        """What a device's fetcher does with ``name``: 404, or at most ``max_length`` bytes."""
        if data is None:
            raise VerificationError(f"{role} {name}: not available, so no device can fetch it")
        if len(data) > max_length:
            raise DownloadLengthMismatchError(
                f"{len(data)} bytes, more than the {max_length} a device downloads"
            )
        return data

    def _cached_root(self, data: bytes) -> None:
        """otaguard's hybrid rule (ADR 0014), then python-tuf's root update: a cached root
        failing the rule must not become the trusted one before the remote is fetched."""
        _hybrid(lambda: check_root_update(self.trusted.root, data))
        self.trusted.update_root(data)

    def _remote_root(self, data: bytes) -> None:
        """python-tuf's root update (its refusal named first), then the hybrid rule; the
        walk stops at either refusal."""
        previous = self.trusted.root
        self.trusted.update_root(data)
        _hybrid(lambda: check_root_update(previous, data))

    def _hybrid(self, role: str, update: Callable[[bytes], object]) -> Callable[[bytes], object]:
        """``update``, then the hybrid policy of the trusted root for ``role``.

        python-tuf first, so a file below its threshold is named for that; the walk
        stops at a refusal (the trusted set is not used again), and a cached file that
        fails the policy is fetched again, which python-tuf allows for these roles.
        """

        def gated(data: bytes) -> object:
            result = update(data)
            _hybrid(lambda: check_hybrid_bytes(self.trusted.root, role, data))
            return result

        return gated

    def _fetched(self, role: str, name: str, data: bytes) -> None:
        self.loaded[role] = (name, data)
        self.fetched.add(name)

    def _versioned(self, role: str, version: int) -> str:
        # §5.5.1/§5.6.1: consistent snapshots fetch N.<role>.json, otherwise <role>.json.
        return f"{version}.{role}.json" if self.trusted.root.consistent_snapshot else f"{role}.json"

    # -- the workflow, in Updater.refresh() order --------------------------------------
    def load_trusted_root(self, trusted_root: bytes) -> None:
        """§5.1-5.2: Updater.__init__ (TrustedMetadataSet(bootstrap))."""
        with self._step(Root.type, "trusted root", trusted_root):
            self.tms = TrustedMetadataSet(trusted_root, EnvelopeType.METADATA)
        # §5.1: one reference time for every expiry check, captured once by the caller.
        self.tms.reference_time = self.now
        self.loaded[Root.type] = (f"{self.tms.root.version}.root.json", trusted_root)

    def update_roots(self, cached: Mapping[str, bytes], remote: FileSource) -> None:
        """§5.3: Updater._load_root, then the final root's expiry (§5.3.10)."""
        lower = self.trusted.root.version + 1
        for version in range(lower, lower + MAX_ROOT_ROTATIONS):
            name = f"{version}.root.json"
            local = cached.get(name)
            if local is not None and _accepts(self._cached_root, local):
                self.loaded[Root.type] = (name, local)
                continue
            data = remote.get(name)
            if data is None:
                break  # §5.3.3: a 404 means the trusted root is the newest
            with self._step(Root.type, name, data):
                self._remote_root(
                    self._download(Root.type, name, data, DEVICE_MAX_LENGTHS[Root.type])
                )
            self._fetched(Root.type, name, data)
        # §5.3.10: TrustedMetadataSet makes this check when the timestamp is loaded; it
        # is made here too (same check, same exception) so the refusal names the root.
        name, data = self.loaded[Root.type]
        with self._step(Root.type, name, data):
            if self.trusted.root.is_expired(self.now):
                raise ExpiredMetadataError("Final root.json is expired")

    def update_timestamp(self, cached: Mapping[str, bytes], remote: FileSource) -> None:
        """§5.4: Updater._load_timestamp."""
        local = cached.get(TIMESTAMP_FILE)
        # A cached timestamp is loaded even when expired (as intermediate metadata) so it
        # still guards the remote one against rollback (§5.4.3).
        if local is not None and _accepts(
            self._hybrid(Timestamp.type, self.trusted.update_timestamp), local
        ):
            self.loaded[Timestamp.type] = (f"{TIMESTAMP_FILE} (cached)", local)
        data = remote.get(TIMESTAMP_FILE)
        with self._step(Timestamp.type, TIMESTAMP_FILE, data):
            try:
                self._hybrid(Timestamp.type, self.trusted.update_timestamp)(
                    self._download(
                        Timestamp.type, TIMESTAMP_FILE, data, DEVICE_MAX_LENGTHS[Timestamp.type]
                    )
                )
            except EqualVersionNumberError:
                # §5.4.3.1: the version the device already trusts: ngclient keeps its copy.
                return
        assert data is not None  # noqa: S101 - _download raised otherwise
        self._fetched(Timestamp.type, TIMESTAMP_FILE, data)

    def update_snapshot(self, cached: Mapping[str, bytes], remote: FileSource) -> None:
        """§5.5: Updater._load_snapshot."""
        local = cached.get("snapshot.json")
        # trusted=True: the cached snapshot verified once, so it is accepted as final if
        # it is the version the timestamp names, and kept as intermediate (§5.5.5) if not.
        if local is not None and _accepts(
            self._hybrid(Snapshot.type, lambda d: self.trusted.update_snapshot(d, trusted=True)),
            local,
        ):
            self.loaded[Snapshot.type] = ("snapshot.json (cached)", local)
            return
        meta = self.trusted.timestamp.snapshot_meta
        name = self._versioned(Snapshot.type, meta.version)
        data = remote.get(name)
        with self._step(Snapshot.type, name, data):
            max_length = meta.length or DEVICE_MAX_LENGTHS[Snapshot.type]
            self._hybrid(Snapshot.type, self.trusted.update_snapshot)(
                self._download(Snapshot.type, name, data, max_length)
            )
        assert data is not None  # noqa: S101 - _download raised otherwise
        self._fetched(Snapshot.type, name, data)

    def update_targets(self, cached: Mapping[str, bytes], remote: FileSource) -> None:
        """§5.6: Updater._load_targets("targets", "root")."""
        local = cached.get("targets.json")
        if local is not None and _accepts(
            self._hybrid(Targets.type, self.trusted.update_targets), local
        ):
            self.loaded[Targets.type] = ("targets.json (cached)", local)
            return
        meta = self.trusted.snapshot.meta.get("targets.json")
        if meta is None:
            with self._step(Targets.type, "targets.json", None):
                raise RepositoryError("Role targets was delegated but is not part of snapshot")
        name = self._versioned(Targets.type, meta.version)
        data = remote.get(name)
        with self._step(Targets.type, name, data):
            max_length = meta.length or DEVICE_MAX_LENGTHS[Targets.type]
            self._hybrid(Targets.type, self.trusted.update_targets)(
                self._download(Targets.type, name, data, max_length)
            )
        assert data is not None  # noqa: S101 - _download raised otherwise
        self._fetched(Targets.type, name, data)

    def verify_newest_targets(self, files: Mapping[str, bytes]) -> Targets:
        """§5.6.3-5.6.5 for a repository without snapshot: newest targets vs. newest root."""
        versions = [int(m.group(1)) for n in files if (m := _TARGETS_NAME.fullmatch(n))]
        if not versions:
            self.failed = (Targets.type, "N.targets.json", None)
            raise VerificationError("targets: the repository holds no N.targets.json")
        version = max(versions)
        name = f"{version}.targets.json"
        data = files[name]
        with self._step(Targets.type, name, data):
            md = Metadata[Targets].from_bytes(
                self._download(Targets.type, name, data, DEVICE_MAX_LENGTHS[Targets.type])
            )
            if not isinstance(md.signed, Targets):
                raise RepositoryError(f"Expected 'targets', got '{md.signed.type}'")
            self.trusted.root.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
            _hybrid(
                lambda: check_hybrid(
                    self.trusted.root, Targets.type, md.signed_bytes, md.signatures
                )
            )
            if md.signed.version != version:
                raise BadVersionNumberError(
                    f"Expected targets v{version}, got v{md.signed.version}."
                )
            if md.signed.is_expired(self.now):
                raise ExpiredMetadataError("New targets is expired")
        self._fetched(Targets.type, name, data)
        return md.signed

    def releases(self, targets: Targets) -> dict[str, ReleaseInfo]:
        """Checklist 8: every image target carries valid otaguard fields, and the SBOM it
        binds is listed beside it with that length and hash (SBOM targets are not images)."""
        name, data = self.loaded[Targets.type]
        out: dict[str, ReleaseInfo] = {}
        for path, target in targets.targets.items():
            if is_auxiliary_target(target.custom):
                continue
            with self._step(Targets.type, name, data):
                try:
                    info = ReleaseInfo.from_custom(target.custom)
                    sbom = targets.targets.get(info.sbom.path) if info.sbom else None
                    if info.sbom is not None and (
                        sbom is None
                        or sbom.length != info.sbom.length
                        or sbom.hashes.get("sha256") != info.sbom.sha256
                    ):
                        raise VerificationError(
                            f"its SBOM binding names {info.sbom.path}, which targets does not "
                            "list with that length and hash"
                        )
                    _check_encodings(targets, target.custom)
                    out[path] = info
                except VerificationError as e:
                    raise VerificationError(f"targets {name}: target {path}: {e}") from e
        return out


def _check_encodings(targets: Targets, custom: object) -> None:
    """The compressed blob and deltas an image lists are targets with those bytes (ADR 0018).

    Raises:
        VerificationError: malformed encodings, or one targets does not list as bound.
    """
    try:
        enc = Encodings.from_custom(custom if isinstance(custom, Mapping) else None)
    except ValueError as e:
        raise VerificationError(f"invalid encodings: {e}") from e
    refs = ([enc.compressed] if enc.compressed else []) + [d.blob for d in enc.deltas]
    for ref in refs:
        listed = targets.targets.get(ref.path)
        if listed is None or (listed.length, listed.hashes.get("sha256")) != (
            ref.length,
            ref.sha256,
        ):
            raise VerificationError(
                f"it lists the encoding {ref.path}, which targets does not list with that "
                "length and hash"
            )


def verify_update(
    *,
    trusted_root: bytes,
    cached: Mapping[str, bytes] | None,
    remote: FileSource,
    now: datetime,
) -> VerifiedRepository:
    """Update top-level metadata exactly as a device's ngclient would, or refuse.

    Args:
        trusted_root: the root the device trusts (its factory root or the newest root it
            has verified since).
        cached: the device's metadata cache as ngclient keeps it - ``timestamp.json``,
            ``snapshot.json``, ``targets.json`` (the files it last accepted) and
            ``N.root.json`` (its root history); ``None`` for a device with no cache.
        remote: what the server serves, by the name a device fetches:
            ``N.root.json``, ``timestamp.json``, ``N.snapshot.json``, ``N.targets.json``.
        now: reference time for every expiry check, captured once by the caller.

    Returns:
        The root, timestamp, snapshot and targets the device would trust afterwards.

    Raises:
        VerificationError: a device would refuse the update. The message names the role
            and file, python-tuf's exception class and its message, e.g.
            ``timestamp timestamp.json: BadVersionNumberError: New snapshot version must
            be >= 2, got version 1``.
    """
    local = cached if cached is not None else {}
    walk = _Walk(now)
    walk.load_trusted_root(trusted_root)
    walk.update_roots(local, remote)
    walk.update_timestamp(local, remote)
    walk.update_snapshot(local, remote)
    walk.update_targets(local, remote)
    tms = walk.trusted
    return VerifiedRepository(
        root=tms.root,
        timestamp=tms.timestamp,
        snapshot=tms.snapshot,
        targets=tms.targets,
        root_bytes=walk.loaded[Root.type][1],
        releases=MappingProxyType(walk.releases(tms.targets)),
        fetched=frozenset(walk.fetched),
    )


def verify_offline_roles(
    *, trusted_root: bytes, remote: Mapping[str, bytes], now: datetime
) -> OfflineRoles:
    """Verify the root chain and the newest targets of a repository without online roles.

    For a repository directory whose snapshot and timestamp are signed by the server's
    online key: the root chain goes through python-tuf's trusted set (checklist 1-4),
    the newest ``N.targets.json`` is verified against the newest root (threshold,
    version, expiry) and its targets' otaguard fields are parsed.

    Args:
        trusted_root: the root a device fresh from the factory trusts (``1.root.json``).
        remote: the repository's metadata files by name.
        now: reference time for every expiry check, captured once by the caller.

    Raises:
        VerificationError: the message names the role, file and python-tuf's refusal.
    """
    walk = _Walk(now)
    walk.load_trusted_root(trusted_root)
    walk.update_roots({}, remote)
    targets = walk.verify_newest_targets(remote)
    return OfflineRoles(
        root=walk.trusted.root,
        targets=targets,
        root_bytes=walk.loaded[Root.type][1],
        targets_file=walk.loaded[Targets.type][0],
        releases=MappingProxyType(walk.releases(targets)),
    )


def check_repository(files: Mapping[str, bytes], *, now: datetime) -> VerificationReport:
    """Verify a repository directory as a device fresh from the factory would; report per role.

    The device trusts ``1.root.json`` and has no cache. A repository without
    ``timestamp.json`` holds only the offline roles: it is checked with
    :func:`verify_offline_roles`'s steps and snapshot and timestamp are reported as
    :data:`SERVER_SIGNED_NOTE`.

    Args:
        files: metadata file name to exact bytes, as in the repository's ``metadata/``.
        now: reference time for every expiry check, captured once by the caller.

    Returns:
        A report: one row per role, the verified targets and the first problem, if any
        (a device stops at the first refusal, and so does the check).
    """
    report = VerificationReport(roles={role: RoleCheck(role) for role in ROLES})
    first = files.get("1.root.json")
    if first is None:
        report.problem = "root 1.root.json: not in the repository"
        report.roles[Root.type].problem = "1.root.json is missing"
        return report
    walk = _Walk(now)
    try:
        walk.load_trusted_root(first)
        walk.update_roots({}, files)
        if TIMESTAMP_FILE in files:
            walk.update_timestamp({}, files)
            walk.update_snapshot({}, files)
            walk.update_targets({}, files)
            targets = walk.trusted.targets
        else:
            for role in (Snapshot.type, Timestamp.type):
                report.roles[role] = RoleCheck(role, checked=True, note=SERVER_SIGNED_NOTE)
            targets = walk.verify_newest_targets(files)
        report.releases = walk.releases(targets)
        report.targets = targets
    except VerificationError as e:
        report.problem = str(e)
    _describe(walk, report)
    return report


def _describe(walk: _Walk, report: VerificationReport) -> None:
    """Fill the report's rows from what the walk loaded and where it stopped."""
    for role, (name, data) in walk.loaded.items():
        if walk.failed is not None and walk.failed[0] == role:
            continue
        report.roles[role] = _row(walk, role, name, data)
        report.roles[role].checked = True
    if walk.failed is not None:
        failed_role, failed_name, failed_data = walk.failed
        row = _row(walk, failed_role, failed_name, failed_data)
        row.problem = report.problem
        report.roles[failed_role] = row


def _row(walk: _Walk, role: str, name: str, data: bytes | None) -> RoleCheck:
    """Version, expiry and signature count of one file, for display only."""
    row = RoleCheck(role, file=name)
    if data is None:
        return row
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError:
        return row
    row.version, row.expires = md.signed.version, md.signed.expires
    # Counting signatures is display, not a chain walk: a root is counted against its
    # own keys, other roles against the newest trusted root.
    counting: Root | None = md.signed if isinstance(md.signed, Root) else None
    if counting is None and walk.tms is not None:
        counting = walk.tms.root
    if counting is not None and role in counting.roles:
        result = counting.get_verification_result(role, md.signed_bytes, md.signatures)
        row.signed, row.threshold = len(result.signed), result.threshold
    return row
