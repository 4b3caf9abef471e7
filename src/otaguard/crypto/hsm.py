"""Keys in a PKCS#11 token (an HSM, a smart card, SoftHSM2 in tests): ``hsm:`` URIs.

Signing goes through securesystemslib's ``HSMSigner`` (``Signer.from_priv_key_uri``), like
every other key; this module adds what it lacks: creating a key pair *inside* the token
(the private key is generated there, ``CKA_SENSITIVE`` and not extractable, so it never
exists anywhere else), reading a key's public half, listing a token's keys, and checking
a PIN and a key before anything is signed (``HSMSigner`` logs in only when it signs).

URI: ``hsm:<id>?label=<token label>`` -- ``id`` is the key's ``CKA_ID`` as an integer (the
form ``HSMSigner`` reads), the label picks the token. The PKCS#11 module is named by the
``PYKCS11LIB`` environment variable (securesystemslib's setting), e.g.
``/usr/lib/softhsm/libsofthsm2.so``. The PIN comes from the caller's secrets source; it is
never stored or logged.

``HSMSigner`` signs ECDSA P-256 and P-384 only. ML-DSA keys stay in encrypted files until
tokens implement it (PKCS#11 3.2 defines ``CKM_ML_DSA``; SoftHSM2 2.6 and python-pkcs11 do
not): see ADR 0013.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib import parse

from securesystemslib.signer import HSMSigner, SSlibKey

from otaguard.model.errors import ConfigError, KeyAccessError, OperatorError

__all__ = [
    "HSM_ALGORITHMS",
    "HSM_SCHEME",
    "PKCS11_MODULE_ENV",
    "HsmKey",
    "check_hsm_key",
    "generate_hsm_key",
    "hsm_public_key",
    "hsm_uri",
    "is_hsm_uri",
    "list_hsm_keys",
    "parse_hsm_uri",
    "pkcs11_module",
]

logger = logging.getLogger(__name__)

HSM_SCHEME: Final = HSMSigner.SCHEME  # "hsm"
#: securesystemslib's setting naming the PKCS#11 module (a shared library)
PKCS11_MODULE_ENV: Final = "PYKCS11LIB"
#: otaguard algorithm name -> named curve; what HSMSigner can sign with
HSM_ALGORITHMS: Final = {"ecdsa-p256": "secp256r1", "ecdsa-p384": "secp384r1"}
# CKA_ID is an integer in the URI; a token holds a handful of keys, not millions.
MAX_HSM_KEY_ID: Final = 2**31 - 1
# A token label is at most 32 bytes (CK_TOKEN_INFO.label).
MAX_TOKEN_LABEL: Final = 32

#: the PIN of a token, asked for by token label
PinSource = Callable[[str], str]


@dataclass(frozen=True)
class HsmKey:
    """One key pair in a token: its URI, public key and PKCS#11 label."""

    uri: str
    public_key: SSlibKey
    label: str


def is_hsm_uri(uri: str) -> bool:
    """True for an ``hsm:`` signer URI."""
    return uri.partition(":")[0] == HSM_SCHEME


def hsm_uri(key_id: int, token_label: str) -> str:
    """The URI of key ``key_id`` (``CKA_ID``) in the token labelled ``token_label``."""
    return f"{HSM_SCHEME}:{key_id}?{parse.urlencode({'label': token_label})}"


def parse_hsm_uri(uri: str) -> tuple[int, str | None]:
    """Return ``(CKA_ID, token label or None)`` of an ``hsm:`` URI.

    Raises:
        OperatorError: not an ``hsm:`` URI, or its key id is not a small positive integer.
    """
    parsed = parse.urlparse(uri)
    if parsed.scheme != HSM_SCHEME:
        raise OperatorError(f"{uri!r} is not an hsm: URI")
    path = parsed.path or str(HSMSigner.SCHEME_KEYID)
    if not path.isdigit() or not 0 < int(path) <= MAX_HSM_KEY_ID:
        raise OperatorError(f"{uri!r}: the key id after 'hsm:' must be a positive integer")
    label = dict(parse.parse_qsl(parsed.query)).get("label")
    if label is not None and not 0 < len(label.encode()) <= MAX_TOKEN_LABEL:
        raise OperatorError(f"{uri!r}: a token label is 1 to {MAX_TOKEN_LABEL} bytes")
    return int(path), label


def pkcs11_module() -> str:
    """The PKCS#11 module ``PYKCS11LIB`` names.

    Raises:
        ConfigError: unset, or not a file.
    """
    path = os.environ.get(PKCS11_MODULE_ENV, "")
    if not path:
        raise ConfigError(
            f"set {PKCS11_MODULE_ENV} to the token's PKCS#11 module "
            "(e.g. /usr/lib/softhsm/libsofthsm2.so) to use hsm: keys"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"{PKCS11_MODULE_ENV}={path} is not a file")
    return path


def _pkcs11() -> Any:
    """The python-pkcs11 package (imported only when a token is used)."""
    import pkcs11

    return pkcs11


def _token(token_label: str | None) -> Any:
    pkcs11 = _pkcs11()
    from pkcs11.exceptions import MultipleTokensReturned, NoSuchToken, PKCS11Error

    try:
        lib = pkcs11.lib(pkcs11_module())
        return lib.get_token(
            token_label=token_label, token_flags=pkcs11.TokenFlag.TOKEN_INITIALIZED
        )
    except NoSuchToken as e:
        raise ConfigError(f"no PKCS#11 token labelled {token_label!r}") from e
    except MultipleTokensReturned as e:
        raise ConfigError("several PKCS#11 tokens: name one with ?label=… in the URI") from e
    except (PKCS11Error, RuntimeError, OSError) as e:
        raise ConfigError(f"cannot open the PKCS#11 module: {type(e).__name__}: {e}") from e


def _open(token: Any, pin: str, *, rw: bool = False) -> Any:
    from pkcs11.exceptions import PinIncorrect, PinLenRange, PinLocked, PKCS11Error

    try:
        return token.open(rw=rw, user_pin=pin)
    except (PinIncorrect, PinLenRange) as e:
        raise KeyAccessError(f"wrong PIN for token {token.label}") from e
    except PinLocked as e:
        raise KeyAccessError(f"the user PIN of token {token.label} is locked") from e
    except PKCS11Error as e:
        raise KeyAccessError(f"cannot log in to token {token.label}: {type(e).__name__}") from e


def _public_from_session(session: Any, key_id: int, uri: str) -> SSlibKey:
    try:
        pub = HSMSigner._find_pub_key(session, key_id)
    except ValueError as e:
        raise ConfigError(f"{uri}: {e}") from e
    curve = {"secp256r1": "ecdsa-sha2-nistp256", "secp384r1": "ecdsa-sha2-nistp384"}
    scheme = curve.get(pub.curve.name)
    if scheme is None:
        raise ConfigError(f"{uri}: curve {pub.curve.name} is not supported (P-256, P-384)")
    return SSlibKey.from_crypto(pub, scheme=scheme)


def _label(token: Any, uri: str) -> str:
    """The token's label, refusing a URI without one when it matters."""
    label = str(token.label).strip()
    if not label:
        raise ConfigError(f"{uri}: the token has no label")
    return label


def generate_hsm_key(
    *, token_label: str, pin: str, algorithm: str, key_label: str, key_id: int | None = None
) -> HsmKey:
    """Create a key pair inside the token; the private key never leaves it.

    Args:
        token_label: the token (``softhsm2-util --init-token --label …``).
        pin: its user PIN.
        algorithm: ``ecdsa-p256`` or ``ecdsa-p384`` (:data:`HSM_ALGORITHMS`).
        key_label: ``CKA_LABEL`` of both halves (e.g. ``targets-hsm``).
        key_id: ``CKA_ID``; default the smallest id not used in the token.

    Raises:
        OperatorError: unsupported algorithm, or ``key_id`` already used (never overwritten).
        KeyAccessError: wrong PIN.
        ConfigError: no such token, or the module cannot be loaded.
    """
    curve = HSM_ALGORITHMS.get(algorithm)
    if curve is None:
        raise OperatorError(
            f"a token key is one of {', '.join(HSM_ALGORITHMS)} (HSMSigner); "
            f"{algorithm} keys stay in encrypted files"
        )
    pkcs11 = _pkcs11()
    from pkcs11.exceptions import PKCS11Error
    from pkcs11.util import biginteger
    from pkcs11.util.ec import encode_named_curve_parameters

    token = _token(token_label)
    with _open(token, pin, rw=True) as session:
        used = {
            int.from_bytes(obj[pkcs11.Attribute.ID], "big")
            for obj in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})
        }
        if key_id is None:
            key_id = min(set(range(1, len(used) + 2)) - used)
        elif key_id in used:
            raise OperatorError(f"token {token_label} already holds a key with id {key_id}")
        if not 0 < key_id <= MAX_HSM_KEY_ID:
            raise OperatorError(f"key id {key_id} is out of range")
        uri = hsm_uri(key_id, token_label)
        attrs = pkcs11.Attribute
        try:
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {attrs.EC_PARAMS: encode_named_curve_parameters(curve)},
                local=True,
            )
            params.generate_keypair(
                store=True,
                label=key_label,
                id=biginteger(key_id),
                private_template={attrs.SENSITIVE: True, attrs.EXTRACTABLE: False},
            )
        except PKCS11Error as e:
            raise ConfigError(f"the token refused to create the key: {type(e).__name__}") from e
        public = _public_from_session(session, key_id, uri)
    logger.info("created %s key %s in token %s", algorithm, key_id, token_label)
    return HsmKey(uri, public, key_label)


def hsm_public_key(uri: str, *, pin: PinSource | None = None) -> SSlibKey:
    """Read the public key of the ``hsm:`` key ``uri`` from its token.

    Public objects are read without logging in; ``pin`` (asked with the token label) is
    used only if the token hides them.

    Raises:
        OperatorError: a malformed URI.
        ConfigError: no such token or key, or an unsupported curve.
        KeyAccessError: wrong PIN.
    """
    key_id, label = parse_hsm_uri(uri)
    token = _token(label)
    with token.open() as session:
        try:
            return _public_from_session(session, key_id, uri)
        except ConfigError:
            if pin is None:
                raise
    with _open(token, pin(_label(token, uri))) as session:
        return _public_from_session(session, key_id, uri)


def check_hsm_key(uri: str, public_key: SSlibKey, *, pin: str) -> None:
    """Log in and check the token holds the private key of ``public_key`` under ``uri``.

    ``HSMSigner`` logs in only when it signs; this makes a wrong PIN or a wrong key fail
    before anything is written.

    Raises:
        KeyAccessError: wrong PIN.
        ConfigError: no such token or key, or the token's key is not ``public_key``.
    """
    key_id, label = parse_hsm_uri(uri)
    token = _token(label)
    with _open(token, pin) as session:
        found = _public_from_session(session, key_id, uri)
        try:
            HSMSigner._find_signing_key(session, key_id)
        except ValueError as e:
            raise ConfigError(f"{uri}: {e}") from e
    if found.keyval != public_key.keyval:
        raise ConfigError(f"{uri} holds another key than the metadata lists")


def list_hsm_keys(token_label: str) -> list[HsmKey]:
    """Every EC key pair in the token whose public half is readable without a PIN."""
    pkcs11 = _pkcs11()
    token = _token(token_label)
    out = []
    with token.open() as session:
        # one search at a time: collect, then look each key up
        found = [
            (int.from_bytes(obj[pkcs11.Attribute.ID], "big"), str(obj[pkcs11.Attribute.LABEL]))
            for obj in session.get_objects(
                {
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                    pkcs11.Attribute.KEY_TYPE: pkcs11.KeyType.EC,
                }
            )
        ]
        for key_id, label in found:
            uri = hsm_uri(key_id, token_label)
            try:
                public = _public_from_session(session, key_id, uri)
            except ConfigError:
                continue
            out.append(HsmKey(uri, public, label))
    return sorted(out, key=lambda k: k.uri)
