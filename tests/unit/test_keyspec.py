"""k-of-n key policies for the offline roles: validated when made, named predictably."""

from __future__ import annotations

import pytest
from securesystemslib.signer import CryptoSigner

from otaguard.model.errors import OperatorError
from otaguard.repo.keyspec import MAX_ROLE_KEYS, ExternalKey, RoleKeySpec, key_names


def _ecdsa() -> ExternalKey:
    signer = CryptoSigner.generate_ecdsa()
    return ExternalKey("hsm:1?label=t", signer.public_key)


def test_default_is_the_hybrid_pair_all_signing() -> None:
    spec = RoleKeySpec.default("targets")
    assert (spec.count, spec.threshold, spec.generated) == (2, 2, 2)
    assert key_names("targets", spec) == (
        [("targets-ed25519", "ed25519"), ("targets-ml-dsa-65", "ml-dsa-65")],
        [],
    )


def test_generated_keys_alternate_and_external_keys_are_named_by_algorithm() -> None:
    spec = RoleKeySpec(5, 3, (_ecdsa(), _ecdsa()))
    generated, external = key_names("root", spec)
    assert generated == [
        ("root-ed25519", "ed25519"),
        ("root-ml-dsa-65", "ml-dsa-65"),
        ("root-ed25519-2", "ed25519"),
    ]
    assert external == ["root-ecdsa-p256", "root-ecdsa-p256-2"]


@pytest.mark.parametrize(
    ("count", "threshold", "external", "message"),
    [
        (3, 4, 0, "threshold 4 is not between 1 and the 3 keys"),
        (3, 0, 0, "threshold 0 is not between 1 and the 3 keys"),
        (0, 0, 0, f"a role has 1 to {MAX_ROLE_KEYS} keys, not 0"),
        (MAX_ROLE_KEYS + 1, 1, 0, f"a role has 1 to {MAX_ROLE_KEYS} keys"),
        (1, 1, 2, "2 keys given by URI but the role has 1 keys"),
    ],
)
def test_invalid_policies_are_refused(
    count: int, threshold: int, external: int, message: str
) -> None:
    with pytest.raises(OperatorError, match=message):
        RoleKeySpec(count, threshold, tuple(_ecdsa() for _ in range(external)))


def test_the_same_external_key_twice_is_refused() -> None:
    key = _ecdsa()
    with pytest.raises(OperatorError, match="the same key is given twice"):
        RoleKeySpec(3, 2, (key, ExternalKey("hsm:2?label=t", key.public_key)))
