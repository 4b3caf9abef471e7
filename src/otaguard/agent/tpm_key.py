"""The device key inside the TPM: created there, never exported, signing CSRs and payloads.

The key is an ECC P-256 signing key created by ``TPM2_Create`` under the owner
hierarchy's storage primary key, with ``fixedTPM | fixedParent | sensitiveDataOrigin``:
the TPM made the private part and will not duplicate it. What the device stores is the
*TPM-wrapped blob* in the ``TSS2 PRIVATE KEY`` PEM format (TCG TSS 2.0 key files), which
the tpm2-openssl provider loads for TLS (:mod:`otaguard.agent._tls_tpm`). The private part
in that blob is encrypted under the primary key, which only this TPM can re-derive from
its owner seed: the file is useless anywhere else. A file, not a persistent handle,
because files can be replaced atomically (a power cut never leaves a leaked persistent
object in the TPM's small NV memory, and no handle numbers need allocating), and because
the TPM holds nothing that must be cleaned up when a key is retired.

The CSR and payload signatures are made with tpm2-pytss (``TPM2_Sign`` over a SHA-256
digest computed outside, as a TPM signs any non-restricted key's digest): ``cryptography``
cannot sign with a key it does not hold, and doing it here keeps one code path for CSRs
and for :class:`TpmSigner`. The CSR is a small DER structure (RFC 2986) around the
``cryptography``-encoded name and public key; it is parsed back and its signature checked
before it is sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from securesystemslib.signer import Key, SecretsHandler, Signature, Signer, SSlibKey

from otaguard.model.errors import ConfigError, DeviceStorageError

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

__all__ = [
    "TPM_KEY_PEM_BEGIN",
    "TpmKeyStore",
    "TpmSigner",
    "build_tpm_csr",
    "create_tpm_key",
    "is_tpm_key",
    "tpm_public_key",
    "tpm_sign",
]

_T = TypeVar("_T")

#: how a TPM-wrapped key file starts (TCG TSS 2.0 key file format, as tpm2-openssl reads)
TPM_KEY_PEM_BEGIN: Final = b"-----BEGIN TSS2 PRIVATE KEY-----"
#: ecdsa-with-SHA256 AlgorithmIdentifier (RFC 5758 section 3.2), DER
_ECDSA_SHA256_ALG: Final = bytes.fromhex("300a06082a8648ce3d040302")
#: securesystemslib's scheme for ECDSA P-256 over SHA-256 (DER signatures)
SCHEME: Final = "ecdsa-sha2-nistp256"


@dataclass(frozen=True)
class TpmKeyStore:
    """The device key lives in the TPM reached through ``tcti``.

    With tpm2-openssl presenting the key in TLS and tpm2-pytss signing and counting at
    the same time, ``tcti`` must be a resource manager (``tabrmd:...`` or
    ``device:/dev/tpmrm0``).
    """

    tcti: str


def is_tpm_key(blob: bytes) -> bool:
    """Whether ``blob`` is a TPM-wrapped key file (not a plain private key)."""
    return blob.lstrip().startswith(TPM_KEY_PEM_BEGIN)


def _pytss() -> Any:
    try:
        import tpm2_pytss
    except ImportError as e:
        raise ConfigError(
            "a TPM-held device key needs tpm2-pytss (pip install 'otaguard[tpm]')"
        ) from e
    return tpm2_pytss


@contextmanager
def _esapi(tcti: str) -> Iterator[ESAPI]:
    """One TPM connection per operation (as the NV counter store does)."""
    pytss = _pytss()
    from tpm2_pytss.TSS2_Exception import TSS2_Exception

    try:
        ctx = pytss.ESAPI(tcti)
    except TSS2_Exception as e:
        raise DeviceStorageError(f"cannot reach the TPM at {tcti!r}: {e}") from e
    try:
        yield ctx
    finally:
        ctx.close()


def _run(tcti: str, what: str, op: Callable[[ESAPI], _T]) -> _T:
    from tpm2_pytss.TSS2_Exception import TSS2_Exception

    with _esapi(tcti) as ctx:
        try:
            return op(ctx)
        except TSS2_Exception as e:
            raise DeviceStorageError(f"the TPM at {tcti!r} failed to {what}: {e}") from e


def _template() -> Any:
    """ECC P-256, sign only, created and kept inside the TPM, no password (device-bound)."""
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPMS_ECC_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
    )

    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.NODA,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                # NULL: the scheme is chosen per signature (ECDSA here and in TLS).
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        ),
    )


def create_tpm_key(tcti: str) -> bytes:
    """Create a new device key inside the TPM; return its wrapped blob (PEM).

    Raises:
        DeviceStorageError: the TPM cannot be reached or refused.
        ConfigError: tpm2-pytss is not installed.
    """
    _pytss()
    from tpm2_pytss.tsskey import TSSPrivKey

    def op(ctx: ESAPI) -> bytes:
        return bytes(TSSPrivKey.create(ctx, _template()).to_pem())

    return _run(tcti, "create the device key", op)


def _parse(blob: bytes) -> Any:
    _pytss()
    from tpm2_pytss.tsskey import TSSPrivKey

    try:
        return TSSPrivKey.from_pem(blob)
    except (ValueError, TypeError, IndexError) as e:
        raise ConfigError("the device key file is not a TPM-wrapped key") from e


def tpm_public_key(blob: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a TPM-wrapped key (read from the blob; no TPM needed).

    Raises:
        ConfigError: ``blob`` is not a TPM-wrapped P-256 key.
    """
    key = _parse(blob)
    try:
        public = serialization.load_pem_public_key(bytes(key.public.to_pem()))
    except (ValueError, TypeError) as e:
        raise ConfigError("the TPM-wrapped key holds an unusable public key") from e
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise ConfigError("the TPM-wrapped key is not an ECC P-256 key")
    return public


def tpm_sign(tcti: str, blob: bytes, data: bytes) -> bytes:
    """Sign SHA-256(``data``) with the TPM key; return a DER ECDSA signature.

    Raises:
        DeviceStorageError: the TPM cannot be reached, or refuses the key (another TPM's
            key, or the TPM was cleared).
        ConfigError: ``blob`` is not a TPM-wrapped key.
    """
    key = _parse(blob)
    digest = hashlib.sha256(data).digest()
    from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
    from tpm2_pytss.types import (
        TPM2B_DIGEST,
        TPMS_SCHEME_HASH,
        TPMT_SIG_SCHEME,
        TPMT_TK_HASHCHECK,
        TPMU_SIG_SCHEME,
    )

    scheme = TPMT_SIG_SCHEME(
        scheme=TPM2_ALG.ECDSA,
        details=TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )
    # The digest was not computed by the TPM: a null ticket (allowed for keys that are
    # not restricted, which is what this key is).
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

    def op(ctx: ESAPI) -> bytes:
        handle = key.load(ctx)
        try:
            sig = ctx.sign(handle, TPM2B_DIGEST(digest), scheme, ticket)
        finally:
            ctx.flush_context(handle)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return encode_dss_signature(r, s)

    return _run(tcti, "sign with the device key", op)


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV (definite length)."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def build_tpm_csr(tcti: str, blob: bytes, serial: str) -> bytes:
    """A DER PKCS#10 request (RFC 2986) for the TPM key naming ``serial``, signed in the TPM.

    Raises:
        DeviceStorageError: the TPM failed or refused the key.
        ConfigError: ``blob`` is not a TPM-wrapped key.
    """
    public = tpm_public_key(blob)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]).public_bytes()
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # CertificationRequestInfo: version 0, subject, SPKI, attributes [0] (empty SET).
    info = _der(0x30, b"\x02\x01\x00" + subject + spki + b"\xa0\x00")
    signature = tpm_sign(tcti, blob, info)
    der = _der(0x30, info + _ECDSA_SHA256_ALG + _der(0x03, b"\x00" + signature))
    # Parse back and check before anything leaves the device: a wrong encoding is a bug
    # here, not a refusal to puzzle out from the server's answer.
    csr = x509.load_der_x509_csr(der)
    if not csr.is_signature_valid or csr.public_key() != public:
        raise DeviceStorageError("the TPM's CSR signature does not verify")
    return der


class TpmSigner(Signer):
    """A securesystemslib signer over the TPM-held device key (``ecdsa-sha2-nistp256``).

    Signatures are DER ECDSA over SHA-256 of the payload, as :class:`SSlibKey` verifies
    them for that scheme. The key never leaves the TPM; every signature is one
    ``TPM2_Sign``.

    Args:
        tcti: the TPM holding the key.
        key_blob: the TPM-wrapped key (``identity/device.key``).

    Raises:
        ConfigError: ``key_blob`` is not a TPM-wrapped P-256 key.
    """

    def __init__(self, *, tcti: str, key_blob: bytes) -> None:
        self._tcti = tcti
        self._blob = key_blob
        self._public_key = SSlibKey.from_crypto(tpm_public_key(key_blob), scheme=SCHEME)

    @property
    def public_key(self) -> SSlibKey:
        """The device key's public half, as securesystemslib verifies with."""
        return self._public_key

    @classmethod
    def from_priv_key_uri(
        cls,
        priv_key_uri: str,
        public_key: Key,
        secrets_handler: SecretsHandler | None = None,
    ) -> TpmSigner:
        """Not supported: a TPM key is addressed by its TCTI and blob, not by a URI.

        Raises:
            ValueError: always.
        """
        raise ValueError("TpmSigner is built from a TCTI and a key blob, not a URI")

    def sign(self, payload: bytes) -> Signature:
        """Sign ``payload`` in the TPM.

        Raises:
            DeviceStorageError: the TPM failed or refused the key.
        """
        sig = tpm_sign(self._tcti, self._blob, payload)
        return Signature(self._public_key.keyid, sig.hex())
