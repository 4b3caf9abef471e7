"""The image repository: offline-signed metadata saying which firmware exists.

On disk (``REPO_DIR``)::

    otaguard-repo.json     settings: expiries, key files, whether keys are plaintext
    keys/                  private keys, mode 0600, passphrase-encrypted by default
    metadata/              exact signed bytes: N.root.json, root.json, N.targets.json,
                           N.snapshot.json, timestamp.json (consistent snapshots)
    targets/               blobs named <sha256>.<target path>, as served

Every file is written atomically and ``timestamp.json`` last, so a reader (the server's
sync) never sees a timestamp that names a snapshot not yet written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import (
    Key,
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from otaguard._fs import atomic_write_bytes, atomic_write_json, fsync_dir
from otaguard.crypto.keys import generate_signer, load_signer, warn_insecure, write_private_key
from otaguard.model.errors import ConfigError, OperatorError
from otaguard.model.names import check_target_name
from otaguard.model.release import ReleaseInfo
from otaguard.model.version import Version
from otaguard.repo.verify import VerificationReport, check_repository

__all__ = ["DEFAULT_EXPIRY_DAYS", "ROLE_ALGORITHMS", "ImageRepository", "Release", "TargetCheck"]

logger = logging.getLogger(__name__)

CONFIG_NAME: Final = "otaguard-repo.json"
CONFIG_FORMAT: Final = 1
DEFAULT_EXPIRY_DAYS: Final = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
# Offline roles are hybrid: a classical and a post-quantum key, threshold = both.
ROLE_ALGORITHMS: Final = {
    "root": ("ed25519", "ml-dsa-65"),
    "targets": ("ed25519", "ml-dsa-65"),
    "snapshot": ("ed25519",),
    "timestamp": ("ed25519",),
}
# Images are hashed and copied in chunks this size, never held in memory.
CHUNK: Final = 1024 * 1024


@dataclass(frozen=True)
class Release:
    """A published firmware target."""

    path: str
    length: int
    sha256: str
    info: ReleaseInfo


@dataclass(frozen=True)
class TargetCheck:
    """Whether a target blob in ``targets/`` matches its metadata."""

    path: str
    ok: bool
    problem: str | None


class ImageRepository:
    """An image repository in a directory; signing needs the passphrase for its keys."""

    def __init__(self, repo_dir: Path, *, passphrase: bytes | None):
        self.dir = Path(repo_dir)
        self._passphrase = passphrase
        try:
            self.config: dict[str, Any] = json.loads((self.dir / CONFIG_NAME).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{self.dir} is not an otaguard repository (no {CONFIG_NAME})") from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {self.dir / CONFIG_NAME}: {e}") from e
        if self.config.get("format") != CONFIG_FORMAT:
            raise ConfigError(f"{self.dir / CONFIG_NAME} has an unknown format")
        if self.config.get("plaintext_keys"):
            warn_insecure(f"repository {self.dir} keeps plaintext private keys")
        self._signers: dict[str, list[CryptoSigner]] = {}

    # -- paths -----------------------------------------------------------------------
    @property
    def metadata_dir(self) -> Path:
        """Directory of the signed metadata files."""
        return self.dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        """Directory of the target blobs, named as served."""
        return self.dir / "targets"

    # -- creation --------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        repo_dir: Path,
        *,
        passphrase: bytes | None,
        expiry_days: dict[str, int] | None = None,
        now: datetime | None = None,
    ) -> ImageRepository:
        """Create keys and signed version-1 metadata for all four top-level roles.

        Args:
            repo_dir: new or empty directory.
            passphrase: encrypts every private key; ``None`` writes plaintext keys
                (development only, warns).
            expiry_days: per-role expiry, defaults to :data:`DEFAULT_EXPIRY_DAYS`.
            now: reference time (tests).

        Raises:
            OperatorError: the directory already holds a repository or files.
        """
        repo_dir = Path(repo_dir)
        if repo_dir.exists() and any(repo_dir.iterdir()):
            raise OperatorError(f"{repo_dir} is not empty; refusing to overwrite")
        expiries = dict(DEFAULT_EXPIRY_DAYS)
        for role, days in (expiry_days or {}).items():
            if role not in expiries or not 0 < days <= 3650:
                raise OperatorError(f"invalid expiry for {role}: {days} days")
            expiries[role] = days
        now = now or datetime.now(UTC)
        for sub in ("keys", "metadata", "targets"):
            (repo_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(repo_dir / "keys", 0o700)

        signers: dict[str, list[CryptoSigner]] = {}
        key_cfg: dict[str, list[dict[str, str]]] = {}
        for role, algorithms in ROLE_ALGORITHMS.items():
            for alg in algorithms:
                signer = generate_signer(alg)
                fname = f"{role}-{alg}.pem"
                write_private_key(repo_dir / "keys" / fname, signer, passphrase=passphrase)
                signers.setdefault(role, []).append(signer)
                key_cfg.setdefault(role, []).append(
                    {"algorithm": alg, "file": fname, "keyid": signer.public_key.keyid}
                )
        atomic_write_json(
            repo_dir / CONFIG_NAME,
            {
                "format": CONFIG_FORMAT,
                "expiry_days": expiries,
                "keys": key_cfg,
                "plaintext_keys": passphrase is None,
            },
        )

        def expires(role: str) -> datetime:
            return (now + timedelta(days=expiries[role])).replace(microsecond=0)

        root = Root(expires=expires("root"), consistent_snapshot=True)
        for role, role_signers in signers.items():
            keys: list[Key] = [s.public_key for s in role_signers]
            root.roles[role] = Role([k.keyid for k in keys], threshold=len(keys))
            for k in keys:
                root.keys[k.keyid] = k
        repo = cls(repo_dir, passphrase=passphrase)
        repo._signers = signers
        root_md = Metadata(root)
        repo._sign_and_write(root_md, "root")
        targets_md = Metadata(Targets(expires=expires("targets")))
        repo._sign_and_write(targets_md, "targets")
        repo._write_snapshot_and_timestamp(targets_md, now=now, bump=False)
        logger.info("initialised image repository in %s", repo_dir)
        return repo

    # -- signing ---------------------------------------------------------------------
    def _role_signers(self, role: str) -> list[CryptoSigner]:
        if role not in self._signers:
            entries = self.config["keys"].get(role, [])
            if not entries:
                raise ConfigError(f"no keys configured for role {role}")
            self._signers[role] = [
                load_signer(
                    self.dir / "keys" / e["file"],
                    algorithm=e["algorithm"],
                    passphrase=self._passphrase,
                )
                for e in entries
            ]
        return self._signers[role]

    def _expires(self, role: str, now: datetime) -> datetime:
        days = int(self.config["expiry_days"][role])
        return (now + timedelta(days=days)).replace(microsecond=0)

    def _sign_and_write(self, md: Metadata, role: str) -> bytes:  # type: ignore[type-arg]
        md.signatures.clear()
        for signer in self._role_signers(role):
            md.sign(signer, append=True)
        data = md.to_bytes()
        if role == "timestamp":
            atomic_write_bytes(self.metadata_dir / "timestamp.json", data)
        else:
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
            if role == "root":
                atomic_write_bytes(self.metadata_dir / "root.json", data)
        return data

    def _write_snapshot_and_timestamp(
        self,
        targets_md: Metadata[Targets],
        *,
        now: datetime,
        bump: bool = True,
    ) -> None:
        if bump:
            snapshot_md = self._latest("snapshot", Snapshot)
            snapshot_md.signed.version += 1
        else:
            snapshot_md = Metadata(Snapshot(expires=self._expires("snapshot", now)))
        snapshot_md.signed.expires = self._expires("snapshot", now)
        snapshot_md.signed.meta["targets.json"] = MetaFile(version=targets_md.signed.version)
        snap_bytes = self._sign_and_write(snapshot_md, "snapshot")

        if bump:
            ts_md = self._latest("timestamp", Timestamp)
            ts_md.signed.version += 1
        else:
            ts_md = Metadata(Timestamp(expires=self._expires("timestamp", now)))
        ts_md.signed.expires = self._expires("timestamp", now)
        # Length and hash pin the exact snapshot bytes, not just its version.
        ts_md.signed.snapshot_meta = MetaFile.from_data(
            snapshot_md.signed.version, snap_bytes, ["sha256"]
        )
        self._sign_and_write(ts_md, "timestamp")

    # -- reading ---------------------------------------------------------------------
    def read_files(self) -> dict[str, bytes]:
        """Return every metadata file name with its exact bytes."""
        out: dict[str, bytes] = {}
        try:
            for p in sorted(self.metadata_dir.iterdir()):
                if p.name.endswith(".json") and not p.name.startswith("."):
                    out[p.name] = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {self.metadata_dir}: {e.strerror}") from e
        return out

    def _latest(self, role: str, cls: type) -> Metadata:  # type: ignore[type-arg]
        if role == "timestamp":
            path = self.metadata_dir / "timestamp.json"
        else:
            versions = [
                int(p.name.split(".", 1)[0])
                for p in self.metadata_dir.glob(f"*.{role}.json")
                if p.name.split(".", 1)[0].isdigit()
            ]
            if not versions:
                raise ConfigError(f"repository has no {role} metadata")
            path = self.metadata_dir / f"{max(versions)}.{role}.json"
        try:
            md = Metadata.from_file(str(path))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load {path}: {e}") from e
        if not isinstance(md.signed, cls):
            raise ConfigError(f"{path} is not {role} metadata")
        return md

    def releases(self) -> list[Release]:
        """Every published target with its parsed otaguard fields, oldest version first."""
        targets: Targets = self._latest("targets", Targets).signed
        out = []
        for path, tf in targets.targets.items():
            info = ReleaseInfo.from_custom(tf.custom)
            out.append(Release(path, tf.length, tf.hashes["sha256"], info))
        return sorted(out, key=lambda r: r.info.version)

    def blob_path(self, release: Release) -> Path:
        """Where the blob of ``release`` is stored in this repository."""
        return self.targets_dir / f"{release.sha256}.{release.path}"

    # -- releases --------------------------------------------------------------------
    def add_release(
        self,
        image: Path,
        *,
        version: str,
        hardware_ids: Sequence[str],
        security: bool,
        security_counter: int | None,
        now: datetime | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Release:
        """Add a firmware image as a new target and re-sign targets, snapshot, timestamp.

        The security counter defaults to the highest published one, plus one for a
        security release (so devices can never go back below the fix).

        Raises:
            OperatorError: bad version, version not above an existing release for one of
                the hardware ids, counter below the highest published, unreadable image.
        """
        now = now or datetime.now(UTC)
        try:
            new_version = Version.parse(version)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        hardware_ids = list(dict.fromkeys(hardware_ids))
        existing = self.releases()
        highest_counter = max((r.info.security_counter for r in existing), default=0)
        for r in existing:
            for hw in set(r.info.hardware_ids) & set(hardware_ids):
                if new_version <= r.info.version:
                    raise OperatorError(
                        f"version {new_version} is not greater than published {r.info.version} "
                        f"for hardware id {hw}"
                    )
        if security_counter is None:
            security_counter = highest_counter + (1 if security else 0)
        elif security_counter < highest_counter:
            raise OperatorError(
                f"security counter {security_counter} is below the highest published "
                f"({highest_counter})"
            )
        try:
            info = ReleaseInfo(
                version=new_version,
                security_counter=security_counter,
                hardware_ids=tuple(hardware_ids),
                release_type="security" if security else "feature",
            )
        except ValueError as e:
            raise OperatorError(str(e)) from e
        image = Path(image)
        suffix = image.suffix or ".img"
        name = f"{image.stem}-{new_version}{suffix}"
        try:
            check_target_name(name)
        except ValueError as e:
            raise OperatorError(f"image {image.name!r} gives the target name {name!r}: {e}") from e
        targets_md: Metadata[Targets] = self._latest("targets", Targets)
        if name in targets_md.signed.targets:
            raise OperatorError(f"target {name} already exists")

        # Unlock every key before writing anything, so a wrong passphrase changes nothing.
        for role in ("targets", "snapshot", "timestamp"):
            self._role_signers(role)
        length, sha256 = self._store_blob(image, name, progress=progress)
        tf = TargetFile(
            length, {"sha256": sha256}, name, unrecognized_fields={"custom": info.to_custom()}
        )
        targets_md.signed.targets[name] = tf
        targets_md.signed.version += 1
        targets_md.signed.expires = self._expires("targets", now)
        self._sign_and_write(targets_md, "targets")
        self._write_snapshot_and_timestamp(targets_md, now=now)
        logger.info("added release %s (%s bytes)", name, length)
        return Release(name, length, sha256, info)

    def _store_blob(
        self, image: Path, name: str, *, progress: Callable[[int], None] | None
    ) -> tuple[int, str]:
        """Copy ``image`` into targets/ under its hash name, hashing as it streams."""
        h = hashlib.sha256()
        length = 0
        try:
            src = open(image, "rb")  # noqa: SIM115 - closed below, around a temp file
        except OSError as e:
            raise OperatorError(f"cannot read image {image}: {e.strerror}") from e
        fd, tmp = tempfile.mkstemp(dir=self.targets_dir, prefix=".upload.")
        try:
            with src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    length += len(chunk)
                    if progress:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            digest = h.hexdigest()
            os.replace(tmp, self.targets_dir / f"{digest}.{name}")
            fsync_dir(self.targets_dir)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise OperatorError(f"cannot store image {image}: {e.strerror}") from e
        if length == 0:
            raise OperatorError(f"image {image} is empty")
        return length, digest

    def withdraw_release(self, path: str, *, now: datetime | None = None) -> None:
        """Remove a target from the repository (e.g. a faulty release) and re-sign.

        Devices never go back to an older release because of this: their anti-rollback
        floor refuses it. The blob stays on disk for audit.

        Raises:
            OperatorError: no such target.
        """
        now = now or datetime.now(UTC)
        targets_md: Metadata[Targets] = self._latest("targets", Targets)
        if path not in targets_md.signed.targets:
            raise OperatorError(f"no target named {path}")
        for role in ("targets", "snapshot", "timestamp"):
            self._role_signers(role)
        del targets_md.signed.targets[path]
        targets_md.signed.version += 1
        targets_md.signed.expires = self._expires("targets", now)
        self._sign_and_write(targets_md, "targets")
        self._write_snapshot_and_timestamp(targets_md, now=now)

    def refresh(
        self, *, roles: Iterable[str] = ("snapshot", "timestamp"), now: datetime | None = None
    ) -> None:
        """Re-sign online roles with new versions and expiries (before they expire)."""
        now = now or datetime.now(UTC)
        roles = set(roles)
        targets_md: Metadata[Targets] = self._latest("targets", Targets)
        if "targets" in roles:
            targets_md.signed.version += 1
            targets_md.signed.expires = self._expires("targets", now)
            self._sign_and_write(targets_md, "targets")
        if roles & {"targets", "snapshot"}:
            self._write_snapshot_and_timestamp(targets_md, now=now)
        elif "timestamp" in roles:
            ts_md: Metadata[Timestamp] = self._latest("timestamp", Timestamp)
            ts_md.signed.version += 1
            ts_md.signed.expires = self._expires("timestamp", now)
            self._sign_and_write(ts_md, "timestamp")

    # -- verification ----------------------------------------------------------------
    def verify(
        self, *, now: datetime | None = None
    ) -> tuple[VerificationReport, list[TargetCheck]]:
        """Verify the repository as a device fresh from the factory would, then every blob.

        The metadata goes through :func:`otaguard.repo.verify.check_repository` (python-tuf's
        client workflow, trusting ``1.root.json``); a repository holding only the offline
        roles has its snapshot and timestamp reported as signed by the server. Each target
        the verified targets metadata lists is then checked against its blob in
        ``targets/`` (length and hashes).

        Args:
            now: reference time for expiry checks (default: the current time, read once).

        Returns:
            The per-role report and one check per target blob (none when the metadata
            did not verify).

        Raises:
            ConfigError: the metadata directory cannot be read.
        """
        report = check_repository(self.read_files(), now=now or datetime.now(UTC))
        checks: list[TargetCheck] = []
        if report.targets is not None:
            for path, tf in report.targets.targets.items():
                blob = self.targets_dir / f"{tf.hashes.get('sha256', '')}.{path}"
                try:
                    with open(blob, "rb") as f:
                        tf.verify_length_and_hashes(f)
                    checks.append(TargetCheck(path, True, None))
                except FileNotFoundError:
                    checks.append(TargetCheck(path, False, "blob missing"))
                except OSError as e:
                    checks.append(TargetCheck(path, False, f"unreadable: {e.strerror}"))
                except LengthOrHashMismatchError as e:
                    checks.append(TargetCheck(path, False, " ".join(str(e).split())))
        return report, checks

    def copy_root(self, dest: Path) -> None:
        """Copy the newest root metadata to ``dest`` (device provisioning)."""
        shutil.copyfile(self.metadata_dir / "root.json", dest)
