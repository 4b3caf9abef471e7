"""Creating signing keys and writing them to files, encrypted at rest.

Keys are *loaded* through signer URIs (:mod:`otaguard.crypto.signers`), so file keys
share one code path with HSM and KMS signers (``Signer.from_priv_key_uri``). Plaintext
key files exist for development only, are asked for by name
(:attr:`~otaguard.model.unsafe.Unsafe.PLAINTEXT_KEYS`) and warn on every use.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner

from otaguard._fs import atomic_write_bytes
from otaguard.model.errors import InsecureModeWarning, KeyAccessError
from otaguard.model.unsafe import Unsafe

__all__ = [
    "ALGORITHMS",
    "MAX_KEY_FILE_BYTES",
    "generate_signer",
    "warn_insecure",
    "write_private_key",
]

logger = logging.getLogger(__name__)

#: algorithm name -> securesystemslib scheme
ALGORITHMS: Final = {"ed25519": "ed25519", "ml-dsa-65": "ml-dsa-65/1"}
# A PEM private key is a few KiB (ML-DSA-65: ~5.5 KiB); refuse to parse anything huge.
MAX_KEY_FILE_BYTES: Final = 64 * 1024


def warn_insecure(what: str) -> None:
    """Warn, on every use, that a development-only insecure mode is in effect."""
    warnings.warn(f"INSECURE development mode: {what}", InsecureModeWarning, stacklevel=2)


def generate_signer(algorithm: str) -> CryptoSigner:
    """Generate a new key pair for ``algorithm`` (``ed25519`` or ``ml-dsa-65``)."""
    if algorithm == "ed25519":
        return CryptoSigner.generate_ed25519()
    if algorithm == "ml-dsa-65":
        return CryptoSigner.generate_mldsa(scheme=ALGORITHMS[algorithm])
    raise ValueError(f"unsupported algorithm {algorithm!r}; use one of {sorted(ALGORITHMS)}")


def write_private_key(
    path: Path,
    signer: CryptoSigner,
    *,
    passphrase: bytes | Literal[Unsafe.PLAINTEXT_KEYS],
) -> None:
    """Write ``signer``'s private key as PKCS#8 PEM, mode 0600, atomically.

    Args:
        path: destination file.
        signer: the key to store.
        passphrase: encrypts the key; :attr:`Unsafe.PLAINTEXT_KEYS` writes it unencrypted
            (development only, warns). There is no default: forgetting it is an error.

    Raises:
        KeyAccessError: the passphrase is empty or not bytes.
        OSError: the file cannot be written.
    """
    if passphrase is Unsafe.PLAINTEXT_KEYS:
        warn_insecure(f"writing plaintext private key {path}")
        enc: serialization.KeySerializationEncryption = serialization.NoEncryption()
    elif isinstance(passphrase, bytes) and passphrase:
        enc = serialization.BestAvailableEncryption(passphrase)
    else:
        raise KeyAccessError(f"an empty passphrase cannot protect private key {path}")
    pem = signer._private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )
    atomic_write_bytes(path, pem, mode=0o600)
