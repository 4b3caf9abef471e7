"""How many keys an offline role has, how many must sign, and which live elsewhere.

``repo init`` makes each offline role (root, targets) ``count`` keys with a
``threshold``: some are keys it generates into encrypted files (algorithms alternating
Ed25519, ML-DSA-65, so the default of two is the hybrid pair), the others are keys that
already exist by URI -- in a PKCS#11 token (``hsm:``), a cloud KMS, or another signer's
encrypted file -- given with their public key. The default (two generated keys,
threshold 2) is the hybrid policy of ADR 0002; a k-of-n policy is ADR 0013.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from securesystemslib.signer import Key

from otaguard.model.errors import OperatorError

__all__ = [
    "MAX_ROLE_KEYS",
    "ROLE_ALGORITHMS",
    "ExternalKey",
    "RoleKeySpec",
    "algorithm_of",
    "key_names",
]

# Offline roles are hybrid by default: a classical and a post-quantum key, threshold = both.
ROLE_ALGORITHMS: Final = {
    "root": ("ed25519", "ml-dsa-65"),
    "targets": ("ed25519", "ml-dsa-65"),
    "snapshot": ("ed25519",),
    "timestamp": ("ed25519",),
}
# A signing ceremony gathers a handful of people; more keys than this is a mistake, and
# every device verifies each signature of a role (ML-DSA-65 signatures are 3.3 kB each).
MAX_ROLE_KEYS: Final = 16
#: securesystemslib scheme -> the algorithm name otaguard records and names keys by
_ALGORITHM_OF_SCHEME: Final = {
    "ed25519": "ed25519",
    "ml-dsa-65/1": "ml-dsa-65",
    "ecdsa-sha2-nistp256": "ecdsa-p256",
    "ecdsa-sha2-nistp384": "ecdsa-p384",
}


def algorithm_of(key: Key) -> str:
    """otaguard's name of ``key``'s algorithm (``ecdsa-p256``), else its scheme."""
    return _ALGORITHM_OF_SCHEME.get(key.scheme, key.scheme.replace("/", "-"))


@dataclass(frozen=True)
class ExternalKey:
    """A key ``repo init`` does not create: its signer URI and its public key."""

    uri: str
    public_key: Key


@dataclass(frozen=True)
class RoleKeySpec:
    """``threshold`` of ``count`` keys, ``external`` among them, the rest generated.

    Raises:
        OperatorError: not ``1 <= threshold <= count <= MAX_ROLE_KEYS``, more external keys
            than ``count``, or one external key given twice.
    """

    count: int
    threshold: int
    external: tuple[ExternalKey, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_ROLE_KEYS:
            raise OperatorError(f"a role has 1 to {MAX_ROLE_KEYS} keys, not {self.count}")
        if not 1 <= self.threshold <= self.count:
            raise OperatorError(
                f"threshold {self.threshold} is not between 1 and the {self.count} keys"
            )
        if len(self.external) > self.count:
            raise OperatorError(
                f"{len(self.external)} keys given by URI but the role has {self.count} keys"
            )
        keyids = [k.public_key.keyid for k in self.external]
        if len(set(keyids)) != len(keyids):
            raise OperatorError("the same key is given twice")

    @classmethod
    def default(cls, role: str) -> RoleKeySpec:
        """The hybrid default: every algorithm of the role once, all must sign."""
        n = len(ROLE_ALGORITHMS[role])
        return cls(n, n)

    @property
    def generated(self) -> int:
        """How many keys ``repo init`` generates."""
        return self.count - len(self.external)


def _unique(role: str, algorithms: Sequence[str]) -> Iterator[str]:
    seen: dict[str, int] = {}
    for alg in algorithms:
        seen[alg] = seen.get(alg, 0) + 1
        yield f"{role}-{alg}" if seen[alg] == 1 else f"{role}-{alg}-{seen[alg]}"


def key_names(role: str, spec: RoleKeySpec) -> tuple[list[tuple[str, str]], list[str]]:
    """Names of the generated keys (with algorithm) and of the external keys.

    Generated keys alternate the role's algorithms (``targets-ed25519``,
    ``targets-ml-dsa-65``, ``targets-ed25519-2`` …); an external key is named by its
    algorithm too (``targets-ecdsa-p256``), numbered if needed.
    """
    algs = ROLE_ALGORITHMS[role]
    generated = [algs[i % len(algs)] for i in range(spec.generated)]
    external = [algorithm_of(k.public_key) for k in spec.external]
    names = list(_unique(role, [*generated, *external]))
    return list(zip(names[: len(generated)], generated, strict=True)), names[len(generated) :]
