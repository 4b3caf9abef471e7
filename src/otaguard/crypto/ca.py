"""The fleet's own certificate authority, created on first run.

The embedded default needs no external PKI: the server makes a CA in its data directory
and issues itself a TLS certificate from it; devices are provisioned with the CA
certificate as their trust anchor for the server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otaguard._fs import atomic_write_bytes
from otaguard.model.errors import ConfigError

__all__ = ["CertificateAuthority", "ServerCredentials", "write_unattended_key"]

logger = logging.getLogger(__name__)

CA_VALIDITY: Final = dt.timedelta(days=3650)
# Server certificates are short-lived; the running server re-issues them once less than
# a third of their lifetime is left (otaguard.server.tls), so a server left running for
# months never locks its fleet out.
SERVER_CERT_VALIDITY: Final = dt.timedelta(days=30)
RENEW_WHEN_LEFT: Final = 1 / 3


@dataclass(frozen=True)
class ServerCredentials:
    """Paths of a server certificate chain and its private key."""

    cert_path: Path
    key_path: Path


def write_unattended_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a key the server uses unattended (TLS, CA): PKCS#8, mode 0600, atomically."""
    # Used without an operator present, so no passphrase; mode 0600 is their protection.
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(path, pem, mode=0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CertificateAuthority:
    """A CA whose key and certificate live in one directory (key mode 0600)."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.directory = directory
        self._key = key
        self.certificate = cert

    @property
    def cert_path(self) -> Path:
        """Path of the CA certificate (PEM) that devices trust."""
        return self.directory / "ca.pem"

    @classmethod
    def load_or_create(
        cls, directory: Path, *, name: str = "otaguard fleet CA"
    ) -> CertificateAuthority:
        """Load the CA in ``directory``, creating it on first use.

        Raises:
            ConfigError: an existing CA is unreadable.
        """
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), None)
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot load the CA in {directory}: {e}") from e
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"CA key in {directory} is not an EC key")
            return cls(directory, key, cert)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_unattended_key(key_path, key)
        atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        logger.info("created certificate authority in %s", directory)
        return cls(directory, key, cert)

    def server_credentials(
        self,
        directory: Path,
        hosts: Sequence[str],
        *,
        lifetime: dt.timedelta = SERVER_CERT_VALIDITY,
    ) -> ServerCredentials:
        """Return a server certificate for ``hosts``, issuing a new one when needed.

        A new one is issued when the stored one is missing, unreadable, not from this CA,
        lacks one of ``hosts``, or has less than a third of ``lifetime`` left.
        """
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = directory / "server.pem", directory / "server.key"
        wanted = sorted(set(hosts) | {"localhost", "127.0.0.1"})
        if cert_path.exists() and key_path.exists():
            try:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = sorted(str(v) for v in sans.get_values_for_type(x509.DNSName)) + sorted(
                    str(v) for v in sans.get_values_for_type(x509.IPAddress)
                )
                fresh = (
                    cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > lifetime * RENEW_WHEN_LEFT
                )
                if fresh and set(wanted) <= set(have) and cert.issuer == self.certificate.subject:
                    return ServerCredentials(cert_path, key_path)
            except (OSError, ValueError, x509.ExtensionNotFound):
                logger.warning("server certificate unreadable; issuing a new one")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in wanted]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        write_unattended_key(key_path, key)
        atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return ServerCredentials(cert_path, key_path)
