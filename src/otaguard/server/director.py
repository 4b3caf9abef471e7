"""The director: per-device update instructions, signed online, answering each check-in.

Uptane's director repository. Its root is made offline (``otaguard director init``,
:mod:`otaguard.repo.director`) and names the server's **director key**
(``DATA/director-key.pem``, Ed25519, created beside the online snapshot/timestamp key,
or any signer URI with ``--director-key-uri``) as its one ``targets`` key. At each
accepted check-in the server answers with TUF ``targets`` metadata signed by that key,
naming the one image this device should install, or none, bound to the manifest's
nonce (:mod:`otaguard.model.director`). The device verifies it and that the image
repository lists the same image identically (:mod:`otaguard.agent.director`).

What to install is decided by a :class:`Policy`: the server runs the channel and rollout
policy (:mod:`.channels`, :mod:`.rollouts`, ADR 0011); :func:`choose_release` is the
simpler one without channels (an operator assignment, else the newest release for the
device's hardware id). Either replaces only the choice, not the signing around it.

Each answer carries its own nonce, so each is signed (Ed25519: tens of microseconds);
the parsed release list is shared and rebuilt only when a new targets version is
published.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Final, Protocol

from securesystemslib.signer import Signer
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from otaguard.crypto.hybrid import check_root_update
from otaguard.model.director import (
    DIRECTOR_BINDING_KEY,
    DIRECTOR_TARGETS_LIFETIME,
    MAX_DIRECTOR_ROOT_BYTES,
)
from otaguard.model.errors import ConfigError, VerificationError
from otaguard.model.limits import MAX_ROOT_ROTATIONS
from otaguard.model.manifest import InstalledTarget
from otaguard.model.release import ReleaseInfo
from otaguard.model.version import Version
from otaguard.server.online import load_online_signer
from otaguard.server.storage.assignments import Assignment, AssignmentStore
from otaguard.server.storage.base import CheckinRecord, MetadataStore

__all__ = [
    "DIRECTOR_KEY_FILE",
    "DIRECTOR_PUBLIC_KEY_FILE",
    "Director",
    "DirectorRelease",
    "Policy",
    "choose_release",
    "load_director_roots",
    "load_director_signer",
    "sign_instruction",
]

logger = logging.getLogger(__name__)

DIRECTOR_KEY_FILE: Final = "director-key.pem"
DIRECTOR_PUBLIC_KEY_FILE: Final = "director-key.pub.json"


@dataclass(frozen=True)
class DirectorRelease:
    """A release the image repository serves, as the policy sees it."""

    name: str
    length: int
    hashes: dict[str, str]
    info: ReleaseInfo


class Policy(Protocol):
    """Chooses the release one device should install now (``None``: nothing)."""

    def __call__(
        self,
        *,
        serial: str,
        hardware_id: str,
        running: Version | None,
        assignment: Assignment | None,
        releases: Sequence[DirectorRelease],
        recorded: CheckinRecord | None = None,
    ) -> DirectorRelease | None:
        """Decide; ``recorded`` is the check-in being answered, when there is one (the
        device's newest: a policy that reads it need not read it back)."""


def choose_release(
    *,
    serial: str = "",
    hardware_id: str,
    running: Version | None,
    assignment: Assignment | None,
    releases: Sequence[DirectorRelease],
    recorded: CheckinRecord | None = None,
) -> DirectorRelease | None:
    """The policy without channels (the server runs :mod:`.channels`). Pure.

    ``serial`` and ``recorded`` are unused (the channel policy needs them).

    A ``hold`` assignment: nothing. A ``release`` assignment: that version, if the image
    repository serves it for this hardware. No assignment: the newest release for this
    hardware. Never a release not newer than what runs (``running`` ``None``: the device
    is in recovery and any release may restore it; the device enforces its floor).
    """
    mine = [r for r in releases if hardware_id in r.info.hardware_ids]
    if assignment is not None and assignment.mode == "hold":
        return None
    if assignment is not None:
        chosen = next((r for r in mine if str(r.info.version) == assignment.version), None)
        if chosen is None:
            logger.warning(
                "assignment of %s names %s, which is not served for %s",
                assignment.serial,
                assignment.version,
                hardware_id,
            )
    else:
        chosen = max(mine, key=lambda r: r.info.version, default=None)
    if chosen is not None and running is not None and chosen.info.version <= running:
        return None
    return chosen


def _expiry(now: dt.datetime) -> dt.datetime:
    at = now + DIRECTOR_TARGETS_LIFETIME
    return at.replace(microsecond=0) + (
        dt.timedelta(seconds=1) if at.microsecond else dt.timedelta()
    )


def sign_instruction(
    release: DirectorRelease | None,
    *,
    serial: str,
    hardware_id: str,
    nonce: str,
    now: dt.datetime,
    signer: Signer,
) -> bytes:
    """The director's signed instruction for one check-in (exact bytes to send).

    Args:
        release: what to install, ``None`` for nothing.
        serial: the device.
        hardware_id: its hardware id (the target's ``custom.hardware_id``).
        nonce: the nonce of the manifest this answers (the binding).
        now: reference time (expiry = now + :data:`DIRECTOR_TARGETS_LIFETIME`).
        signer: the director key.
    """
    targets: dict[str, TargetFile] = {}
    if release is not None:
        targets[release.name] = TargetFile(
            length=release.length,
            hashes=dict(release.hashes),
            path=release.name,
            unrecognized_fields={
                "custom": {"hardware_id": hardware_id, "version": str(release.info.version)}
            },
        )
    md = Metadata(
        Targets(
            version=1,
            expires=_expiry(now),
            targets=targets,
            unrecognized_fields={
                "custom": {DIRECTOR_BINDING_KEY: {"serial": serial, "nonce": nonce}}
            },
        )
    )
    md.sign(signer)
    return md.to_bytes()


def load_director_signer(
    data_dir: Path, *, uri: str | None = None, pin: str | None = None
) -> Signer:
    """The server's director key (created in the data directory on first use, unless ``uri``).

    Raises:
        ConfigError: the key is unusable or does not match its public key file.
        KeyAccessError: the key needs a secret the server cannot give.
    """
    return load_online_signer(
        data_dir,
        uri=uri,
        private_name=DIRECTOR_KEY_FILE,
        public_name=DIRECTOR_PUBLIC_KEY_FILE,
        name="director",
        pin=pin,
        what="director (per-device targets)",
    )


def load_director_roots(director_dir: Path, *, keyid: str) -> list[bytes]:
    """The director's root versions 1..N from ``DIRECTOR_DIR/metadata``, chain verified.

    Args:
        director_dir: the director directory (``otaguard director init``).
        keyid: the server's director key id: the newest root must name it as its one
            ``targets`` key (threshold 1), or the server could not sign for it.

    Raises:
        ConfigError: no root, a gap or bad signature in the chain, or a root that does
            not name this server's director key.
    """
    meta = Path(director_dir) / "metadata"
    roots: list[bytes] = []
    try:
        for version in range(1, MAX_ROOT_ROTATIONS + 2):
            path = meta / f"{version}.root.json"
            if not path.is_file():
                break
            if path.stat().st_size > MAX_DIRECTOR_ROOT_BYTES:
                raise ConfigError(f"{path} is too large")
            roots.append(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read the director root in {meta}: {e.strerror}") from e
    if not roots:
        raise ConfigError(f"{meta} holds no 1.root.json (run otaguard director init)")
    try:
        tms = TrustedMetadataSet(roots[0], EnvelopeType.METADATA)
        for data in roots[1:]:
            check_root_update(tms.root, data)  # the hybrid rule devices apply (ADR 0014)
            tms.update_root(data)
    except (tuf_exc.RepositoryError, DeserializationError, ValueError, VerificationError) as e:
        raise ConfigError(f"the director root chain in {meta} does not verify: {e}") from e
    _check_names_key(tms.root, keyid, meta)
    return roots


def _check_names_key(root: Root, keyid: str, where: Path) -> None:
    role = root.roles.get(Targets.type)
    if role is None or role.threshold != 1 or role.keyids != [keyid]:
        raise ConfigError(
            f"the director root in {where} does not name this server's director key "
            f"{keyid[:16]}… as its targets key (made for another server's "
            "director-key.pub.json?)"
        )


def _verify_next_root(current: bytes, new: bytes, *, keyid: str, where: Path) -> None:
    """``new`` is the next root after ``current`` (both thresholds) and names ``keyid``.

    Raises:
        ConfigError: it does not verify or names another key.
    """
    try:
        tms = TrustedMetadataSet(current, EnvelopeType.METADATA)
        check_root_update(tms.root, new)  # the hybrid rule devices apply (ADR 0014)
        tms.update_root(new)
    except (tuf_exc.RepositoryError, DeserializationError, ValueError, VerificationError) as e:
        raise ConfigError(f"the director root in {where} does not verify: {e}") from e
    _check_names_key(tms.root, keyid, where)


def _nobody(_serials: Iterable[str]) -> None:
    """No one to tell (no MQTT bridge)."""


class Director:
    """The server's director: the policy, the release list, the signing key, the roots."""

    def __init__(
        self,
        *,
        signer: Signer,
        roots: Sequence[bytes],
        director_dir: Path | None = None,
        assignments: AssignmentStore,
        metadata: MetadataStore,
        policy: Policy = choose_release,
        clock: Callable[[], dt.datetime],
        unit: Callable[[], AbstractContextManager[object]] = nullcontext,
    ):
        """Answer with ``signer`` for the director whose root versions are ``roots``.

        ``director_dir``: where newer root versions appear (an offline rotation carried
        over); they are picked up when a device asks for them, chain verified first.
        ``unit``: one connection for an answer's own reads (the assignment and the
        newest targets version), as :class:`~otaguard.server.checkin.CheckinServices`.
        """
        self._unit = unit
        self._signer = signer
        self._roots = list(roots)
        self._dir = director_dir
        self.assignments = assignments
        self.metadata = metadata
        #: replaceable (rollouts); a compromised server replaces it too (sim.attacks)
        self.policy: Policy = policy
        self.clock = clock
        #: told the serials whose instruction an operator changed (the MQTT hint, ADR 0026)
        self.on_instruction: Callable[[Iterable[str]], None] = _nobody
        self._lock = Lock()
        self._releases: tuple[int, list[DirectorRelease]] = (0, [])

    def root(self, version: int) -> bytes | None:
        """Exact bytes of director root ``version`` (``None``: no such version).

        A version past the newest known is looked for in the director directory: a root
        rotated offline and carried over is served without a restart, once the whole
        chain verifies and the new root still names this server's key.
        """
        with self._lock:
            path = Path(self._dir or ".") / "metadata" / f"{version}.root.json"
            if version == len(self._roots) + 1 and self._dir is not None and path.is_file():
                try:
                    if path.stat().st_size > MAX_DIRECTOR_ROOT_BYTES:
                        raise ConfigError(f"{path} is too large")
                    data = path.read_bytes()
                    _verify_next_root(
                        self._roots[-1], data, keyid=self._signer.public_key.keyid, where=path
                    )
                    self._roots.append(data)
                    logger.info("director root version %d taken", version)
                except OSError as e:
                    logger.error("cannot read %s: %s", path, e.strerror)  # noqa: TRY400 - one line
                except ConfigError as e:
                    logger.error("director root rotation refused: %s", e.diagnostics())  # noqa: TRY400 - one line
            if 1 <= version <= len(self._roots):
                return self._roots[version - 1]
        return None

    def releases(self) -> list[DirectorRelease]:
        """The releases the newest targets version lists (parsed once per version).

        Raises:
            VerificationError: the stored targets metadata is unreadable.
        """
        # The version alone (no bytes) notices a publication by any server process.
        version = self.metadata.newest_version(Targets.type)
        if version is None:
            return []
        with self._lock:
            newest = self.metadata.newest(Targets.type) if self._releases[0] != version else None
            if newest is not None:
                try:
                    md = Metadata[Targets].from_bytes(newest.data)
                except (DeserializationError, ValueError) as e:
                    raise VerificationError(f"stored {newest.filename} is unreadable") from e
                out: list[DirectorRelease] = []
                for name, t in md.signed.targets.items():
                    try:
                        info = ReleaseInfo.from_custom(t.unrecognized_fields.get("custom"))
                    except VerificationError:
                        continue  # a device would skip it too
                    out.append(DirectorRelease(name, t.length, dict(t.hashes), info))
                self._releases = (newest.version, out)
            return list(self._releases[1])

    def answer(
        self,
        *,
        serial: str,
        hardware_id: str,
        installed: InstalledTarget | None,
        nonce: str,
        recorded: CheckinRecord | None = None,
    ) -> bytes:
        """The signed instruction answering one accepted check-in (``recorded``: its
        record, when the caller has it, so the policy does not read it back).

        Raises:
            VerificationError: the stored targets metadata is unreadable.
            ServerStorageError: the assignment store failed.
        """
        running = None
        if installed is not None:
            try:
                running = Version.parse(installed.version)
            except ValueError:
                running = None
        # The policy in the unit too: its stores read and write through the unit helpers
        # (storage/unit.py), so it takes no connection of its own while the unit holds
        # one (which, waited for by many threads at once, could exhaust the pool).
        with self._unit():
            assignment = self.assignments.get(serial)
            releases = self.releases()
            release = self.policy(
                serial=serial,
                hardware_id=hardware_id,
                running=running,
                assignment=assignment,
                releases=releases,
                recorded=recorded,
            )
        if release is not None:
            logger.info("director instructs %s: %s", serial, release.name)
        else:  # most check-ins: the check-in's own line says it happened
            logger.debug("director instructs %s: none", serial)
        return sign_instruction(
            release,
            serial=serial,
            hardware_id=hardware_id,
            nonce=nonce,
            now=self.clock(),
            signer=self._signer,
        )
