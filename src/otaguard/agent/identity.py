"""The device's TLS identity: its key, its CSR, EST enrollment, its certificate chain.

The key is an EC P-256 file in the device directory (``identity/device.key``, mode
0600). That is the development key store until the TPM backend lands, so it is asked
for by name (:attr:`~otaguard.model.unsafe.Unsafe.FILE_DEVICE_KEY`) and warns on every
use. Enrollment follows EST (RFC 7030) ``simpleenroll``: HTTP Basic ``serial:token`` over
TLS that verifies the server against the provisioned CA, a base64 DER PKCS#10 request,
and a base64 DER PKCS#7 certs-only answer. The token is never logged or stored.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import http.client
import json
import logging
import ssl
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from securesystemslib.signer import CryptoSigner, Signer

from otaguard._fs import atomic_write_bytes
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.fetcher import create_ssl_context
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
    "build_csr",
    "device_signer",
    "enroll",
    "load_identity",
    "renew_if_due",
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

#: the only key store until a hardware backend exists; named because it is insecure
DeviceKeyStore = Literal[Unsafe.FILE_DEVICE_KEY]


def _warn_file_key(paths: DevicePaths) -> None:
    warn_insecure(
        f"device {paths.root} keeps its identity key in a file ({paths.device_key}), not in a TPM"
    )


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
    if key_store is not Unsafe.FILE_DEVICE_KEY:
        raise OperatorError("the only device key store is Unsafe.FILE_DEVICE_KEY")
    _warn_file_key(paths)
    chain = _read_small(paths.device_cert, "device certificate")
    key_pem = _read_small(paths.device_key, "device key")
    try:
        cert = x509.load_pem_x509_certificate(chain)
        key = serialization.load_pem_private_key(key_pem, None)
    except ValueError as e:
        raise ConfigError(f"the device identity in {paths.identity} is corrupt") from e
    if key.public_key() != cert.public_key():
        raise NotEnrolledError(
            "run otaguard device enroll (the certificate is not for the device key)"
        )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [config.serial]:
        raise NotEnrolledError(
            f"run otaguard device enroll (the certificate is not for serial {config.serial})"
        )
    return paths.device_cert, paths.device_key


def device_signer(paths: DevicePaths, config: DeviceConfig) -> Signer:
    """The device key as a securesystemslib ``Signer``: what signs check-in manifests.

    The one place that decides where the device key lives. Today it is the file key
    (:attr:`Unsafe.FILE_DEVICE_KEY`, warns on every use); a TPM-backed signer replaces it
    here, and nothing else names the key.

    Raises:
        NotEnrolledError: no key or certificate yet, or they do not match.
        ConfigError: the identity files are corrupt.
    """
    load_identity(paths, config, key_store=Unsafe.FILE_DEVICE_KEY)
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


def _parse_chain(
    data: bytes, key: ec.EllipticCurvePrivateKey, serial: str
) -> list[x509.Certificate]:
    try:
        der = base64.b64decode(b"".join(data.split()), validate=True)
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (binascii.Error, ValueError) as e:
        raise VerificationError("the enrollment answer is not a base64 PKCS#7 certs-only") from e
    leaves = [c for c in certs if c.public_key() == key.public_key()]
    if len(leaves) != 1:
        raise VerificationError("the enrollment answer holds no certificate for the device key")
    leaf = leaves[0]
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [serial]:
        raise VerificationError(f"the issued certificate does not name serial {serial}")
    return [leaf] + [c for c in certs if c is not leaf]


def _store(
    paths: DevicePaths, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        paths.identity.mkdir(mode=0o700, exist_ok=True)
        # Key first: a power cut in between leaves a key without its certificate, which
        # load_identity reports as "not enrolled" rather than using a mismatched pair.
        atomic_write_bytes(paths.device_key, key_pem, mode=0o600)
        atomic_write_bytes(
            paths.device_cert,
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        )
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


def enroll(
    paths: DevicePaths, config: DeviceConfig, token: str, *, key_store: DeviceKeyStore
) -> x509.Certificate:
    """Generate the device key, enroll with ``token`` and store the certificate chain.

    Args:
        paths: the device directory.
        config: the device configuration (server URL, serial).
        token: the single-use enrollment token from ``otaguard fleet add-device``.
        key_store: where the key lives; only ``Unsafe.FILE_DEVICE_KEY`` (warns).

    Returns:
        The device certificate.

    Raises:
        AccessDeniedError: the server refused the token or the device (reason given).
        VerificationError: the server refused the request, or answered with something
            that is not a certificate for this key and serial.
        TransportError: the server is unreachable or TLS failed.
        DeviceStorageError: the key or certificate cannot be written.
    """
    if key_store is not Unsafe.FILE_DEVICE_KEY:
        raise OperatorError("the only device key store is Unsafe.FILE_DEVICE_KEY")
    _warn_file_key(paths)
    if not token or not token.isascii() or not token.isprintable() or ":" in token:
        raise OperatorError("the enrollment token is malformed")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = base64.encodebytes(build_csr(key, config.serial))
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
    chain = _parse_chain(data, key, config.serial)
    _store(paths, key, chain)
    logger.info(
        "device %s enrolled; certificate %x valid until %s",
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
    try:
        tls.load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"the device identity in {paths.identity} is unusable") from e
    key = ec.generate_private_key(ec.SECP256R1())
    data = _post(
        config,
        tls,
        EST_REENROLL_PATH,
        base64.encodebytes(build_csr(key, config.serial)),
        {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"},
    )
    _store(paths, key, _parse_chain(data, key, config.serial))
    logger.info("device %s renewed its certificate", config.serial)
    return cert_path, key_path
