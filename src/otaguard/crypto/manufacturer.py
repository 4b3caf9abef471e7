"""The manufacturer side of factory enrollment: a manufacturer CA and factory certificates.

A manufacturer puts a key and a *factory certificate* into each device on the production
line. The certificate names the device the way device certificates do -- serial as the
subject CN, hardware id as a SAN URI ``urn:otaguard:hw:<id>`` -- and is signed by the
manufacturer CA, which the update server is told to trust (``--manufacturer-ca``). The
device then enrolls with it in place of a token (EST ``simpleenroll`` authenticated by the
TLS client certificate, RFC 7030 section 3.3.2). A factory certificate is an enrollment
credential only: it never authenticates device requests (the device gate accepts only the
device CA's signature).

Layout of a manufacturer directory (``otaguard manufacturer init DIR``; mode 0700)::

    ca.pem  ca.key     self-signed manufacturer CA (EC P-256), key mode 0600

The CA key is a file here, which is a development convenience (it warns on every use): a
real production line keeps it in an HSM.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otaguard._fs import atomic_write_bytes
from otaguard.crypto.ca import write_unattended_key
from otaguard.crypto.device_ca import (
    BACKDATE,
    device_identity,
    device_leaf_builder,
)
from otaguard.crypto.keys import warn_insecure
from otaguard.model.errors import ConfigError, OtaguardError, VerificationError
from otaguard.model.names import check_device_serial, check_hardware_id

__all__ = [
    "DEFAULT_FACTORY_CERT_LIFETIME",
    "MAX_MANUFACTURER_CA_BYTES",
    "FactoryIdentity",
    "ManufacturerCA",
    "load_manufacturer_cas",
    "verify_factory_certificate",
]

logger = logging.getLogger(__name__)

# The manufacturer CA outlives the devices it vouches for.
CA_VALIDITY: Final = dt.timedelta(days=20 * 365)
#: a factory certificate lasts as long as the device is expected to wait on a shelf
#: before its first enrollment; re-enrollment after that needs an operator token
DEFAULT_FACTORY_CERT_LIFETIME: Final = dt.timedelta(days=10 * 365)
# A CA bundle of a few manufacturers is a few KiB; a large file is not a CA bundle.
MAX_MANUFACTURER_CA_BYTES: Final = 256 * 1024


@dataclass(frozen=True)
class FactoryIdentity:
    """The device a verified factory certificate names.

    Attributes:
        serial: the device serial (subject CN).
        hardware_id: the hardware id (SAN URI).
        subject: the certificate subject, for logs.
    """

    serial: str
    hardware_id: str
    subject: str


def load_manufacturer_cas(path: Path) -> list[x509.Certificate]:
    """Load the manufacturer CA certificate(s) of a PEM file.

    Raises:
        ConfigError: the file is unreadable, too large, holds no certificate, or holds a
            certificate that is not a CA.
    """
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_MANUFACTURER_CA_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the manufacturer CA {path}: {e.strerror}") from e
    if len(data) > MAX_MANUFACTURER_CA_BYTES:
        raise ConfigError(f"the manufacturer CA file {path} is too large")
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{path} holds no PEM certificate") from e
    for ca in cas:
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"{path}: {ca.subject.rfc4514_string()} is not a CA certificate")
    return cas


def verify_factory_certificate(
    cert: x509.Certificate, *, trusted: Sequence[x509.Certificate], now: dt.datetime
) -> FactoryIdentity:
    """Verify a factory certificate and return the device it names.

    Checks, in order: (1) a trusted manufacturer CA signed it (name and signature); (2)
    that CA is valid now; (3) the certificate is valid now; (4) it is not a CA and, if it
    restricts its use, allows client authentication; (5) it names one well-formed serial
    (CN) and hardware id (SAN URI).

    Raises:
        VerificationError: a check failed; the message is the reason.
    """
    subject = cert.subject.rfc4514_string()
    issuers = [ca for ca in trusted if ca.subject == cert.issuer]
    signer = None
    for ca in issuers:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        signer = ca
        break
    if signer is None:
        raise VerificationError(
            f"the factory certificate {subject} is not from a trusted manufacturer CA"
        )
    if not signer.not_valid_before_utc <= now < signer.not_valid_after_utc:
        raise VerificationError(
            "the manufacturer CA that signed the factory certificate is not valid now"
        )
    if cert.not_valid_after_utc <= now:
        raise VerificationError(
            f"the factory certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if cert.not_valid_before_utc > now:
        raise VerificationError("the factory certificate is not valid yet")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise VerificationError("a CA certificate is not a factory certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise VerificationError("the factory certificate does not allow client authentication")
    except x509.ExtensionNotFound:
        pass
    try:
        ident = device_identity(cert)
        serial = check_device_serial(ident.serial)
        if ident.hardware_id is None:
            raise VerificationError("the factory certificate names no hardware id")
        hardware_id = check_hardware_id(ident.hardware_id)
    except (ValueError, OtaguardError) as e:
        raise VerificationError(f"the factory certificate names no valid device: {e}") from e
    return FactoryIdentity(serial=serial, hardware_id=hardware_id, subject=subject)


_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _warn_file_key(path: Path) -> None:
    warn_insecure(f"the manufacturer CA key {path} is a file (development only: keep it in an HSM)")


class ManufacturerCA:
    """A self-signed manufacturer CA in a directory (see the module docstring)."""

    def __init__(self, directory: Path, *, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.directory = directory
        self.cert = cert
        self._key = key

    @property
    def cert_path(self) -> Path:
        """The CA certificate (what the server's ``--manufacturer-ca`` points at)."""
        return self.directory / "ca.pem"

    @classmethod
    def create(
        cls, directory: Path, *, name: str, now: dt.datetime | None = None
    ) -> ManufacturerCA:
        """Create the CA in ``directory`` (mode 0700; the key mode 0600). Warns (file key).

        Raises:
            ConfigError: a CA already exists there, or it cannot be written.
        """
        directory = Path(directory)
        key_path = directory / "ca.key"
        _warn_file_key(key_path)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if key_path.exists() or (directory / "ca.pem").exists():
                raise ConfigError(f"a manufacturer CA already exists in {directory}")
        except OSError as e:
            raise ConfigError(f"cannot create {directory}: {e.strerror}") from e
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        try:
            write_unattended_key(key_path, key)
            atomic_write_bytes(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        except OSError as e:
            raise ConfigError(
                f"cannot write the manufacturer CA in {directory}: {e.strerror}"
            ) from e
        logger.info("created manufacturer CA in %s", directory)
        return cls(directory, cert=cert, key=key)

    @classmethod
    def load(cls, directory: Path) -> ManufacturerCA:
        """Load the CA of ``directory``. Warns (file key).

        Raises:
            ConfigError: it is missing or unreadable.
        """
        directory = Path(directory)
        _warn_file_key(directory / "ca.key")
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except OSError as e:
            raise ConfigError(
                f"cannot load the manufacturer CA in {directory}: {e.strerror}"
            ) from e
        except ValueError as e:
            raise ConfigError(f"the manufacturer CA in {directory} is corrupt") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"the manufacturer CA key in {directory} is not an EC key")
        return cls(directory, cert=cert, key=key)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        serial: str,
        hardware_id: str,
        now: dt.datetime,
        lifetime: dt.timedelta = DEFAULT_FACTORY_CERT_LIFETIME,
    ) -> x509.Certificate:
        """Issue the factory certificate of a device's factory key.

        Raises:
            ValueError: the serial or hardware id is malformed.
        """
        check_device_serial(serial)
        check_hardware_id(hardware_id)
        return (
            device_leaf_builder(
                issuer=self.cert.subject,
                public_key=public_key,
                serial=serial,
                hardware_id=hardware_id,
                now=now,
                lifetime=lifetime,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    def issue_to_files(
        self,
        *,
        serial: str,
        hardware_id: str,
        cert_path: Path,
        key_path: Path,
        lifetime: dt.timedelta = DEFAULT_FACTORY_CERT_LIFETIME,
    ) -> x509.Certificate:
        """Make a factory key (EC P-256, written mode 0600; warns) and its certificate.

        Raises:
            ConfigError: the files cannot be written.
            ValueError: the serial or hardware id is malformed.
        """
        warn_insecure(f"the factory key {key_path} is a file (development only)")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue(
            key.public_key(), serial=serial, hardware_id=hardware_id,
            now=dt.datetime.now(dt.UTC), lifetime=lifetime,
        )  # fmt: skip
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            atomic_write_bytes(key_path, pem, mode=0o600)
            atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        except OSError as e:
            raise ConfigError(f"cannot write the factory identity: {e.strerror}") from e
        return cert
