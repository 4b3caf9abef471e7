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

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from securesystemslib.signer import Key, Signer
from tuf.api.metadata import Metadata, Role, Root

from otaguard._fs import atomic_write_bytes, atomic_write_json
from otaguard.crypto.keys import generate_signer, write_private_key
from otaguard.crypto.signers import ENCRYPTED_FILE_SCHEME, PLAINTEXT_FILE_SCHEME, KeySecrets
from otaguard.model.errors import OperatorError
from otaguard.model.unsafe import Unsafe
from otaguard.repo.repository import (
    KEYS_CONFIG_NAME,
    MAX_EXPIRY_DAYS,
    ROLE_ALGORITHMS,
    _check_init_dirs,
    _check_secrets,
    _new_secrets,
)

__all__ = [
    "DIRECTOR_CONFIG_NAME",
    "DIRECTOR_KEY_PREFIX",
    "DIRECTOR_ROOT_EXPIRY_DAYS",
    "init_director",
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
