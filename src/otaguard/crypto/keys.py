"""Signing keys held in files, encrypted at rest.

Signing goes through securesystemslib's :class:`CryptoSigner`, so file keys share one
code path with HSM and KMS signers (``Signer.from_priv_key_uri``). Plaintext keys exist
for development only and warn on every use.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner, SSlibKey

from otaguard._fs import atomic_write_bytes
from otaguard.model.errors import ConfigError, InsecureModeWarning, KeyAccessError

__all__ = ["ALGORITHMS", "generate_signer", "load_signer", "warn_insecure", "write_private_key"]

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


def write_private_key(path: Path, signer: CryptoSigner, *, passphrase: bytes | None) -> None:
    """Write ``signer``'s private key as PKCS#8 PEM, mode 0600.

    Args:
        path: destination file.
        signer: the key to store.
        passphrase: encrypts the key; ``None`` writes plaintext (development only).
    """
    if passphrase is None:
        warn_insecure(f"writing plaintext private key {path}")
        enc: serialization.KeySerializationEncryption = serialization.NoEncryption()
    else:
        if not passphrase:
            raise KeyAccessError("an empty passphrase cannot protect a private key")
        enc = serialization.BestAvailableEncryption(passphrase)
    pem = signer._private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )
    atomic_write_bytes(path, pem, mode=0o600)


def load_signer(path: Path, *, algorithm: str, passphrase: bytes | None) -> CryptoSigner:
    """Load a private key file into a signer.

    Args:
        path: PKCS#8 PEM file written by :func:`write_private_key`.
        algorithm: expected algorithm; fixes the signature scheme.
        passphrase: decrypts the key; ``None`` only for plaintext development keys.

    Raises:
        ConfigError: the file is missing, unreadable, too large or not a key.
        KeyAccessError: the passphrase is wrong or missing.
    """
    try:
        st = os.stat(path)
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"key file {path} is too large to be a private key")
        pem = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror}") from e
    encrypted = b"ENCRYPTED PRIVATE KEY" in pem
    if encrypted and passphrase is None:
        raise KeyAccessError(f"key {path} is encrypted: set OTAGUARD_KEY_PASSPHRASE")
    if not encrypted:
        warn_insecure(f"using plaintext private key {path}")
    try:
        key = serialization.load_pem_private_key(pem, passphrase if encrypted else None)
    except ValueError as e:
        if encrypted:
            raise KeyAccessError(f"wrong passphrase for key {path}") from e
        raise ConfigError(f"{path} is not a valid private key") from e
    except TypeError as e:
        raise ConfigError(f"{path} is not a valid private key") from e
    try:
        public = SSlibKey.from_crypto(key.public_key(), scheme=ALGORITHMS[algorithm])
        return CryptoSigner(key, public)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path} does not hold an {algorithm} key") from e
