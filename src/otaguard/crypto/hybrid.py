"""The hybrid signature policy: which roles need a classical AND a post-quantum signature.

A TUF threshold counts signatures; it cannot say *which kinds*. With k-of-n signers
(ADR 0013) "threshold 2" no longer implies one Ed25519/ECDSA and one ML-DSA signature.
The policy therefore lives inside root, as a field of each role python-tuf keeps in
``Role.unrecognized_fields`` and signs with the rest of root::

    "roles": {"targets": {"keyids": [...], "threshold": 2, "x-otaguard-hybrid": true}}

so it cannot be stripped without breaking root's signatures. For a role marked hybrid,
metadata is accepted only if, **on top of python-tuf's threshold check**, the role's
keys give at least one valid classical and one valid ML-DSA signature over the exact
signed bytes (a key is of one kind only, so the two are distinct keys).

Rule for a new root (``N+1`` replacing ``N``): TUF requires a threshold of N's root keys
and of N+1's; here N+1 must also meet N's hybrid policy for ``root`` (by N's keys) and its
own (by its keys). So a root that drops the policy is accepted only if it is itself
signed hybrid by the previous root's keys: the people who set the policy remove it.

Pure: bytes and parsed roots in, ``None`` or :class:`HybridPolicyError` out. Callers run
it next to python-tuf's own check, never instead of it (see ADR 0014 for where).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from securesystemslib.exceptions import FormatError, UnverifiedSignatureError
from securesystemslib.exceptions import VerificationError as SslibVerificationError
from securesystemslib.signer import Key, Signature
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from otaguard.model.errors import HybridPolicyError, VerificationError

__all__ = [
    "CLASSICAL_SCHEMES",
    "HYBRID_FIELD",
    "POST_QUANTUM_SCHEMES",
    "check_hybrid",
    "check_hybrid_bytes",
    "check_root_update",
    "hybrid_roles",
    "is_hybrid",
    "key_kind",
    "mark_hybrid",
    "satisfiable",
]

#: the field on a root role that marks it hybrid (signed with root)
HYBRID_FIELD: Final = "x-otaguard-hybrid"
#: signature schemes that count as the classical half
CLASSICAL_SCHEMES: Final = frozenset({"ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384"})
#: signature schemes that count as the post-quantum half (FIPS 204 ML-DSA)
POST_QUANTUM_SCHEMES: Final = frozenset({"ml-dsa-44/1", "ml-dsa-65/1", "ml-dsa-87/1"})


def key_kind(key: Key) -> str | None:
    """``"classical"``, ``"ml-dsa"``, or ``None`` for a key that counts as neither."""
    if key.scheme in CLASSICAL_SCHEMES:
        return "classical"
    if key.scheme in POST_QUANTUM_SCHEMES:
        return "ml-dsa"
    return None


def is_hybrid(root: Root, role: str) -> bool:
    """Whether ``root`` marks ``role`` hybrid.

    Raises:
        HybridPolicyError: the field is there but not a boolean (fail closed: a policy
            that cannot be read is not silently off).
    """
    r = root.roles.get(role)
    if r is None:
        return False
    value = r.unrecognized_fields.get(HYBRID_FIELD, False)
    if not isinstance(value, bool):
        raise HybridPolicyError(f"root v{root.version}: {role}.{HYBRID_FIELD} is not true/false")
    return value


def hybrid_roles(root: Root) -> list[str]:
    """The roles ``root`` marks hybrid, sorted."""
    return sorted(name for name in root.roles if is_hybrid(root, name))


def satisfiable(root: Root, role: str) -> bool:
    """True when ``role`` has at least one classical and one ML-DSA key in ``root``."""
    kinds = {key_kind(root.keys[k]) for k in root.roles[role].keyids if k in root.keys}
    return {"classical", "ml-dsa"} <= kinds


def mark_hybrid(root: Root, role: str, *, hybrid: bool = True) -> None:
    """Set (or clear) the policy on ``role``; the caller signs root afterwards.

    Raises:
        VerificationError: ``hybrid`` and the role lacks a key of either kind (no
            metadata of that role could ever verify).
    """
    if hybrid and not satisfiable(root, role):
        raise VerificationError(
            f"{role} cannot be hybrid: it needs at least one Ed25519/ECDSA key and one ML-DSA key"
        )
    fields = root.roles[role].unrecognized_fields
    if hybrid:
        fields[HYBRID_FIELD] = True
    else:
        fields.pop(HYBRID_FIELD, None)


def _valid(key: Key, sig: Signature, data: bytes) -> bool:
    try:
        key.verify_signature(sig, data)
    except (UnverifiedSignatureError, SslibVerificationError, FormatError):
        return False
    return True


def check_hybrid(
    delegator: Root,
    role: str,
    signed_bytes: bytes,
    signatures: Mapping[str, Signature],
    *,
    what: str | None = None,
) -> None:
    """Refuse ``role`` metadata that ``delegator`` marks hybrid without both kinds.

    Args:
        delegator: the root whose policy and keys apply.
        role: the role the metadata is.
        signed_bytes: the exact bytes the signatures are over.
        signatures: by key id.
        what: how to name the metadata in the refusal (default: the role).

    Raises:
        HybridPolicyError: a hybrid role with no valid classical or no valid ML-DSA
            signature by its keys; names which kind is missing and who signed.
    """
    if not is_hybrid(delegator, role):
        return
    keyids = delegator.roles[role].keyids
    have: dict[str, list[str]] = {"classical": [], "ml-dsa": []}
    for keyid, sig in signatures.items():
        key = delegator.keys.get(keyid)
        if keyid not in keyids or key is None:
            continue
        kind = key_kind(key)
        if kind is not None and _valid(key, sig, signed_bytes):
            have[kind].append(keyid[:16])
    missing = [
        label
        for kind, label in (("classical", "classical (Ed25519/ECDSA)"), ("ml-dsa", "ML-DSA"))
        if not have[kind]
    ]
    if missing:
        raise HybridPolicyError(
            f"{what or role}: root v{delegator.version} marks {role} hybrid; no valid "
            f"{' and no valid '.join(missing)} signature by its keys "
            f"(valid classical: {', '.join(have['classical']) or 'none'}; "
            f"valid ML-DSA: {', '.join(have['ml-dsa']) or 'none'})"
        )


def _parse(data: bytes, what: str) -> Metadata[Any]:
    try:
        return Metadata.from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise VerificationError(f"{what}: not TUF metadata: {e}") from e


def check_hybrid_bytes(delegator: Root, role: str, data: bytes, *, what: str | None = None) -> None:
    """:func:`check_hybrid` over a metadata file's exact bytes.

    Raises:
        HybridPolicyError: as :func:`check_hybrid`.
        VerificationError: ``data`` is not metadata.
    """
    if not is_hybrid(delegator, role):
        return
    md = _parse(data, what or role)
    check_hybrid(delegator, role, md.signed_bytes, md.signatures, what=what)


def check_root_update(trusted: Root, data: bytes, *, what: str | None = None) -> Root:
    """The hybrid rule for root ``N+1`` (``data``) replacing the trusted root ``N``.

    N+1 must meet N's policy for ``root`` by N's keys and its own by its keys (the TUF
    thresholds are python-tuf's to check). A root that drops the policy therefore needs
    a hybrid signature by the keys of the root that had it.

    Returns:
        The parsed new root (not otherwise verified).

    Raises:
        HybridPolicyError: either policy unmet.
        VerificationError: ``data`` is not root metadata.
    """
    md = _parse(data, what or "root")
    if not isinstance(md.signed, Root):
        raise VerificationError(f"{what or 'root'}: not root metadata")
    label = what or f"root v{md.signed.version}"
    check_hybrid(trusted, Root.type, md.signed_bytes, md.signatures, what=label)
    check_hybrid(md.signed, Root.type, md.signed_bytes, md.signatures, what=label)
    return md.signed
