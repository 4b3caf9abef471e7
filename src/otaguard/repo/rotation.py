"""Key rotation: a new root that adds and removes keys of one role, signed old AND new.

Every role's keys are listed in root, so every rotation is a new root version (TUF
§5.3.4): it must be signed by a threshold of the current root's root keys and of its
own, and (ADR 0014) meet both roots' hybrid policy. Two ways to get there:

* **single machine** (:func:`rotate`): every root key needed is on this machine (files or
  a token); the new root is staged, signed by each of them and published at once;
* **ceremony** (:func:`stage_rotation`): the new root goes into a signing request
  (``role: root``) naming the keys added and removed; each signer adds a signature with
  ``otaguard sign``; ``release publish`` counts them against both thresholds and names
  who is missing (:func:`otaguard.repo.ceremony.publish_request`).

What the rotated role's metadata needs afterwards is in ADR 0014: targets is re-signed
by its new keys; in local mode snapshot and timestamp are re-signed at once by their new
keys (so devices drop a timestamp/snapshot signed by a removed key: fast-forward
recovery); in server mode the update server is restarted with its new online key.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization.json import CanonicalJSONSerializer

from otaguard.crypto.hybrid import is_hybrid, mark_hybrid, satisfiable
from otaguard.crypto.signers import KeySecrets, file_uri_path, resolve_key_uri
from otaguard.model.errors import OperatorError
from otaguard.repo.ceremony import (
    REQUEST_FORMAT,
    SigningRequest,
    next_root,
    publish_request,
    sign_request,
    stage_root_change,
    summarize,
)
from otaguard.repo.keyspec import MAX_ROLE_KEYS, algorithm_of
from otaguard.repo.repository import ONLINE_ROLES, SERVER_KEY_NAME, ImageRepository, KeyRef

__all__ = [
    "MIN_KEYID_PREFIX",
    "NewKey",
    "rotate",
    "rotated_root",
    "stage_rotation",
    "stage_targets",
]

logger = logging.getLogger(__name__)

#: a key id prefix shorter than this could name several keys by accident
MIN_KEYID_PREFIX = 8


@dataclass(frozen=True)
class NewKey:
    """A key to add: its public key and where its private half lives.

    Attributes:
        public_key: the key root will list.
        uri: its signer URI; ``None`` for a key the update server holds (its online or
            director key, given by its ``.pub.json``).
    """

    public_key: Key
    uri: str | None


def _resolve(role_keyids: Sequence[str], token: str, names: dict[str, str]) -> str:
    """The key id ``token`` names among ``role_keyids``: a key name, id, or id prefix."""
    by_name = [k for k in role_keyids if names.get(k) == token]
    if by_name:
        return by_name[0]
    if len(token) < MIN_KEYID_PREFIX:
        raise OperatorError(f"{token!r}: give a key name, or at least {MIN_KEYID_PREFIX} hex")
    found = [k for k in role_keyids if k.startswith(token)]
    if len(found) != 1:
        raise OperatorError(
            f"{token!r} names {'no' if not found else 'more than one'} key of this role "
            f"({', '.join(names.get(k, k[:16]) for k in role_keyids)})"
        )
    return found[0]


def rotated_root(
    current: Root,
    *,
    role: str,
    add: Sequence[Key],
    remove: Sequence[str],
    threshold: int | None,
    names: dict[str, str] | None = None,
    hybrid: bool | None = None,
) -> Root:
    """The next root with ``role``'s keys changed (pure; expiry left to the caller).

    A role marked hybrid stays hybrid unless ``hybrid`` is false, so the change must leave
    it a classical and an ML-DSA key.

    Args:
        current: the newest root.
        role: ``root``, ``targets``, ``snapshot`` or ``timestamp``.
        add: keys to add to the role.
        remove: keys to remove: key names (via ``names``), key ids or id prefixes.
        threshold: the role's new threshold; default: unchanged.
        names: key id to key name, to name keys in ``remove`` and in messages.
        hybrid: set (``True``) or clear (``False``) the role's hybrid policy; ``None``
            keeps it. Clearing it is a root devices accept only when signed hybrid by
            the current root's keys (ADR 0014).

    Raises:
        OperatorError: unknown role or key, nothing changes, a key added twice, a
            threshold out of range, or a hybrid role left without both kinds of key.
    """
    names = names or {}
    if role not in current.roles:
        raise OperatorError(f"no role {role!r} in root")
    new = next_root(current)
    keyids = list(new.roles[role].keyids)
    drop = {_resolve(keyids, token, names) for token in remove}
    for key in add:
        if key.keyid in keyids:
            raise OperatorError(
                f"key {names.get(key.keyid, key.keyid[:16])} is already a {role} key"
            )
    was_hybrid = is_hybrid(current, role)
    want_hybrid = was_hybrid if hybrid is None else hybrid
    if (
        not add
        and not drop
        and threshold in (None, new.roles[role].threshold)
        and want_hybrid == was_hybrid
    ):
        raise OperatorError(
            "nothing to rotate: add a key, remove a key, change the threshold or the policy"
        )
    for keyid in sorted(drop):
        new.revoke_key(keyid, role)  # the key leaves root if no other role uses it
    for key in add:
        new.add_key(key, role)
    count = len(new.roles[role].keyids)
    k = new.roles[role].threshold if threshold is None else threshold
    if not 1 <= count <= MAX_ROLE_KEYS:
        raise OperatorError(f"{role} would have {count} keys; a role has 1 to {MAX_ROLE_KEYS}")
    if not 1 <= k <= count:
        raise OperatorError(
            f"{role} would need {k} of {count} keys; give --threshold between 1 and {count}"
        )
    new.roles[role].threshold = k
    if want_hybrid and not satisfiable(new, role):
        raise OperatorError(
            f"{role} is hybrid: it would be left without an Ed25519/ECDSA or without an "
            "ML-DSA key; add one in the same rotation"
        )
    mark_hybrid(new, role, hybrid=want_hybrid)
    return new


def _names(repo: ImageRepository) -> dict[str, str]:
    return {
        r.keyid: r.name for role in ("root", "targets", *ONLINE_ROLES) for r in repo.key_refs(role)
    }


def _new_ref(repo: ImageRepository, role: str, key: NewKey, taken: set[str]) -> KeyRef:
    """Name an added key: a file key by its file name (as ``sign`` matches it), else
    role and algorithm, numbered; a name is never reused."""
    alg = algorithm_of(key.public_key)
    path = file_uri_path(key.uri) if key.uri else None
    if path is not None:
        name = path.stem
        if name in taken:
            raise OperatorError(f"a key named {name} exists already; name the file otherwise")
    else:
        # the update server's key keeps its name's prefix; others are role and algorithm
        base, n = (SERVER_KEY_NAME if key.uri is None else f"{role}-{alg}"), 1
        name = base
        while name in taken:
            n += 1
            name = f"{base}-{n}"
    taken.add(name)
    return KeyRef(name, role, alg, key.public_key.keyid, key.uri)


def _roles_for(repo: ImageRepository, role: str) -> tuple[str, ...]:
    # The update server holds one online key for snapshot and timestamp alike.
    if role in ONLINE_ROLES and repo.server_signed:
        return ONLINE_ROLES
    return (role,)


def stage_rotation(
    repo: ImageRepository,
    *,
    role: str,
    add: Sequence[NewKey],
    remove: Sequence[str],
    threshold: int | None,
    out: Path,
    expiry_days: int | None = None,
    hybrid: bool | None = None,
    now: datetime | None = None,
) -> SigningRequest:
    """Write the signing request for a root that rotates ``role``'s keys (the ceremony).

    In server mode snapshot and timestamp rotate together (one online key signs both).
    The added keys' names and URIs are recorded in the repository config, adopted when
    the root is published.

    Raises:
        OperatorError: as :func:`rotated_root`; ``out`` exists; a key without URI for an
            offline role.
    """
    now = now or datetime.now(UTC)
    names = _names(repo)
    for key in add:
        if key.uri is None and (role not in ONLINE_ROLES or not repo.server_signed):
            raise OperatorError(
                f"a {role} key needs a signer URI (hsm:…, encfile:PATH); only the update "
                "server's online key is given by its public key alone"
            )
    current = repo.latest_root()
    new = current
    for r in _roles_for(repo, role):
        changed = rotated_root(
            new, role=r, add=[k.public_key for k in add], remove=remove,
            threshold=threshold, names=names, hybrid=hybrid,
        )  # fmt: skip
        changed.version = current.version + 1
        new = changed
    new.expires = repo.root_expiry(now, days=expiry_days)
    taken = repo.key_names_in_use()
    roles = _roles_for(repo, role)
    # one name per key, even when it serves two roles
    by_key = {k.public_key.keyid: _new_ref(repo, roles[0], k, taken).name for k in add}
    refs = [
        KeyRef(by_key[k.public_key.keyid], r, algorithm_of(k.public_key), k.public_key.keyid, k.uri)
        for r in roles
        for k in add
    ]
    request = stage_root_change(repo, new, out=out, names={**names, **by_key})
    repo.stage_key_refs(refs)
    logger.info("staged root %s rotating %s keys in %s", new.version, role, out)
    return request


def rotate(
    repo: ImageRepository,
    *,
    role: str,
    add: Sequence[NewKey],
    remove: Sequence[str],
    threshold: int | None,
    secrets: KeySecrets,
    expiry_days: int | None = None,
    hybrid: bool | None = None,
    now: datetime | None = None,
) -> tuple[Metadata[Any], list[str]]:
    """Rotate ``role``'s keys on one machine: stage, sign by every root key here, publish.

    The current root's root keys and the new root's (all found through the repository
    config and its keys directory) sign; then targets is re-signed by its new keys when
    the rotation was of targets and its keys are here.

    Returns:
        The published root, and roles that still need signing by their new keys.

    Raises:
        OperatorError: as :func:`stage_rotation`, or below a threshold (use the ceremony).
        KeyAccessError / ConfigError: a root key cannot be unlocked.
    """
    now = now or datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="otaguard-rotate-") as tmp:
        request = stage_rotation(
            repo, role=role, add=add, remove=remove, threshold=threshold,
            out=Path(tmp) / "root.request.json", expiry_days=expiry_days, hybrid=hybrid,
            now=now,
        )  # fmt: skip
    uris = {r.keyid: r for r in repo.key_refs("root")}
    pending = repo.config.get("pending_keys", {})
    for key in request.keys:
        ref = uris.get(key.keyid)
        uri = ref.uri if ref is not None else (pending.get(key.keyid) or {}).get("uri")
        if uri is None:
            continue
        sign_request(
            request, uri=resolve_key_uri(uri, repo.keys_dir), secrets=secrets, key_name=key.name
        )
    # this function re-signs targets itself below, so the publish step's advice is not given
    md = publish_request(repo, request, now=now, warn_stale=role != "targets")
    stale: list[str] = []
    if role == "targets":
        # Devices would refuse targets signed only by removed keys: sign it anew now.
        try:
            repo.refresh(roles=["targets"], now=now)
        except OperatorError as e:
            logger.warning("targets not re-signed by its new keys: %s", e)
            stale.append("targets")
    return md, stale


def stage_targets(
    repo: ImageRepository, *, out: Path, now: datetime | None = None
) -> SigningRequest:
    """A signing request for the current targets again: next version, new expiry, same
    images (no key used). After a targets rotation by ceremony, the new keys sign it (old
    signatures may no longer meet the new root's threshold or hybrid policy); also the way
    to extend targets' life by ceremony.

    Raises:
        OperatorError: ``out`` exists.
    """
    now = now or datetime.now(UTC)
    if Path(out).exists():
        raise OperatorError(f"{out} exists; refusing to overwrite a signing request")
    serializer = CanonicalJSONSerializer()
    current = repo.latest_targets()
    base_bytes = serializer.serialize(current)
    new = Targets.from_dict(json.loads(base_bytes, strict=False))
    new.version += 1
    new.expires = repo.targets_expiry(now)
    root = repo.latest_root()
    names = {ref.keyid: ref.name for ref in repo.key_refs("targets")}
    doc = {
        "otaguard_signing_request": REQUEST_FORMAT,
        "role": "targets",
        "root_version": root.version,
        "signed": base64.b64encode(serializer.serialize(new)).decode("ascii"),
        "base": base64.b64encode(base_bytes).decode("ascii"),
        "threshold": root.roles["targets"].threshold,
        "keys": [
            {"name": names.get(k, k[:16]), "keyid": k, "public": root.keys[k].to_dict()}
            for k in root.roles["targets"].keyids
        ],
        "signatures": [],
        "summary": summarize(new, current),
    }
    request = SigningRequest(doc)
    request.save(out)
    logger.info("staged targets version %s (re-signing) in %s", new.version, out)
    return request
