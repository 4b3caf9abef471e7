"""Signers addressed by URI, and public key files.

Every private key otaguard uses is named by a securesystemslib signer URI and loaded with
``Signer.from_priv_key_uri(uri, public_key, secrets_handler)``:

``encfile:<path>``
    a passphrase-encrypted PKCS#8 PEM file (the default for offline keys). The signer
    asks its secrets handler for ``"passphrase"``. Registered here in
    ``SIGNER_FOR_URI_SCHEME``.
``file2:<path>``
    securesystemslib's unencrypted PKCS#8 file: development keys, and the server's online
    key until it moves into an HSM. Loaded only when the caller names
    :attr:`~otaguard.model.unsafe.Unsafe.PLAINTEXT_KEYS`; warns on every use.
``hsm:<id>?label=<token>``
    a key in a PKCS#11 token, signed with securesystemslib's ``HSMSigner``
    (:mod:`otaguard.crypto.hsm`). The secrets source's answer for the key's name is the
    token's user PIN; it is asked once, and the PIN and the key are checked before
    anything is signed.
anything else (``gcpkms:``, ``awskms:``, ``azurekms:`` ...)
    passed to securesystemslib untouched (its extras and credentials decide).

The public key always comes from trusted metadata (the root), never from the private key
file, so a key file swapped for another key is refused (``KeyMismatchError``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.exceptions import Error as SSlibError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import (
    SIGNER_FOR_URI_SCHEME,
    CryptoSigner,
    Key,
    SecretsHandler,
    Signer,
    SSlibKey,
)

from otaguard._fs import atomic_write_json
from otaguard.crypto.hsm import HSM_SCHEME, check_hsm_key
from otaguard.crypto.keys import MAX_KEY_FILE_BYTES, warn_insecure
from otaguard.model.errors import ConfigError, KeyAccessError, OtaguardError
from otaguard.model.unsafe import Unsafe

__all__ = [
    "ENCRYPTED_FILE_SCHEME",
    "PASSPHRASE_SECRET",
    "PLAINTEXT_FILE_SCHEME",
    "EncryptedFileSigner",
    "KeySecrets",
    "Passphrases",
    "file_uri_path",
    "load_signer",
    "read_public_key",
    "resolve_key_uri",
    "write_public_key",
]

logger = logging.getLogger(__name__)

ENCRYPTED_FILE_SCHEME: Final = "encfile"
PLAINTEXT_FILE_SCHEME: Final = CryptoSigner.SCHEME  # "file2"
#: the secret name an encrypted file signer asks its secrets handler for
PASSPHRASE_SECRET: Final = "passphrase"  # noqa: S105 - the secret's name, not a secret
# A public key JSON is well under 4 KiB even for ML-DSA-65; bound what we parse.
MAX_PUBLIC_KEY_FILE_BYTES: Final = 64 * 1024

#: key name (e.g. ``targets-ed25519``) -> that key's passphrase
Passphrases = Callable[[str], bytes]
#: how private keys are unlocked: passphrases by key name, or plaintext files (development)
KeySecrets = Passphrases | Literal[Unsafe.PLAINTEXT_KEYS]


class _WrongPassphraseError(ValueError):
    """The passphrase does not decrypt the key file (or the file is damaged)."""


def _read_key_file(path: Path) -> bytes:
    """Read a private key file, refusing anything too large to be a key."""
    with path.open("rb") as f:
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is too large to be a private key")
    return data


class EncryptedFileSigner(CryptoSigner):
    """A :class:`CryptoSigner` whose key is a passphrase-encrypted PKCS#8 PEM file.

    URI: ``encfile:<path>``. The passphrase comes from the secrets handler, asked for
    ``"passphrase"``; it is never stored or logged.
    """

    SCHEME = ENCRYPTED_FILE_SCHEME

    @classmethod
    def from_priv_key_uri(
        cls,
        priv_key_uri: str,
        public_key: Key,
        secrets_handler: SecretsHandler | None = None,
    ) -> EncryptedFileSigner:
        """Load and decrypt the key file named by ``priv_key_uri``.

        Raises:
            ValueError: wrong URI, public key or file content, no secrets handler, or a
                wrong passphrase (``_WrongPassphraseError``).
            OSError: the file cannot be read.
            KeyMismatchError: the file holds another key than ``public_key``.
        """
        scheme, _, path = priv_key_uri.partition(":")
        if scheme != cls.SCHEME or not path:
            raise ValueError(f"EncryptedFileSigner does not support {priv_key_uri!r}")
        if not isinstance(public_key, SSlibKey):
            # securesystemslib's contract for a bad argument is ValueError
            raise ValueError(f"expected an SSlibKey for {priv_key_uri}")  # noqa: TRY004
        if secrets_handler is None:
            raise ValueError(f"{priv_key_uri} is encrypted and no passphrase source was given")
        pem = _read_key_file(Path(path))
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in pem:
            raise ValueError(f"{path} is not an encrypted PKCS#8 private key")
        # surrogateescape round-trips any passphrase bytes through the str-typed handler.
        passphrase = secrets_handler(PASSPHRASE_SECRET).encode("utf-8", "surrogateescape")
        try:
            private_key = load_pem_private_key(pem, passphrase)
        except ValueError as e:
            raise _WrongPassphraseError(path) from e
        return cls(private_key, public_key)


# The documented way to add a URI scheme: https://python-securesystemslib.readthedocs.io
SIGNER_FOR_URI_SCHEME[EncryptedFileSigner.SCHEME] = EncryptedFileSigner


def file_uri_path(uri: str) -> Path | None:
    """Return the file path of an ``encfile:`` or ``file2:`` URI, ``None`` for other schemes."""
    scheme, _, rest = uri.partition(":")
    if scheme in (ENCRYPTED_FILE_SCHEME, PLAINTEXT_FILE_SCHEME) and rest:
        return Path(rest)
    return None


def resolve_key_uri(uri: str, base: Path) -> str:
    """Make a file URI with a relative path absolute against ``base`` (the keys dir)."""
    path = file_uri_path(uri)
    if path is None or path.is_absolute():
        return uri
    scheme = uri.partition(":")[0]
    return f"{scheme}:{Path(base).absolute() / path}"


def _handler_for(passphrases: Passphrases, name: str) -> SecretsHandler:
    """A securesystemslib secrets handler answering with ``name``'s passphrase."""

    def handler(_secret: str) -> str:
        secret = passphrases(name)
        if not isinstance(secret, bytes) or not secret:
            raise KeyAccessError(f"empty passphrase for key {name}")
        return secret.decode("utf-8", "surrogateescape")

    return handler


def load_signer(
    uri: str,
    public_key: Key,
    *,
    name: str,
    secrets: KeySecrets | None,
    plaintext_warning: str | None = None,
) -> Signer:
    """Load the signer for ``uri`` and translate every failure into an otaguard error.

    Args:
        uri: absolute signer URI (see :func:`resolve_key_uri`).
        public_key: the key as trusted metadata lists it.
        name: key name for messages and for ``secrets`` (e.g. ``targets-ed25519``).
        secrets: passphrases by key name, :attr:`Unsafe.PLAINTEXT_KEYS` to allow plaintext
            ``file2:`` keys (development), or ``None`` when no secret can be given.
        plaintext_warning: what to warn about a plaintext key instead of the default.

    Raises:
        KeyAccessError: wrong or missing passphrase, or a plaintext key without the
            development option; names the key.
        ConfigError: the key file is missing, unreadable, not a key, or not the key the
            metadata lists.
    """
    scheme = uri.partition(":")[0]
    path = file_uri_path(uri)
    where = f"{name} ({path})" if path is not None else name
    handler: SecretsHandler | None = None
    if scheme == HSM_SCHEME:
        return _load_hsm_signer(uri, public_key, name=name, secrets=secrets)
    if scheme == PLAINTEXT_FILE_SCHEME:
        if secrets is not Unsafe.PLAINTEXT_KEYS:
            raise KeyAccessError(
                f"key {where} is an unencrypted development key; it is used only with "
                "the plaintext-keys development option (--insecure-plaintext-keys)"
            )
        warn_insecure(plaintext_warning or f"using plaintext private key {where}")
    elif callable(secrets):
        handler = _handler_for(secrets, name)
    elif scheme == ENCRYPTED_FILE_SCHEME:
        raise KeyAccessError(f"key {where} is encrypted: its passphrase is needed")
    if path is not None:
        try:
            if path.stat().st_size > MAX_KEY_FILE_BYTES:
                raise ConfigError(f"key file of {where} is too large to be a private key")
        except OSError as e:
            raise ConfigError(f"cannot read key {where}: {e.strerror}") from e
    try:
        return Signer.from_priv_key_uri(uri, public_key, handler)
    except OtaguardError:
        raise
    except _WrongPassphraseError as e:
        raise KeyAccessError(f"wrong passphrase for key {where}") from e
    except OSError as e:
        raise ConfigError(f"cannot read key {where}: {e.strerror or e}") from e
    except (ValueError, TypeError, UnsupportedAlgorithm, SSlibError) as e:
        # KeyMismatchError is an SSlibError: the file holds another key than the root lists.
        raise ConfigError(f"key {where} is unusable: {type(e).__name__}: {e}") from e


def _load_hsm_signer(uri: str, public_key: Key, *, name: str, secrets: KeySecrets | None) -> Signer:
    """An ``HSMSigner`` whose PIN was asked once and checked against the token."""
    if not callable(secrets):
        raise KeyAccessError(f"key {name} is in a PKCS#11 token ({uri}): its PIN is needed")
    if not isinstance(public_key, SSlibKey):
        raise ConfigError(f"key {name} ({uri}) is not an ECDSA key")
    pin_bytes = secrets(name)
    if not isinstance(pin_bytes, bytes) or not pin_bytes:
        raise KeyAccessError(f"empty PIN for key {name}")
    pin = pin_bytes.decode("utf-8", "surrogateescape")
    check_hsm_key(uri, public_key, pin=pin)
    try:
        return Signer.from_priv_key_uri(uri, public_key, lambda _secret: pin)
    except (ValueError, TypeError, SSlibError) as e:
        raise ConfigError(f"key {name} ({uri}) is unusable: {type(e).__name__}: {e}") from e


def _default_keyid(key_dict: dict[str, Any]) -> str:
    canonical = encode_canonical(
        {"keytype": key_dict["keytype"], "scheme": key_dict["scheme"], "keyval": key_dict["keyval"]}
    )
    assert isinstance(canonical, str)  # noqa: S101 - encode_canonical returns str without output
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_public_key(path: Path, key: Key) -> None:
    """Write ``key`` as TUF key JSON with its keyid (``{"keyid": ..., "keytype": ...}``)."""
    atomic_write_json(path, {"keyid": key.keyid, **key.to_dict()})


def read_public_key(path: Path) -> Key:
    """Read a public key file written by :func:`write_public_key`.

    Raises:
        ConfigError: the file is unreadable, not a public key, holds private material, or
            its keyid is not the key's default keyid (a damaged or edited file).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PUBLIC_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read public key file {path}: {e.strerror}") from e
    if len(raw) > MAX_PUBLIC_KEY_FILE_BYTES or b"PRIVATE KEY" in raw:
        raise ConfigError(f"{path} is not a public key file")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        keyid = data.pop("keyid")
        if not isinstance(keyid, str):
            raise TypeError("keyid is not a string")
        if "private" in data.get("keyval", {}):
            raise ConfigError(f"{path} holds a private key; give the public key file")
        key = Key.from_dict(keyid, data)
        expected = _default_keyid(key.to_dict())
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, SSlibError) as e:
        raise ConfigError(f"{path} is not a public key file: {e}") from e
    if keyid != expected:
        raise ConfigError(f"{path}: keyid {keyid[:16]}… does not match the key it holds")
    return key
