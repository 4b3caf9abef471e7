"""The device's TLS identity: its key, its CSR, EST enrollment, its certificate chain.

With a TPM configured (``device init --tpm TCTI``) the key is created inside the TPM and
``identity/device.key`` holds only its TPM-wrapped blob (:mod:`otaguard.agent.tpm_key`),
which the tpm2 OpenSSL provider presents in TLS. Without one, the key is an EC P-256
file in the device directory (mode 0600): the development key store, asked for by name
(:attr:`~otaguard.model.unsafe.Unsafe.FILE_DEVICE_KEY`), which warns on every use.

Key and certificate are two files, so a new pair is stored in three atomic steps: the new
key as ``device.key.new``, then the certificate, then the key renamed over the old one.
:func:`load_identity` uses whichever key matches the certificate (finishing a rename cut
short), so a power cut anywhere leaves the old pair, the new pair, or (first enrollment)
no certificate: never a certificate presented with a key it was not issued for. The old
key is removed only after the new certificate is stored.

Enrollment follows EST (RFC 7030) ``simpleenroll``: HTTP Basic ``serial:token`` over
TLS that verifies the server against the provisioned CA, a base64 DER PKCS#10 request,
and a base64 DER PKCS#7 certs-only answer. The token is never logged or stored. A device
holding a factory certificate from its manufacturer may enroll with it instead of a token
(:func:`enroll_with_factory_certificate`: the same request, authenticated by the factory
certificate as TLS client certificate, RFC 7030 section 3.3.2).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import http.client
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from securesystemslib.signer import CryptoSigner, Signer

from otaguard._fs import atomic_write_bytes, fsync_dir
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.fetcher import create_ssl_context
from otaguard.agent.tpm_key import (
    TpmKeyStore,
    TpmSigner,
    build_tpm_csr,
    create_tpm_key,
    is_tpm_key,
    tpm_public_key,
)
from otaguard.crypto.keys import warn_insecure
from otaguard.model.errors import (
    AccessDeniedError,
    ConfigError,
    DeviceStorageError,
    NotEnrolledError,
    OperatorError,
    TransportError,
    VerificationError,
)
from otaguard.model.unsafe import Unsafe

__all__ = [
    "EST_ENROLL_PATH",
    "MAX_EST_RESPONSE_BYTES",
    "DeviceKeyStore",
    "TpmKeyStore",
    "build_csr",
    "device_signer",
    "enroll",
    "enroll_with_factory_certificate",
    "key_store_for",
    "load_identity",
    "parse_enrollment_answer",
    "present_identity",
    "renew_if_due",
    "tls_with_identity",
]

logger = logging.getLogger(__name__)

#: where an EST server takes enrollment requests (RFC 7030 section 3.2.2)
EST_ENROLL_PATH: Final = "/.well-known/est/simpleenroll"
#: where a device renews with its current certificate (RFC 7030 section 3.2.2)
EST_REENROLL_PATH: Final = "/.well-known/est/simplereenroll"
#: renew when less than this fraction of the certificate's lifetime is left: a day-long
#: certificate renews after 16 h, leaving 8 h of polls to get through before it expires
RENEW_WHEN_LEFT: Final = 1 / 3
# A certs-only answer holds two P-256 certificates (~1.5 KiB base64); more is hostile.
MAX_EST_RESPONSE_BYTES: Final = 64 * 1024
# Enrollment is one small request; a server that needs longer is not answering.
EST_TIMEOUT_SECONDS: Final = 30.0
# Key and certificate files are small; a large one is not ours.
MAX_IDENTITY_FILE_BYTES: Final = 64 * 1024

#: where the device key lives: the TPM, or (development, named because it is insecure) a file
DeviceKeyStore = TpmKeyStore | Literal[Unsafe.FILE_DEVICE_KEY]


def key_store_for(config: DeviceConfig) -> DeviceKeyStore:
    """The key store a device's configuration calls for: its TPM, or the file key.

    The file key on a device with a TPM only when its configuration asks for it by name
    (``unsafe_file_device_key``, development).
    """
    if config.tpm is None or config.unsafe_file_device_key:
        return Unsafe.FILE_DEVICE_KEY
    return TpmKeyStore(config.tpm)


def _check_store(paths: DevicePaths, config: DeviceConfig, key_store: DeviceKeyStore) -> None:
    """Refuse a key store the configuration does not call for; warn about the file key."""
    if isinstance(key_store, TpmKeyStore):
        if key_store.tcti != config.tpm:
            raise OperatorError(
                f"device {paths.root} is not configured with the TPM {key_store.tcti!r}"
            )
        return
    if key_store is not Unsafe.FILE_DEVICE_KEY:
        raise OperatorError(f"unknown device key store {key_store!r}")
    if config.tpm is not None and not config.unsafe_file_device_key:
        raise OperatorError(
            f"device {paths.root} has a TPM ({config.tpm}): its key belongs in it, not in a file"
        )
    warn_insecure(
        f"device {paths.root} keeps its identity key in a file ({paths.device_key}), not in a TPM"
    )


@dataclass(frozen=True)
class _NewKey:
    """A freshly made device key: what is stored, its public half, its CSR."""

    blob: bytes
    public: ec.EllipticCurvePublicKey
    csr: bytes


def _new_key(key_store: DeviceKeyStore, serial: str) -> _NewKey:
    if isinstance(key_store, TpmKeyStore):
        blob = create_tpm_key(key_store.tcti)
        return _NewKey(blob, tpm_public_key(blob), build_tpm_csr(key_store.tcti, blob, serial))
    key = ec.generate_private_key(ec.SECP256R1())
    blob = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _NewKey(blob, key.public_key(), build_csr(key, serial))


def _public_of(blob: bytes, key_store: DeviceKeyStore, path: Path) -> ec.EllipticCurvePublicKey:
    """The public key of a stored key, of the kind ``key_store`` keeps.

    Raises:
        ConfigError: the file is corrupt or of the other kind.
    """
    if isinstance(key_store, TpmKeyStore):
        if not is_tpm_key(blob):
            raise ConfigError(
                f"the device key {path} is not a TPM key: enroll again to create one in the TPM"
            )
        return tpm_public_key(blob)
    if is_tpm_key(blob):
        raise ConfigError(f"the device key {path} is a TPM key but no TPM is configured")
    try:
        key = serialization.load_pem_private_key(blob, None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the device key {path} is corrupt") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the device key {path} is not an EC key")
    return key.public_key()


def build_csr(key: ec.EllipticCurvePrivateKey, serial: str) -> bytes:
    """Return a DER PKCS#10 request for ``key`` naming ``serial`` as its CN."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_IDENTITY_FILE_BYTES + 1)
    except FileNotFoundError as e:
        raise NotEnrolledError(f"run otaguard device enroll ({what} {path} is missing)") from e
    except OSError as e:
        raise DeviceStorageError(f"cannot read {what} {path}: {e.strerror}") from e
    if len(data) > MAX_IDENTITY_FILE_BYTES:
        raise ConfigError(f"{what} {path} is too large")
    return data


def load_identity(
    paths: DevicePaths, config: DeviceConfig, *, key_store: DeviceKeyStore
) -> tuple[Path, Path]:
    """Return the certificate chain and key files after checking that they belong together.

    Raises:
        NotEnrolledError: no certificate or key yet, or they do not match.
        ConfigError: the files are corrupt.
    """
    _check_store(paths, config, key_store)
    chain = _read_small(paths.device_cert, "device certificate")
    try:
        cert = x509.load_pem_x509_certificate(chain)
    except ValueError as e:
        raise ConfigError(f"the device identity in {paths.identity} is corrupt") from e
    _settle_key(paths, cert, key_store)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [config.serial]:
        raise NotEnrolledError(
            f"run otaguard device enroll (the certificate is not for serial {config.serial})"
        )
    return paths.device_cert, paths.device_key


def _settle_key(paths: DevicePaths, cert: x509.Certificate, key_store: DeviceKeyStore) -> None:
    """Make ``device.key`` the key of ``cert``, finishing or discarding a cut-short store.

    Raises:
        NotEnrolledError: neither the key nor a waiting new key matches the certificate.
    """
    if paths.device_key_next.exists():
        pending = _read_small(paths.device_key_next, "new device key")
        try:
            if _public_of(pending, key_store, paths.device_key_next) == cert.public_key():
                # The certificate was stored, the rename was not: finish it.
                os.replace(paths.device_key_next, paths.device_key)
                fsync_dir(paths.identity)
                logger.info("finished storing the device key of %s", paths.root)
                return
        except ConfigError:
            pass  # a corrupt leftover: removed below, like any other
        # A new key without its certificate: enrollment or renewal was cut short.
        paths.device_key_next.unlink(missing_ok=True)
    key = _read_small(paths.device_key, "device key")
    if _public_of(key, key_store, paths.device_key) != cert.public_key():
        raise NotEnrolledError(
            "run otaguard device enroll (the certificate is not for the device key)"
        )


def device_signer(paths: DevicePaths, config: DeviceConfig) -> Signer:
    """The device key as a securesystemslib ``Signer``: what signs check-in manifests.

    The one place that decides which key signs: the TPM-held key when the device has a
    TPM (:class:`~otaguard.agent.tpm_key.TpmSigner`: the signature is made inside the
    TPM), otherwise the file key (:attr:`Unsafe.FILE_DEVICE_KEY`, warns on every use).

    Raises:
        NotEnrolledError: no key or certificate yet, or they do not match.
        ConfigError: the identity files are corrupt.
    """
    key_store = key_store_for(config)
    _, key_path = load_identity(paths, config, key_store=key_store)
    if isinstance(key_store, TpmKeyStore):
        return TpmSigner(tcti=key_store.tcti, key_blob=_read_small(key_path, "device key"))
    try:
        key = serialization.load_pem_private_key(_read_small(paths.device_key, "device key"), None)
    except ValueError as e:
        raise ConfigError(f"the device identity in {paths.identity} is corrupt") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"the device key in {paths.identity} is not an EC key")
    return CryptoSigner(key)


def _server_reason(data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        return "no reason given"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return " ".join(body["error"].split())[:300]
    return "no reason given"


def _post(
    config: DeviceConfig,
    tls: ssl.SSLContext | None,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> bytes:
    url = urlsplit(config.server_url)
    host, port = url.hostname or "", url.port
    conn: http.client.HTTPConnection
    if tls is None:
        conn = http.client.HTTPConnection(host, port, timeout=EST_TIMEOUT_SECONDS)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=EST_TIMEOUT_SECONDS, context=tls)
    try:
        conn.request("POST", url.path.rstrip("/") + path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read(MAX_EST_RESPONSE_BYTES + 1)
    except ssl.SSLError as e:
        raise TransportError(f"TLS with {config.server_url} failed: {e.reason or e}") from e
    except (OSError, http.client.HTTPException) as e:
        raise TransportError(f"enrollment request to {config.server_url} failed: {e}") from e
    finally:
        conn.close()
    if len(data) > MAX_EST_RESPONSE_BYTES:
        raise TransportError("the enrollment answer is too large")
    if resp.status in (401, 403):
        raise AccessDeniedError(f"enrollment refused: {_server_reason(data)}")
    if resp.status == 422:
        raise VerificationError(f"enrollment refused: {_server_reason(data)}")
    if resp.status != 200:
        raise TransportError(
            f"enrollment failed: server answered {resp.status}: {_server_reason(data)}"
        )
    return data


def parse_enrollment_answer(
    data: bytes, public: ec.EllipticCurvePublicKey, serial: str
) -> list[x509.Certificate]:
    """The issued chain (leaf first) from an EST answer, checked against the key and serial.

    Pure: the agent and the fleet simulator (:mod:`otaguard.sim.fleetsim`) share it.

    Raises:
        VerificationError: not a base64 PKCS#7 certs-only, or no certificate for this key
            and serial.
    """
    try:
        der = base64.b64decode(b"".join(data.split()), validate=True)
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (binascii.Error, ValueError) as e:
        raise VerificationError("the enrollment answer is not a base64 PKCS#7 certs-only") from e
    leaves = [c for c in certs if c.public_key() == public]
    if len(leaves) != 1:
        raise VerificationError("the enrollment answer holds no certificate for the device key")
    leaf = leaves[0]
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [serial]:
        raise VerificationError(f"the issued certificate does not name serial {serial}")
    return [leaf] + [c for c in certs if c is not leaf]


def _store(paths: DevicePaths, blob: bytes, chain: list[x509.Certificate]) -> None:
    """Store a new key and its certificate chain; see the module docstring for the order."""
    try:
        paths.identity.mkdir(mode=0o700, exist_ok=True)
        # 1. The new key beside the old one: a cut here leaves the old pair in use.
        atomic_write_bytes(paths.device_key_next, blob, mode=0o600)
        # 2. The certificate: a cut here leaves it matching device.key.new, which
        #    load_identity renames into place (the old key is gone only after this).
        atomic_write_bytes(
            paths.device_cert,
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        )
        # 3. The new key replaces the old one.
        os.replace(paths.device_key_next, paths.device_key)
        fsync_dir(paths.identity)
    except OSError as e:
        raise DeviceStorageError(f"cannot store the device identity: {e.strerror}") from e


def _tls(paths: DevicePaths, config: DeviceConfig) -> ssl.SSLContext | None:
    if config.insecure_http and config.server_url.startswith("http://"):
        warn_insecure(f"device {paths.root} enrolls over plain HTTP")
        return None
    try:
        return create_ssl_context(ca_file=paths.ca)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"CA certificate {paths.ca} is unusable") from e


def tls_with_identity(
    ctx: ssl.SSLContext, paths: DevicePaths, config: DeviceConfig, *, key_store: DeviceKeyStore
) -> None:
    """Make ``ctx`` present the device certificate and key (a TPM key through tpm2-openssl).

    Raises:
        NotEnrolledError: not enrolled, or the pair does not match.
        ConfigError: the identity files or the tpm2 provider are unusable.
    """
    cert, key = load_identity(paths, config, key_store=key_store)
    present_identity(ctx, cert, key, key_store=key_store)


def present_identity(
    ctx: ssl.SSLContext, cert: Path, key: Path, *, key_store: DeviceKeyStore
) -> None:
    """Load a checked pair (:func:`load_identity`, :func:`renew_if_due`) into ``ctx``.

    Raises:
        ConfigError: the files or the tpm2 provider are unusable.
    """
    if isinstance(key_store, TpmKeyStore):
        from otaguard.agent._tls_tpm import load_tpm_provider

        load_tpm_provider(key_store.tcti)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"the device identity in {cert.parent} is unusable") from e


def enroll(
    paths: DevicePaths, config: DeviceConfig, token: str, *, key_store: DeviceKeyStore
) -> x509.Certificate:
    """Generate the device key, enroll with ``token`` and store the certificate chain.

    Args:
        paths: the device directory.
        config: the device configuration (server URL, serial).
        token: the single-use enrollment token from ``otaguard fleet add-device``.
        key_store: where the key lives: the configured TPM (:func:`key_store_for`), or
            ``Unsafe.FILE_DEVICE_KEY`` on a device without one (warns).

    Returns:
        The device certificate.

    Raises:
        AccessDeniedError: the server refused the token or the device (reason given).
        VerificationError: the server refused the request, or answered with something
            that is not a certificate for this key and serial.
        TransportError: the server is unreachable or TLS failed.
        DeviceStorageError: the key or certificate cannot be written, or the TPM failed.
    """
    _check_store(paths, config, key_store)
    if not token or not token.isascii() or not token.isprintable() or ":" in token:
        raise OperatorError("the enrollment token is malformed")
    key = _new_key(key_store, config.serial)
    csr = base64.encodebytes(key.csr)
    auth = base64.b64encode(f"{config.serial}:{token}".encode()).decode("ascii")
    data = _post(
        config,
        _tls(paths, config),
        EST_ENROLL_PATH,
        csr,
        {
            "Content-Type": "application/pkcs10",
            "Content-Transfer-Encoding": "base64",
            "Authorization": f"Basic {auth}",
        },
    )
    chain = parse_enrollment_answer(data, key.public, config.serial)
    _store(paths, key.blob, chain)
    logger.info(
        "device %s enrolled; certificate %x valid until %s",
        config.serial,
        chain[0].serial_number,
        chain[0].not_valid_after_utc.isoformat(),
    )
    return chain[0]


def enroll_with_factory_certificate(
    paths: DevicePaths,
    config: DeviceConfig,
    *,
    factory_cert: Path,
    factory_key: Path,
    key_store: DeviceKeyStore,
) -> x509.Certificate:
    """Generate the device key and enroll with the factory certificate instead of a token.

    The factory certificate and key (from the manufacturer, for this device's serial)
    authenticate the TLS connection; the device key is new and only its CSR is sent.

    Args:
        paths: the device directory.
        config: the device configuration (server URL, serial).
        factory_cert: the factory certificate (PEM).
        factory_key: its private key (PEM; a file here: warns).
        key_store: where the device key lives: the configured TPM (:func:`key_store_for`),
            or ``Unsafe.FILE_DEVICE_KEY`` on a device without one (warns).

    Returns:
        The device certificate.

    Raises:
        AccessDeniedError: the server refused the factory certificate or the device.
        VerificationError: the server refused the request, or answered with something
            that is not a certificate for this key and serial.
        TransportError: the server is unreachable or TLS failed.
        ConfigError: the factory certificate or key is unusable.
        DeviceStorageError: the key or certificate cannot be written.
    """
    _check_store(paths, config, key_store)
    warn_insecure(f"device {paths.root} reads its factory key from a file ({factory_key})")
    tls = _tls(paths, config)
    if tls is None:
        raise OperatorError("factory enrollment needs TLS")
    try:
        tls.load_cert_chain(str(factory_cert), str(factory_key))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"the factory certificate {factory_cert} and key {factory_key} are unusable: {e}"
        ) from e
    key = _new_key(key_store, config.serial)
    data = _post(
        config,
        tls,
        EST_ENROLL_PATH,
        base64.encodebytes(key.csr),
        {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"},
    )
    chain = parse_enrollment_answer(data, key.public, config.serial)
    _store(paths, key.blob, chain)
    logger.info(
        "device %s enrolled with its factory certificate; certificate %x valid until %s",
        config.serial,
        chain[0].serial_number,
        chain[0].not_valid_after_utc.isoformat(),
    )
    return chain[0]


def _load_chain(paths: DevicePaths) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_small(paths.device_cert, "device certificate"))
    except ValueError as e:
        raise ConfigError(f"the device certificate {paths.device_cert} is corrupt") from e


def renew_if_due(
    paths: DevicePaths,
    config: DeviceConfig,
    *,
    key_store: DeviceKeyStore,
    now: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Renew the device certificate (EST ``simplereenroll``) when a third of its life is left.

    Authenticated by the current certificate; a new key and CSR for the same serial.

    Returns:
        The certificate chain and key files to present (renewed or not).

    Raises:
        NotEnrolledError: not enrolled, or the certificate has expired (an expired
            certificate cannot renew: enroll again with a new token).
        AccessDeniedError: the server refused (revoked, quarantined, unknown certificate).
        TransportError: the server is unreachable or TLS failed.
    """
    cert_path, key_path = load_identity(paths, config, key_store=key_store)
    cert = _load_chain(paths)
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise NotEnrolledError(
            f"the device certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}: "
            "ask the operator for a new token (otaguard fleet token) and run otaguard device enroll"
        )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if cert.not_valid_after_utc - now > lifetime * RENEW_WHEN_LEFT:
        return cert_path, key_path
    tls = _tls(paths, config)
    if tls is None:
        raise OperatorError("certificate renewal needs TLS")
    present_identity(tls, cert_path, key_path, key_store=key_store)
    key = _new_key(key_store, config.serial)
    data = _post(
        config,
        tls,
        EST_REENROLL_PATH,
        base64.encodebytes(key.csr),
        {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"},
    )
    _store(paths, key.blob, parse_enrollment_answer(data, key.public, config.serial))
    logger.info("device %s renewed its certificate", config.serial)
    return cert_path, key_path
