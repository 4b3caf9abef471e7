"""The director repository's root: offline keys that say which online key may instruct devices.

Uptane splits the update server in two. The image repository (:mod:`.repository`) says
*what exists* (offline-signed targets); the director says *what this device installs
now*, signed online, per device, per check-in. The director's root is made here, on the
offline signing machine, like the image repository's::

    DIRECTOR_DIR/                 public; devices get metadata/root.json at the factory
      otaguard-director.json      key ids and signer URIs (no private material)
      metadata/1.root.json        signed root (and root.json, the newest)
    KEYS_DIR/ (mode 0700)         director-root-ed25519.pem, director-root-ml-dsa-65.pem

Root is hybrid by default (an Ed25519 and an ML-DSA-65 key, threshold 2), offline. The
``targets`` role names the update server's director key (``DATA/director-key.pub.json``)
alone, threshold 1: the server signs each device's instruction with it. TUF's root needs
``snapshot`` and ``timestamp`` roles too; they name the same online key and are never
used: the nonce of the device's own check-in, carried in the signed instruction, gives
the freshness a timestamp would (ADR 0008).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Role, Root

from otaguard._fs import atomic_write_bytes, atomic_write_json
from otaguard.crypto.hybrid import check_root_update, mark_hybrid
from otaguard.crypto.keys import generate_signer, write_private_key
from otaguard.crypto.signers import (
    ENCRYPTED_FILE_SCHEME,
    PLAINTEXT_FILE_SCHEME,
    KeySecrets,
    load_signer,
    resolve_key_uri,
)
from otaguard.model.errors import ConfigError, OperatorError, VerificationError
from otaguard.model.unsafe import Unsafe
from otaguard.repo.keyspec import algorithm_of
from otaguard.repo.repository import (
    KEYS_CONFIG_NAME,
    MAX_EXPIRY_DAYS,
    ROLE_ALGORITHMS,
    _check_init_dirs,
    _check_secrets,
    _new_secrets,
)
from otaguard.repo.rotation import NewKey, rotated_root

__all__ = [
    "DIRECTOR_CONFIG_NAME",
    "DIRECTOR_KEY_PREFIX",
    "DIRECTOR_ROOT_EXPIRY_DAYS",
    "init_director",
    "rotate_director",
]

logger = logging.getLogger(__name__)

DIRECTOR_CONFIG_NAME: Final = "otaguard-director.json"
#: key names (passphrase prompts, ``OTAGUARD_KEY_PASSPHRASE_DIRECTOR_ROOT_*``): distinct
#: from the image repository's, so one offline machine may hold both
DIRECTOR_KEY_PREFIX: Final = "director-root"
#: like the image repository's root: a year, re-signed offline
DIRECTOR_ROOT_EXPIRY_DAYS: Final = 365


def init_director(
    director_dir: Path,
    *,
    keys_dir: Path,
    passphrases: KeySecrets,
    online_key: Key,
    root_expiry_days: int = DIRECTOR_ROOT_EXPIRY_DAYS,
    now: datetime | None = None,
) -> Path:
    """Create the director's offline root keys and its signed version-1 root.

    Args:
        director_dir: new or empty directory for the director's public metadata.
        keys_dir: new or empty directory for the private root keys, outside
            ``director_dir``.
        passphrases: the new passphrase of each key by name, or
            :attr:`Unsafe.PLAINTEXT_KEYS` for unencrypted development keys (warns).
        online_key: the update server's director key (``DATA/director-key.pub.json``),
            the one ``targets`` key (threshold 1).
        root_expiry_days: root's lifetime.
        now: reference time (tests).

    Returns:
        The path of ``metadata/root.json`` (what devices are provisioned with).

    Raises:
        OperatorError: a directory is not empty or nested in the other, or the expiry
            is invalid.
        KeyAccessError: a passphrase is empty or could not be asked.
    """
    director_dir, keys_dir = Path(director_dir), Path(keys_dir)
    _check_secrets(passphrases)
    _check_init_dirs(director_dir, keys_dir)
    if not 0 < root_expiry_days <= MAX_EXPIRY_DAYS:
        raise OperatorError(f"invalid expiry for the director root: {root_expiry_days} days")
    names = [f"{DIRECTOR_KEY_PREFIX}-{alg}" for alg in ROLE_ALGORITHMS["root"]]
    secrets = _new_secrets(names, passphrases)  # every passphrase before anything is written
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    signers: list[Signer] = []
    refs = []
    for name, alg in zip(names, ROLE_ALGORITHMS["root"], strict=True):
        signer = generate_signer(alg)
        write_private_key(keys_dir / f"{name}.pem", signer, passphrase=secrets[name])
        scheme = (
            PLAINTEXT_FILE_SCHEME
            if secrets[name] is Unsafe.PLAINTEXT_KEYS
            else ENCRYPTED_FILE_SCHEME
        )
        signers.append(signer)
        refs.append(
            {
                "name": name,
                "algorithm": alg,
                "keyid": signer.public_key.keyid,
                "uri": f"{scheme}:{name}.pem",
            }
        )
    atomic_write_json(
        keys_dir / KEYS_CONFIG_NAME,
        {"format": 1, "keys": {r["name"]: r["keyid"] for r in refs}},
        mode=0o600,
    )
    now = now or datetime.now(UTC)
    root = Root(
        expires=(now + timedelta(days=root_expiry_days)).replace(microsecond=0),
        consistent_snapshot=True,
    )
    root.roles[Root.type] = Role([s.public_key.keyid for s in signers], threshold=len(signers))
    for s in signers:
        root.add_key(s.public_key, Root.type)
    mark_hybrid(root, Root.type)  # an Ed25519 and an ML-DSA signature, always (ADR 0014)
    for role in ("targets", "snapshot", "timestamp"):
        root.roles[role] = Role([], threshold=1)
        root.add_key(online_key, role)
    md = Metadata(root)
    for s in signers:
        md.sign(s, append=True)
    data = md.to_bytes()
    meta = director_dir / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(meta / "1.root.json", data)
    atomic_write_bytes(meta / "root.json", data)
    atomic_write_json(
        director_dir / DIRECTOR_CONFIG_NAME,
        {
            "format": 1,
            "root_expiry_days": root_expiry_days,
            "online_key": online_key.keyid,
            "keys": refs,
        },
    )
    logger.info("initialised the director root in %s, keys in %s", director_dir, keys_dir)
    return meta / "root.json"


#: the director's online key signs targets and (unused) snapshot and timestamp alike
_ONLINE: Final = ("targets", "snapshot", "timestamp")


def _newest_root(meta: Path) -> Metadata[Root]:
    version = 1
    while (meta / f"{version + 1}.root.json").exists():
        version += 1
    try:
        md = Metadata[Root].from_file(str(meta / f"{version}.root.json"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the director root in {meta}: {e}") from e
    return md


def rotate_director(
    director_dir: Path,
    *,
    role: str,
    add: Sequence[NewKey],
    remove: Sequence[str],
    threshold: int | None,
    keys_dir: Path,
    passphrases: KeySecrets,
    now: datetime | None = None,
) -> Metadata[Root]:
    """Rotate the director root's keys (``root``) or the server's director key (``targets``).

    The next director root is signed by every root key of the current root and of the
    new one found in ``keys_dir`` (both thresholds, both hybrid policies, checked before
    it is written). The server serves it to devices as they check in; after a
    ``targets`` rotation restart the server with the new director key
    (``--director-key-uri``).

    Raises:
        OperatorError: as :func:`otaguard.repo.rotation.rotated_root`, a root key without
            a URI, or the new root is not signed as devices require.
        KeyAccessError: a key cannot be unlocked.
    """
    director_dir = Path(director_dir)
    now = now or datetime.now(UTC)
    _check_secrets(passphrases)
    path = director_dir / DIRECTOR_CONFIG_NAME
    try:
        config = json.loads(path.read_text())
        refs = list(config["keys"])
        names = {r["keyid"]: r["name"] for r in refs}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    names[str(config.get("online_key"))] = "director-online"
    if role not in ("root", "targets"):
        raise OperatorError("the director's roles to rotate are root and targets")
    if any((k.uri is None) != (role == "targets") for k in add):
        raise OperatorError(
            "a director root key needs a signer URI; the director targets key is the "
            "server's, given by its public key (DATA/director-key.pub.json)"
        )
    meta = director_dir / "metadata"
    current_md = _newest_root(meta)
    current = current_md.signed
    new = current
    for r in _ONLINE if role == "targets" else ("root",):
        new = rotated_root(
            new, role=r, add=[k.public_key for k in add], remove=remove,
            threshold=threshold, names=names,
        )  # fmt: skip
        new.version = current.version + 1
    new.expires = (now + timedelta(days=int(config["root_expiry_days"]))).replace(microsecond=0)
    added = {k.public_key.keyid: k for k in add}
    signing = [*current.roles["root"].keyids]
    signing += [k for k in new.roles["root"].keyids if k not in signing]
    md = Metadata(new)
    by_id = {r["keyid"]: r for r in refs}
    for keyid in signing:
        ref = by_id.get(keyid)
        uri = ref["uri"] if ref is not None else added[keyid].uri
        name = ref["name"] if ref is not None else f"{DIRECTOR_KEY_PREFIX}-{keyid[:8]}"
        if uri is None:
            continue
        md.sign(
            load_signer(
                resolve_key_uri(uri, keys_dir),
                {**current.keys, **new.keys}[keyid],
                name=name,
                secrets=passphrases,
            ),
            append=True,
        )
    data = md.to_bytes()
    try:  # what every device checks (agent/director.follow_director_root)
        current.verify_delegate("root", md.signed_bytes, md.signatures)
        new.verify_delegate("root", md.signed_bytes, md.signatures)
        check_root_update(current, data)
    except (UnsignedMetadataError, VerificationError) as e:
        raise OperatorError(f"the rotated director root would be refused by devices: {e}") from e
    atomic_write_bytes(meta / f"{new.version}.root.json", data)
    atomic_write_bytes(meta / "root.json", data)
    if role == "targets":
        config["online_key"] = new.roles["targets"].keyids[0]
    else:
        config["keys"] = [
            by_id.get(k)
            or {
                "name": f"{DIRECTOR_KEY_PREFIX}-{k[:8]}",
                "algorithm": algorithm_of(new.keys[k]),
                "keyid": k,
                "uri": added[k].uri,
            }
            for k in new.roles["root"].keyids
        ]
    atomic_write_json(path, config)
    logger.info("director root %s rotates %s keys", new.version, role)
    return md
