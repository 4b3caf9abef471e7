"""The image repository: offline-signed metadata saying which firmware exists.

Two directories, kept apart (a keys directory inside the repository is refused)::

    REPO_DIR/                  what is published; holds no private key
      otaguard-repo.json       expiries, each role's key ids and signer URIs
      metadata/                exact signed bytes (consistent snapshots)
      targets/                 blobs named <sha256>.<target path>, as served
    KEYS_DIR/  (mode 0700)     on the offline signing machine only
      otaguard-keys.json       which keys these are (key ids, no secrets)
      <role>-<algorithm>.pem   one file per key, mode 0600, each with its own passphrase

Who signs snapshot and timestamp decides the mode:

*server mode* (``init(..., online_key=KEY)``)
    The update server holds the online key and signs snapshot and timestamp itself,
    re-signing them before they expire. ``metadata/`` holds ``N.root.json``,
    ``root.json`` and ``N.targets.json`` only; release commands sign targets only.
*local mode* (no online key)
    Snapshot and timestamp keys are in KEYS_DIR too: the repository is complete and
    static (any web server can serve it) and :meth:`ImageRepository.refresh` re-signs
    it before it expires. ``timestamp.json`` is written last, so a reader (the server's
    sync) never sees a timestamp naming a snapshot not yet written.

Keys are named by signer URIs relative to KEYS_DIR (``encfile:targets-ed25519.pem``) and
unlocked through :func:`otaguard.crypto.signers.load_signer` with passphrases asked by
key name. Every key an operation needs is unlocked before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import (
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
from otaguard.crypto.hybrid import check_hybrid, mark_hybrid, satisfiable
from otaguard.crypto.keys import generate_signer, warn_insecure, write_private_key
from otaguard.crypto.signers import (
    ENCRYPTED_FILE_SCHEME,
    PLAINTEXT_FILE_SCHEME,
    KeySecrets,
    load_signer,
    resolve_key_uri,
)
from otaguard.model.errors import ConfigError, KeyAccessError, OperatorError, VerificationError
from otaguard.model.names import check_target_name
from otaguard.model.release import ReleaseInfo
from otaguard.model.sbom import (
    MAX_SBOM_BYTES,
    SBOM_OF_KEY,
    Sbom,
    SbomRef,
    is_sbom_target,
    parse_sbom,
    sbom_target_name,
)
from otaguard.model.transfer import TRANSFER_OF_KEY, is_auxiliary_target, is_transfer_target
from otaguard.model.unsafe import Unsafe
from otaguard.model.version import Version
from otaguard.repo.keyspec import ROLE_ALGORITHMS, RoleKeySpec, algorithm_of, key_names
from otaguard.repo.transfer import TransferRequest, store_encodings
from otaguard.repo.verify import VerificationReport, check_repository

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_EXPIRY_DAYS",
    "KEYS_CONFIG_NAME",
    "OFFLINE_ROLES",
    "ONLINE_ROLES",
    "ROLE_ALGORITHMS",
    "ImageRepository",
    "KeyRef",
    "Release",
    "TargetCheck",
]

logger = logging.getLogger(__name__)

CONFIG_NAME: Final = "otaguard-repo.json"
# Format 1 kept every private key in REPO_DIR/keys; format 2 keeps them outside.
CONFIG_FORMAT: Final = 2
#: written into the keys directory; the update server refuses a directory holding one
KEYS_CONFIG_NAME: Final = "otaguard-keys.json"
KEYS_CONFIG_FORMAT: Final = 1
DEFAULT_EXPIRY_DAYS: Final = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
# Longer than ten years is not an expiry; the TUF freshness guarantee would be void.
MAX_EXPIRY_DAYS: Final = 3650
#: roles whose keys never leave the offline signing machine
OFFLINE_ROLES: Final = ("root", "targets")
#: roles signed by the update server in server mode, by local keys in local mode
ONLINE_ROLES: Final = ("snapshot", "timestamp")
#: key name recorded for the update server's online key (it has no URI here)
SERVER_KEY_NAME: Final = "server-online"
# More root versions than this in one repository is not a rotation history but an attack.
MAX_ROOT_VERSIONS: Final = 1024
# Images are hashed and copied in chunks this size, never held in memory.
CHUNK: Final = 1024 * 1024

_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)


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


@dataclass(frozen=True)
class KeyRef:
    """One role key as the repository config records it (public information only).

    Attributes:
        name: key name, also the passphrase prompt's and environment variable's
            (``targets-ed25519``).
        role: the TUF role it signs.
        algorithm: ``ed25519`` or ``ml-dsa-65``.
        keyid: its TUF key id in root.
        uri: signer URI, relative paths against the keys directory; ``None`` for the
            update server's online key, which this repository never holds.
    """

    name: str
    role: str
    algorithm: str
    keyid: str
    uri: str | None

    def to_json(self) -> dict[str, Any]:
        """The config entry."""
        return {
            "name": self.name,
            "algorithm": self.algorithm,
            "keyid": self.keyid,
            "uri": self.uri,
        }


def _check_secrets(passphrases: object) -> None:
    if passphrases is not Unsafe.PLAINTEXT_KEYS and not callable(passphrases):
        raise OperatorError(
            "give passphrases by key name, or Unsafe.PLAINTEXT_KEYS for development keys"
        )


def _inside(path: Path, other: Path) -> bool:
    """True when ``path`` is ``other`` or below it (after resolving symlinks)."""
    p, o = path.resolve(), other.resolve()
    return p == o or p.is_relative_to(o)


def _expires(now: datetime, days: int) -> datetime:
    return (now + timedelta(days=days)).replace(microsecond=0)


def _check_init_dirs(repo_dir: Path, keys_dir: Path) -> None:
    if _inside(keys_dir, repo_dir) or _inside(repo_dir, keys_dir):
        raise OperatorError(
            f"the keys directory {keys_dir} must be outside the repository directory "
            f"{repo_dir} (and not contain it): the repository is published, keys never are"
        )
    for d, what in ((repo_dir, "repository"), (keys_dir, "keys")):
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise OperatorError(f"{what} directory {d} is not empty; refusing to overwrite")


def _init_expiries(
    local_roles: Sequence[str], expiry_days: Mapping[str, int], *, server_mode: bool
) -> dict[str, int]:
    expiries = {role: DEFAULT_EXPIRY_DAYS[role] for role in local_roles}
    for role, days in expiry_days.items():
        if role in ONLINE_ROLES and server_mode:
            raise OperatorError(
                f"the update server signs {role} in server mode: its lifetime is the "
                f"server's --{role}-expiry option"
            )
        if role not in expiries or not 0 < days <= MAX_EXPIRY_DAYS:
            raise OperatorError(f"invalid expiry for {role}: {days} days")
        expiries[role] = days
    return expiries


def _mark_hybrid_default(root: Root) -> None:
    """Hybrid by default (ADR 0014): the policy is signed into root with the keys."""
    for role in OFFLINE_ROLES:
        if satisfiable(root, role):
            mark_hybrid(root, role)
        else:
            logger.warning("%s has no pair of an Ed25519/ECDSA and an ML-DSA key: not hybrid", role)


_Secret = bytes | Literal[Unsafe.PLAINTEXT_KEYS]


def _new_secrets(names: Sequence[str], passphrases: KeySecrets) -> dict[str, _Secret]:
    secrets: dict[str, _Secret] = {}
    for name in names:
        if passphrases is Unsafe.PLAINTEXT_KEYS:
            secrets[name] = Unsafe.PLAINTEXT_KEYS
            continue
        secret = passphrases(name)
        if not isinstance(secret, bytes) or not secret:
            raise KeyAccessError(f"empty passphrase for key {name}")
        secrets[name] = secret
    return secrets


def _create_keys(
    keys_dir: Path,
    roles: Sequence[str],
    secrets: Mapping[str, _Secret],
    specs: Mapping[str, RoleKeySpec],
) -> tuple[dict[str, list[Signer]], dict[str, list[KeyRef]]]:
    """Generate each role's keys into ``keys_dir`` (0700), one 0600 file per key.

    Keys given by URI (``specs[role].external``) are recorded after the generated ones;
    only the generated ones are returned as signers.
    """
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    signers: dict[str, list[Signer]] = {}
    refs: dict[str, list[KeyRef]] = {}
    for role in roles:
        spec = specs[role]
        generated, external = key_names(role, spec)
        for name, alg in generated:
            signer = generate_signer(alg)
            secret = secrets[name]
            write_private_key(keys_dir / f"{name}.pem", signer, passphrase=secret)
            scheme = (
                PLAINTEXT_FILE_SCHEME if secret is Unsafe.PLAINTEXT_KEYS else ENCRYPTED_FILE_SCHEME
            )
            signers.setdefault(role, []).append(signer)
            refs.setdefault(role, []).append(
                KeyRef(name, role, alg, signer.public_key.keyid, f"{scheme}:{name}.pem")
            )
        for name, ext in zip(external, spec.external, strict=True):
            refs.setdefault(role, []).append(
                KeyRef(name, role, algorithm_of(ext.public_key), ext.public_key.keyid, ext.uri)
            )
    return signers, refs


def _write_configs(
    repo_dir: Path,
    keys_dir: Path,
    refs: Mapping[str, list[KeyRef]],
    expiries: Mapping[str, int],
    *,
    server_mode: bool,
) -> None:
    """The keys directory's marker and the repository config (public information only)."""
    atomic_write_json(
        keys_dir / KEYS_CONFIG_NAME,
        {
            "format": KEYS_CONFIG_FORMAT,
            "keys": {r.name: r.keyid for rs in refs.values() for r in rs if r.uri},
        },
        mode=0o600,
    )
    try:
        recorded_keys_dir = os.path.relpath(keys_dir.resolve(), repo_dir.resolve())
    except ValueError:  # another drive (Windows): record it as is
        recorded_keys_dir = str(keys_dir.resolve())
    atomic_write_json(
        repo_dir / CONFIG_NAME,
        {
            "format": CONFIG_FORMAT,
            "online_roles": "server" if server_mode else "local",
            "expiry_days": dict(expiries),
            "keys_dir": recorded_keys_dir,
            "keys": {role: [r.to_json() for r in rs] for role, rs in refs.items()},
        },
    )


def _read_sbom(path: Path) -> Sbom:
    """Read and check a release's SBOM file (bounded read: never more than the limit)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SBOM_BYTES + 1)
    except OSError as e:
        raise OperatorError(f"cannot read SBOM {path}: {e.strerror}") from e
    try:
        return parse_sbom(data)
    except VerificationError as e:
        raise OperatorError(f"{path}: {e}") from e


class ImageRepository:
    """An image repository in a directory, with its keys in a separate keys directory."""

    def __init__(
        self,
        repo_dir: Path,
        *,
        passphrases: KeySecrets | None = None,
        keys_dir: Path | None = None,
    ):
        """Open an existing repository.

        Args:
            repo_dir: the repository directory.
            passphrases: how to unlock keys: a function from key name to passphrase, or
                :attr:`Unsafe.PLAINTEXT_KEYS` for unencrypted development keys.
                ``None`` opens the repository for reading only; signing then fails with
                :class:`KeyAccessError`.
            keys_dir: where the keys are, overriding the directory recorded at init
                (e.g. a removable disk mounted elsewhere).

        Raises:
            ConfigError: not an otaguard repository, or one made by an older version.
        """
        self.dir = Path(repo_dir)
        if passphrases is not None:
            _check_secrets(passphrases)
        self._passphrases = passphrases
        self._keys_dir_override = Path(keys_dir) if keys_dir is not None else None
        path = self.dir / CONFIG_NAME
        try:
            self.config: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{self.dir} is not an otaguard repository (no {CONFIG_NAME})") from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        if not isinstance(self.config, dict):
            raise ConfigError(f"{path} is not a repository config")
        if self.config.get("format") == 1:
            raise ConfigError(
                f"{self.dir} keeps its private keys inside the repository (format 1); "
                "create a new repository with 'otaguard repo init REPO_DIR --keys-dir KEYS_DIR'"
            )
        if self.config.get("format") != CONFIG_FORMAT:
            raise ConfigError(f"{path} has an unknown format")
        try:
            self._refs = {
                role: [
                    KeyRef(e["name"], role, e["algorithm"], e["keyid"], e.get("uri"))
                    for e in self.config["keys"][role]
                ]
                for role in ROLE_ALGORITHMS
            }
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path} does not list the keys of every role") from e
        if self.plaintext_keys:
            warn_insecure(f"repository {self.dir} uses plaintext private keys")
        self._signers: dict[str, list[Signer]] = {}

    # -- paths and configuration -------------------------------------------------------
    @property
    def metadata_dir(self) -> Path:
        """Directory of the signed metadata files."""
        return self.dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        """Directory of the target blobs, named as served."""
        return self.dir / "targets"

    @property
    def keys_dir(self) -> Path:
        """The keys directory: the override given, else the one recorded at init."""
        if self._keys_dir_override is not None:
            return self._keys_dir_override
        recorded = self.config.get("keys_dir")
        if not isinstance(recorded, str):
            raise ConfigError(f"{self.dir / CONFIG_NAME} records no keys directory")
        # Recorded relative to the resolved repository directory, so ".." is exact here.
        return Path(os.path.normpath(self.dir.resolve() / recorded))

    @property
    def server_signed(self) -> bool:
        """True in server mode: the update server signs snapshot and timestamp."""
        return self.config.get("online_roles") == "server"

    @property
    def plaintext_keys(self) -> bool:
        """True when the repository's keys are unencrypted development keys."""
        return any(
            (ref.uri or "").startswith(f"{PLAINTEXT_FILE_SCHEME}:")
            for refs in self._refs.values()
            for ref in refs
        )

    def key_refs(self, role: str) -> list[KeyRef]:
        """The keys of ``role`` as the config records them."""
        return list(self._refs[role])

    def signing_roles(self) -> tuple[str, ...]:
        """Roles this tool signs when targets change (targets only in server mode)."""
        return ("targets",) if self.server_signed else ("targets", *ONLINE_ROLES)

    # -- creation --------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        repo_dir: Path,
        *,
        keys_dir: Path,
        passphrases: KeySecrets,
        online_key: Key | None = None,
        expiry_days: Mapping[str, int] | None = None,
        key_specs: Mapping[str, RoleKeySpec] | None = None,
        now: datetime | None = None,
    ) -> ImageRepository:
        """Create keys and signed version-1 metadata.

        Args:
            repo_dir: new or empty repository directory.
            keys_dir: new or empty directory for the private keys, outside ``repo_dir``.
            passphrases: the new passphrase of each key by key name (asked once per key,
                before anything is written), or :attr:`Unsafe.PLAINTEXT_KEYS` to write
                unencrypted development keys (warns).
            online_key: the update server's public online key (server mode): root lists
                it as the one snapshot and timestamp key, threshold 1, and no snapshot or
                timestamp key is created here. ``None`` makes a self-contained local-mode
                repository with its own snapshot and timestamp keys.
            expiry_days: per-role expiry, defaults to :data:`DEFAULT_EXPIRY_DAYS`; in
                server mode snapshot and timestamp lifetimes are server settings.
            key_specs: k-of-n per offline role (root, targets): how many keys, the
                threshold, and keys given by URI; default :meth:`RoleKeySpec.default`
                (the hybrid pair, threshold 2). When the generated keys do not reach a
                role's threshold, its keys given by URI sign the first version too
                (unlocked through ``passphrases`` by key name: an HSM's PIN).
            now: reference time (tests).

        Raises:
            OperatorError: a directory is not empty, the keys directory is inside the
                repository (or the other way round), or an expiry is invalid.
            KeyAccessError: a passphrase is empty or could not be asked.
        """
        repo_dir, keys_dir = Path(repo_dir), Path(keys_dir)
        _check_secrets(passphrases)
        _check_init_dirs(repo_dir, keys_dir)
        server_mode = online_key is not None
        local_roles = OFFLINE_ROLES if server_mode else tuple(ROLE_ALGORITHMS)
        expiries = _init_expiries(local_roles, expiry_days or {}, server_mode=server_mode)
        specs = {role: RoleKeySpec.default(role) for role in ROLE_ALGORITHMS}
        for role, spec in (key_specs or {}).items():
            if role not in OFFLINE_ROLES:
                raise OperatorError(f"k-of-n applies to the offline roles, not {role}")
            specs[role] = spec
        now = now or datetime.now(UTC)
        # Every passphrase first: a refused or mistyped one leaves nothing behind.
        secrets = _new_secrets(
            [name for role in local_roles for name, _ in key_names(role, specs[role])[0]],
            passphrases,
        )
        for d in (repo_dir / "metadata", repo_dir / "targets"):
            d.mkdir(parents=True, exist_ok=True)
        signers, refs = _create_keys(keys_dir, local_roles, secrets, specs)
        public_keys: dict[str, list[Key]] = {
            role: [s.public_key for s in signers.get(role, [])]
            + [e.public_key for e in specs[role].external]
            for role in local_roles
        }
        if online_key is not None:
            for role in ONLINE_ROLES:
                public_keys[role] = [online_key]
                refs[role] = [
                    KeyRef(SERVER_KEY_NAME, role, online_key.keytype, online_key.keyid, None)
                ]
        _write_configs(repo_dir, keys_dir, refs, expiries, server_mode=server_mode)

        root = Root(expires=_expires(now, expiries["root"]), consistent_snapshot=True)
        for role, keys in public_keys.items():
            threshold = specs[role].threshold if role in OFFLINE_ROLES else len(keys)
            root.roles[role] = Role([k.keyid for k in keys], threshold=threshold)
            for k in keys:
                root.keys[k.keyid] = k
        _mark_hybrid_default(root)
        repo = cls(repo_dir, passphrases=passphrases, keys_dir=keys_dir)
        repo._signers = signers
        for role in OFFLINE_ROLES:
            if len(signers.get(role, [])) < specs[role].threshold:
                # the generated keys alone cannot sign version 1: the URI keys sign too
                repo._signers[role] = signers.get(role, []) + [
                    load_signer(
                        resolve_key_uri(ref.uri, keys_dir),
                        root.keys[ref.keyid],
                        name=ref.name,
                        secrets=passphrases,
                    )
                    for ref in refs[role][len(signers.get(role, [])) :]
                    if ref.uri is not None
                ]
        repo._sign_and_write(Metadata(root), "root")
        targets_md = Metadata(Targets(expires=_expires(now, expiries["targets"])))
        repo._sign_and_write(targets_md, "targets")
        if online_key is None:
            repo._write_snapshot_and_timestamp(targets_md, now=now, bump=False)
        logger.info(
            "initialised image repository in %s (%s mode), keys in %s",
            repo_dir,
            "server" if online_key is not None else "local",
            keys_dir,
        )
        return repo

    # -- signing ---------------------------------------------------------------------
    def _check_keys_dir(self) -> None:
        keys_dir = self.keys_dir
        if not keys_dir.is_dir():
            raise ConfigError(
                f"keys directory {keys_dir} not found (pass --keys-dir where the keys are)"
            )
        marker = keys_dir / KEYS_CONFIG_NAME
        try:
            recorded = json.loads(marker.read_text()).get("keys", {})
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"cannot read {marker}: {e}") from e
        for refs in self._refs.values():
            for ref in refs:
                if ref.uri is not None and recorded.get(ref.name, ref.keyid) != ref.keyid:
                    raise ConfigError(f"{keys_dir} holds the keys of another repository")

    def _role_signers(self, role: str) -> list[Signer]:
        if role in self._signers:
            return self._signers[role]
        refs = self._refs[role]
        if not refs:
            raise ConfigError(f"no keys configured for role {role}")
        if any(ref.uri is None for ref in refs):
            raise OperatorError(
                f"the update server holds the {role} key of this repository and signs {role} itself"
            )
        if self._passphrases is None:
            raise KeyAccessError(f"the repository was opened read-only; cannot sign {role}")
        self._check_keys_dir()
        root = self._latest("root", Root).signed
        signers: list[Signer] = []
        for ref in refs:
            public = root.keys.get(ref.keyid)
            if public is None or ref.keyid not in root.roles[role].keyids:
                raise ConfigError(f"key {ref.name} is not a {role} key of the newest root")
            assert ref.uri is not None  # noqa: S101 - checked above
            signers.append(
                load_signer(
                    resolve_key_uri(ref.uri, self.keys_dir),
                    public,
                    name=ref.name,
                    secrets=self._passphrases,
                )
            )
        self._signers[role] = signers
        return signers

    def unlock(self, roles: Iterable[str]) -> None:
        """Unlock the keys of ``roles`` now (each passphrase is asked once per instance).

        Raises:
            KeyAccessError: a passphrase is wrong or missing; names the key.
            ConfigError: a key file is missing or not the key root lists.
            OperatorError: a role is signed by the update server.
        """
        for role in roles:
            self._role_signers(role)

    def _expires(self, role: str, now: datetime) -> datetime:
        return _expires(now, int(self.config["expiry_days"][role]))

    def _sign_and_write(self, md: Metadata[Any], role: str) -> bytes:
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
        """Local mode: sign the next snapshot naming ``targets_md`` and a timestamp."""
        if self.server_signed:
            raise OperatorError("the update server signs snapshot and timestamp")
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

    def _sign_targets(self, targets_md: Metadata[Targets], now: datetime) -> None:
        """Write ``targets_md`` as the next version, and in local mode what leads to it."""
        targets_md.signed.version += 1
        targets_md.signed.expires = self._expires("targets", now)
        self._sign_and_write(targets_md, "targets")
        if not self.server_signed:
            self._write_snapshot_and_timestamp(targets_md, now=now)

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

    def latest_version(self, role: str) -> int:
        """Newest version of ``root`` or ``targets`` (or local-mode ``snapshot``) on disk.

        Raises:
            ConfigError: the repository has no metadata of that role.
        """
        try:
            names = os.listdir(self.metadata_dir)
        except OSError as e:
            raise ConfigError(f"cannot read {self.metadata_dir}: {e.strerror}") from e
        versions = [
            int(n.split(".", 1)[0])
            for n in names
            if n.endswith(f".{role}.json") and n.split(".", 1)[0].isdigit()
        ]
        if not versions:
            raise ConfigError(f"repository has no {role} metadata")
        return max(versions)

    def _latest(self, role: str, cls: type[_S]) -> Metadata[_S]:
        if role == "timestamp":
            path = self.metadata_dir / "timestamp.json"
        else:
            path = self.metadata_dir / f"{self.latest_version(role)}.{role}.json"
        try:
            md: Metadata[Any] = Metadata.from_file(str(path))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load {path}: {e}") from e
        if not isinstance(md.signed, cls):
            raise ConfigError(f"{path} is not {role} metadata")
        return md

    def latest_root(self) -> Root:
        """The newest root on disk (read as is: :meth:`verify` checks the chain)."""
        return self._latest("root", Root).signed

    def latest_targets(self) -> Targets:
        """The newest targets on disk."""
        return self._latest("targets", Targets).signed

    def targets_expiry(self, now: datetime) -> datetime:
        """When targets signed at ``now`` expire (the repository's targets lifetime)."""
        return self._expires("targets", now)

    def root_expiry(self, now: datetime, *, days: int | None = None) -> datetime:
        """When a root signed at ``now`` expires: ``days``, else the repository's root lifetime.

        Raises:
            OperatorError: ``days`` out of range.
        """
        if days is not None and not 0 < days <= MAX_EXPIRY_DAYS:
            raise OperatorError(f"invalid expiry for root: {days} days")
        return _expires(now, days) if days is not None else self._expires("root", now)

    def write_signed_root(self, root_md: Metadata[Root]) -> None:
        """Write a root signed elsewhere (the ceremony) as the next version and ``root.json``.

        The caller checked it is signed by a threshold of the current root's root keys and
        of its own.

        Raises:
            OperatorError: not the next version.
        """
        if root_md.signed.version != self.latest_version("root") + 1:
            raise OperatorError("the signed root is not the next version")
        if root_md.signed.version > MAX_ROOT_VERSIONS:
            raise OperatorError(f"more than {MAX_ROOT_VERSIONS} root versions")
        data = root_md.to_bytes()
        atomic_write_bytes(self.metadata_dir / f"{root_md.signed.version}.root.json", data)
        atomic_write_bytes(self.metadata_dir / "root.json", data)
        self._adopt_root_keys(root_md.signed)

    def follow_root(self, previous: Root, *, now: datetime) -> list[str]:
        """After a new root: re-sign what its key changes invalidated, where keys are here.

        Local mode: when the snapshot or timestamp keys changed, both are re-signed by
        the new keys (devices then drop a timestamp or snapshot signed by a removed key:
        fast-forward recovery, TUF §5.3.11). Server mode: the update server signs them
        with its new online key once restarted with it.

        Returns:
            Roles whose newest metadata no longer verifies under the new root and must be
            signed again by their new keys (``targets``: ``repo refresh --roles targets``
            or the next release).

        Raises:
            KeyAccessError: a new snapshot or timestamp key cannot be unlocked.
        """
        root = self.latest_root()
        online_changed = any(
            root.roles[r].keyids != previous.roles[r].keyids
            or root.roles[r].threshold != previous.roles[r].threshold
            for r in ONLINE_ROLES
        )
        if online_changed and not self.server_signed:
            self.refresh(roles=["snapshot"], now=now)
        stale = []
        md: Metadata[Targets] = self._latest("targets", Targets)
        try:
            root.verify_delegate("targets", md.signed_bytes, md.signatures)
            check_hybrid(root, "targets", md.signed_bytes, md.signatures)
        except (UnsignedMetadataError, VerificationError):
            stale.append("targets")
        return stale

    def stage_key_refs(self, refs: Iterable[KeyRef]) -> None:
        """Record keys a staged root adds (name, URI), adopted when that root is written.

        The request carries public keys only; where a new key lives (its URI) and its
        name stay here until :meth:`write_signed_root` makes them the role's keys.
        """
        pending = dict(self.config.get("pending_keys", {}))
        for ref in refs:  # one key may serve several roles (the server's online key)
            roles = pending.get(ref.keyid, {}).get("roles", [])
            pending[ref.keyid] = {"roles": sorted({*roles, ref.role}), **ref.to_json()}
        self.config["pending_keys"] = pending
        atomic_write_json(self.dir / CONFIG_NAME, self.config)

    def key_names_in_use(self) -> set[str]:
        """Every key name the config records, current or staged (never reused)."""
        names = {r.name for refs in self._refs.values() for r in refs}
        pending = self.config.get("pending_keys", {})
        return names | {e["name"] for e in pending.values() if isinstance(e, dict)}

    def _adopt_root_keys(self, root: Root) -> None:
        """Make the config's key lists those of ``root`` (after a rotation)."""
        known = {r.keyid: r for refs in self._refs.values() for r in refs}
        pending = self.config.get("pending_keys", {})
        refs: dict[str, list[KeyRef]] = {}
        for role in ROLE_ALGORITHMS:
            refs[role] = []
            for keyid in root.roles[role].keyids:
                p = pending.get(keyid)
                if isinstance(p, dict) and role in p.get("roles", []):
                    ref = KeyRef(p["name"], role, p["algorithm"], keyid, p.get("uri"))
                elif keyid in known:
                    old = known[keyid]
                    ref = KeyRef(old.name, role, old.algorithm, keyid, old.uri)
                else:
                    ref = KeyRef(keyid[:16], role, root.keys[keyid].scheme, keyid, None)
                refs[role].append(ref)
        self._refs = refs
        self._signers.clear()
        self.config["keys"] = {role: [r.to_json() for r in rs] for role, rs in refs.items()}
        self.config["pending_keys"] = {k: v for k, v in pending.items() if k not in root.keys}
        atomic_write_json(self.dir / CONFIG_NAME, self.config)

    def write_signed_targets(self, targets_md: Metadata[Targets], *, now: datetime) -> None:
        """Write targets signed elsewhere (the signing ceremony) as the next version.

        The caller checked its signatures against the newest root. Server-less, the
        snapshot and timestamp keys are unlocked first and sign what leads to it.

        Raises:
            OperatorError: not the next version.
            KeyAccessError: a snapshot or timestamp key cannot be unlocked (nothing written).
        """
        if targets_md.signed.version != self.latest_version("targets") + 1:
            raise OperatorError("the signed targets are not the next version")
        if not self.server_signed:
            self.unlock(ONLINE_ROLES)
        atomic_write_bytes(
            self.metadata_dir / f"{targets_md.signed.version}.targets.json", targets_md.to_bytes()
        )
        if not self.server_signed:
            self._write_snapshot_and_timestamp(targets_md, now=now)

    def releases(self) -> list[Release]:
        """Every published target with its parsed otaguard fields, oldest version first."""
        targets: Targets = self._latest("targets", Targets).signed
        out = []
        for path, tf in targets.targets.items():
            if is_auxiliary_target(tf.custom):
                continue  # an image's SBOM or encoding, listed through the image's custom
            info = ReleaseInfo.from_custom(tf.custom)
            out.append(Release(path, tf.length, tf.hashes["sha256"], info))
        return sorted(out, key=lambda r: r.info.version)

    def blob_path(self, release: Release) -> Path:
        """Where the blob of ``release`` is stored in this repository."""
        return self.targets_dir / f"{release.sha256}.{release.path}"

    def release_sbom(self, version: str) -> tuple[Release, Sbom]:
        """The release ``version`` and its SBOM, checked against the binding and parsed.

        Raises:
            OperatorError: no such release, or it has no SBOM.
            VerificationError: the stored SBOM is not the bound bytes, or not CycloneDX.
        """
        try:
            wanted = Version.parse(version)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        found = [r for r in self.releases() if r.info.version == wanted]
        if not found:
            raise OperatorError(f"no release {version} in {self.dir}")
        release = found[0]
        ref = release.info.sbom
        if ref is None:
            raise OperatorError(f"release {version} ({release.path}) has no SBOM")
        path = self.targets_dir / f"{ref.sha256}.{ref.path}"
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SBOM_BYTES + 1)
        except OSError as e:
            raise OperatorError(f"cannot read the SBOM of {release.path}: {e.strerror}") from e
        if len(data) != ref.length or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise VerificationError(f"the stored SBOM of {release.path} is not the signed one")
        return release, parse_sbom(data)

    # -- releases --------------------------------------------------------------------
    def add_release(
        self,
        image: Path,
        *,
        version: str,
        hardware_ids: Sequence[str],
        security: bool,
        security_counter: int | None,
        sbom: Path,
        now: datetime | None = None,
        progress: Callable[[int], None] | None = None,
        transfer: TransferRequest | None = None,
    ) -> Release:
        """Add a firmware image and its SBOM as new targets and re-sign targets.

        ``transfer`` adds a zstd blob and deltas from published versions (ADR 0018).

        ``sbom`` (required: every release has one) must be a CycloneDX 1.5 or 1.6 JSON
        SBOM; it becomes a target of its own, bound into the image's ``custom``.

        In local mode snapshot and timestamp are re-signed too; in server mode the update
        server signs them when it imports the new targets.

        The security counter defaults to the highest published one, plus one for a
        security release (so devices can never go back below the fix).

        Raises:
            OperatorError: bad version, version not above an existing release for one of
                the hardware ids, counter below the highest published, unreadable image,
                missing or invalid SBOM (the message names the problem).
            KeyAccessError: a key cannot be unlocked (nothing was written).
        """
        now = now or datetime.now(UTC)
        targets_md, info, name, checked = self.check_new_release(
            image,
            version=version,
            hardware_ids=hardware_ids,
            security=security,
            security_counter=security_counter,
            sbom=sbom,
        )
        # Unlock every key before writing anything, so a wrong passphrase changes nothing.
        self.unlock(self.signing_roles())
        release = self.store_release(
            targets_md, Path(image), name, info, sbom=checked, progress=progress,
            transfer=transfer,
        )  # fmt: skip
        self._sign_targets(targets_md, now)
        logger.info("added release %s (%s bytes)", name, release.length)
        return release

    def check_new_release(
        self,
        image: Path,
        *,
        version: str,
        hardware_ids: Sequence[str],
        security: bool,
        security_counter: int | None,
        sbom: Path,
    ) -> tuple[Metadata[Targets], ReleaseInfo, str, Sbom]:
        """Check a new release against the published ones; nothing is written.

        Returns:
            The newest targets metadata (to extend), the release's fields (with the SBOM
            binding), its target name and its checked SBOM.

        Raises:
            OperatorError: as :meth:`add_release`.
        """
        try:
            new_version = Version.parse(version)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        hardware_ids = list(dict.fromkeys(hardware_ids))
        existing = self.releases()
        highest_counter = max((r.info.security_counter for r in existing), default=0)
        older_line = _check_version_rule(new_version, security, existing, hardware_ids)
        # an older line's fix needs no counter above the newer lines' (they may carry fixes
        # it lacks), only one its own line's devices accept: not below anything older
        floor = (
            max((r.info.security_counter for r in existing if r.info.version < new_version),
                default=0)
            if older_line
            else highest_counter
        )  # fmt: skip
        if security_counter is None:
            security_counter = highest_counter + (1 if security else 0)
        elif security_counter < floor:
            what = "a published older release" if older_line else "the highest published"
            raise OperatorError(f"security counter {security_counter} is below {what} ({floor})")
        image = Path(image)
        suffix = image.suffix or ".img"
        name = f"{image.stem}-{new_version}{suffix}"
        try:
            check_target_name(name)
            sbom_name = sbom_target_name(name)
        except ValueError as e:
            raise OperatorError(f"image {image.name!r} gives the target name {name!r}: {e}") from e
        checked = _read_sbom(Path(sbom))
        try:
            info = ReleaseInfo(
                version=new_version,
                security_counter=security_counter,
                hardware_ids=tuple(hardware_ids),
                release_type="security" if security else "feature",
                sbom=SbomRef(sbom_name, checked.sha256, len(checked.data)),
            )
        except ValueError as e:
            raise OperatorError(str(e)) from e
        targets_md: Metadata[Targets] = self._latest("targets", Targets)
        for taken in (name, sbom_name):
            if taken in targets_md.signed.targets:
                raise OperatorError(f"target {taken} already exists")
        return targets_md, info, name, checked

    def store_release(
        self,
        targets_md: Metadata[Targets],
        image: Path,
        name: str,
        info: ReleaseInfo,
        *,
        sbom: Sbom,
        progress: Callable[[int], None] | None = None,
        transfer: TransferRequest | None = None,
    ) -> Release:
        """Store ``image``'s and ``sbom``'s blobs under their hash names and list both in
        ``targets_md`` (the image's ``custom`` binding the SBOM: ``info.sbom``), with the
        encodings ``transfer`` asks for (:mod:`otaguard.repo.transfer`).

        Nothing is signed: an unlisted blob in ``targets/`` is served to nobody.
        """
        ref = info.sbom
        if ref is None or ref.sha256 != sbom.sha256:
            raise RuntimeError("store_release needs the release's own checked SBOM")
        # The image first: an unreadable image leaves no SBOM blob behind.
        length, sha256 = self._store_blob(image, name, progress=progress)
        try:
            atomic_write_bytes(self.targets_dir / f"{ref.sha256}.{ref.path}", sbom.data)
        except OSError as e:
            raise OperatorError(f"cannot store the SBOM: {e.strerror}") from e
        targets_md.signed.targets[ref.path] = TargetFile(
            ref.length,
            {"sha256": ref.sha256},
            ref.path,
            unrecognized_fields={"custom": {SBOM_OF_KEY: name, "spec_version": sbom.spec_version}},
        )
        tf = TargetFile(
            length, {"sha256": sha256}, name, unrecognized_fields={"custom": info.to_custom()}
        )
        targets_md.signed.targets[name] = tf
        if transfer:
            store_encodings(self, targets_md, Path(image), name, info=info, request=transfer)
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
            if length == 0:
                raise OperatorError(f"image {image} is empty")
            os.replace(tmp, self.targets_dir / f"{digest}.{name}")
            fsync_dir(self.targets_dir)
        except OSError as e:
            raise OperatorError(f"cannot store image {image}: {e.strerror}") from e
        finally:
            Path(tmp).unlink(missing_ok=True)
        return length, digest

    def withdraw_release(self, path: str, *, now: datetime | None = None) -> None:
        """Remove a target from the repository (e.g. a faulty release) and re-sign.

        Devices never go back to an older release because of this: their anti-rollback
        floor refuses it. The blob stays on disk for audit.

        Raises:
            OperatorError: no such target.
            KeyAccessError: a key cannot be unlocked (nothing was written).
        """
        now = now or datetime.now(UTC)
        targets_md: Metadata[Targets] = self._latest("targets", Targets)
        if path not in targets_md.signed.targets:
            raise OperatorError(f"no target named {path}")
        if is_sbom_target(targets_md.signed.targets[path].custom):
            raise OperatorError(f"{path} is an SBOM: withdraw the release it describes")
        if is_transfer_target(targets_md.signed.targets[path].custom):
            raise OperatorError(f"{path} is an encoding: withdraw the release it encodes")
        self.unlock(self.signing_roles())
        removed = targets_md.signed.targets.pop(path)
        custom = removed.custom
        if isinstance(custom, dict) and isinstance(custom.get("sbom"), dict):
            # its SBOM goes with it (withdrawing an SBOM alone is refused below)
            targets_md.signed.targets.pop(str(custom["sbom"].get("path")), None)
        for other, tf in list(targets_md.signed.targets.items()):
            if isinstance(tf.custom, dict) and tf.custom.get(TRANSFER_OF_KEY) == path:
                del targets_md.signed.targets[other]  # its compressed blob and deltas
        self._sign_targets(targets_md, now)

    def refresh(self, *, roles: Iterable[str] = ONLINE_ROLES, now: datetime | None = None) -> None:
        """Re-sign roles with new versions and expiries, before they expire.

        Local mode: any of targets, snapshot, timestamp. Server mode: targets only (the
        server re-signs snapshot and timestamp itself).

        Raises:
            OperatorError: snapshot or timestamp asked for in server mode, or an unknown
                role.
            KeyAccessError: a key cannot be unlocked (nothing was written).
        """
        now = now or datetime.now(UTC)
        roles = set(roles)
        unknown = roles - {"targets", *ONLINE_ROLES}
        if unknown:
            raise OperatorError(f"cannot refresh {', '.join(sorted(unknown))}")
        if self.server_signed and roles & set(ONLINE_ROLES):
            raise OperatorError(
                "the update server signs snapshot and timestamp of this repository and "
                "re-signs them before they expire; nothing to refresh here"
            )
        needed = set(self.signing_roles()) if "targets" in roles else set()
        if not self.server_signed:
            needed |= {"snapshot", "timestamp"} if "snapshot" in roles else {"timestamp"}
        self.unlock(sorted(needed & set(ROLE_ALGORITHMS)))
        targets_md: Metadata[Targets] = self._latest("targets", Targets)
        if "targets" in roles:
            self._sign_targets(targets_md, now)
        elif "snapshot" in roles:
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


def _check_version_rule(
    new: Version, security: bool, existing: Sequence[Release], hardware_ids: Sequence[str]
) -> bool:
    """Whether ``new`` may be published next to ``existing``; ``True`` for an older-line fix.

    A release is above every published one for its hardware ids, except a **security fix
    on an older line** (2.3.1 while 2.4.0 exists): a final ``security`` release whose
    line (same ``major.minor``) already has a release for each of those hardware ids, and
    which is above every release of its line. Never a duplicate version, never an older
    feature release or pre-release (ADR 0011, "A security fix on an older line").

    Raises:
        OperatorError: the version breaks the rule.
    """
    line = (new.major, new.minor)
    older_line = False
    for hw in hardware_ids:
        mine = [r.info.version for r in existing if hw in r.info.hardware_ids]
        if new in mine:
            raise OperatorError(f"version {new} is already published for hardware id {hw}")
        newest = max(mine, default=None)
        if newest is None or new > newest:
            continue
        own = [v for v in mine if (v.major, v.minor) == line]
        if not security or new.prerelease or not own or new < max(own):
            raise OperatorError(
                f"version {new} is not greater than published {newest} for hardware id {hw}"
                + (
                    f" (only a final security release above {max(own)} may fix its line)"
                    if own and new > max(own)
                    else ""
                )
            )
        older_line = True
    return older_line
