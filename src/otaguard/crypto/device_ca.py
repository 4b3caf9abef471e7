"""The device CA: a self-signed root and an issuing CA that signs device certificates.

Layout of ``DATA/device-ca/`` (keys mode 0600, directory 0700)::

    root.pem  root.key        self-signed root (EC P-256), signs only the issuing CA
    issuing.pem  issuing.key  issuing CA (EC P-256), signs device certificates
    chain.pem                 issuing + root: what the server verifies clients against

A device certificate names the device by its serial (subject CN) and carries its
hardware id as a SAN URI ``urn:otaguard:hw:<hardware id>`` (hardware ids use only
URI-safe characters, see :func:`otaguard.model.names.check_hardware_id`). The hardware id
comes from the fleet registry, never from the device's request. The certificate allows
client authentication only (EKU clientAuth) and lives for a day by default.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
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
from otaguard.model.errors import ConfigError, VerificationError

__all__ = [
    "DEVICE_CA_DIR",
    "HARDWARE_ID_URI_PREFIX",
    "MAX_CSR_BYTES",
    "SERVICE_NAME_PATTERN",
    "DeviceCA",
    "DeviceIdentity",
    "check_device_csr",
    "device_identity",
    "device_leaf_builder",
]

logger = logging.getLogger(__name__)

#: a service identity's name (the server's MQTT client): it holds a ':' so that no device
#: serial (letters, digits, '.', '_', '-') can ever be the same MQTT username
SERVICE_NAME_PATTERN: Final = r"otaguard:[a-z0-9-]{1,48}"

DEVICE_CA_DIR: Final = "device-ca"
HARDWARE_ID_URI_PREFIX: Final = "urn:otaguard:hw:"
# The root signs only the issuing CA; ten years, rotated by replacing the directory.
ROOT_VALIDITY: Final = dt.timedelta(days=3650)
# The issuing CA can be replaced under the same root without touching devices' trust.
ISSUING_VALIDITY: Final = dt.timedelta(days=1825)
# Clock skew between server and devices: certificates start a little in the past.
BACKDATE: Final = dt.timedelta(minutes=5)
# A P-256 CSR is a few hundred bytes; anything large is not a CSR.
MAX_CSR_BYTES: Final = 16 * 1024


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a device certificate names.

    Attributes:
        serial: the device serial (subject CN).
        hardware_id: the hardware id from the SAN URI, ``None`` if absent.
        cert_serial: the certificate's serial number, as lowercase hex.
    """

    serial: str
    hardware_id: str | None
    cert_serial: str


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def device_identity(cert: x509.Certificate) -> DeviceIdentity:
    """Read the serial, hardware id and certificate serial number of a device certificate.

    Raises:
        VerificationError: the certificate has no single subject CN.
    """
    serial = _cn(cert.subject)
    if serial is None:
        raise VerificationError("the device certificate has no single subject CN")
    hardware_id = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(HARDWARE_ID_URI_PREFIX):
                hardware_id = uri.removeprefix(HARDWARE_ID_URI_PREFIX)
    except x509.ExtensionNotFound:
        pass
    return DeviceIdentity(serial, hardware_id, format(cert.serial_number, "x"))


def device_leaf_builder(
    *,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    serial: str,
    hardware_id: str,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.CertificateBuilder:
    """What every certificate naming a device shares (device CA and manufacturer CA): CN =
    serial, the hardware id as a SAN URI, not a CA, backdated by :data:`BACKDATE`. The
    issuer adds its key usages and signs."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(HARDWARE_ID_URI_PREFIX + hardware_id)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )


def check_device_csr(der: bytes, *, serial: str) -> x509.CertificateSigningRequest:
    """Parse and check a device's PKCS#10 request (proof of possession, name, key type).

    Args:
        der: the DER-encoded CSR.
        serial: the serial the requester authenticated as.

    Raises:
        VerificationError: not a CSR, its signature does not verify, its CN is not
            ``serial``, or its key is not EC P-256.
    """
    if len(der) > MAX_CSR_BYTES:
        raise VerificationError(f"the CSR exceeds {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as e:
        raise VerificationError("the request body is not a DER PKCS#10 CSR") from e
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, InvalidSignature) as e:
        raise VerificationError("the CSR signature does not verify") from e
    if not valid:
        raise VerificationError("the CSR signature does not verify (no proof of possession)")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise VerificationError("the CSR key must be EC P-256")
    cn = _cn(csr.subject)
    if cn != serial:
        raise VerificationError(f"the CSR subject CN {cn!r} is not the device serial {serial!r}")
    return csr


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
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


def _load_pair(
    key_path: Path, cert_path: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the device CA {cert_path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"device CA key {key_path} is not an EC key")
    return key, cert


class DeviceCA:
    """The root and issuing CA of the fleet's device certificates."""

    def __init__(
        self,
        directory: Path,
        *,
        root: x509.Certificate,
        issuing: x509.Certificate,
        issuing_key: ec.EllipticCurvePrivateKey,
    ):
        self.directory = directory
        self.root = root
        self.issuing = issuing
        self._key = issuing_key

    @property
    def chain_path(self) -> Path:
        """PEM file with the issuing CA and the root: the server's client-cert trust."""
        return self.directory / "chain.pem"

    @property
    def root_path(self) -> Path:
        """PEM file of the root certificate."""
        return self.directory / "root.pem"

    @classmethod
    def load_or_create(cls, directory: Path, *, now: dt.datetime | None = None) -> DeviceCA:
        """Load the device CA in ``directory``, creating root and issuing CA on first use.

        Raises:
            ConfigError: an existing CA is unreadable or cannot be created.
        """
        directory = Path(directory)
        names = ("root.key", "root.pem", "issuing.key", "issuing.pem", "chain.pem")
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            present = [(directory / n).exists() for n in names]
        except OSError as e:
            raise ConfigError(f"cannot create {directory}: {e.strerror}") from e
        if all(present):
            _, root = _load_pair(directory / "root.key", directory / "root.pem")
            key, issuing = _load_pair(directory / "issuing.key", directory / "issuing.pem")
            if issuing.issuer != root.subject:
                raise ConfigError(f"the issuing CA in {directory} is not issued by its root")
            return cls(directory, root=root, issuing=issuing, issuing_key=key)
        if any(present):
            raise ConfigError(
                f"device CA {directory} is incomplete; restore it from backup "
                "(re-creating it would invalidate every device certificate)"
            )
        return cls._create(directory, now or dt.datetime.now(dt.UTC))

    @classmethod
    def _create(cls, directory: Path, now: dt.datetime) -> DeviceCA:
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otaguard device root CA")])
        root = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
            )
            .sign(root_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        issuing = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otaguard device issuing CA")])
            )
            .issuer_name(root_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ISSUING_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                critical=False,
            )
            .sign(root_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        try:
            write_unattended_key(directory / "root.key", root_key)
            atomic_write_bytes(directory / "root.pem", root.public_bytes(pem))
            write_unattended_key(directory / "issuing.key", key)
            atomic_write_bytes(directory / "issuing.pem", issuing.public_bytes(pem))
            atomic_write_bytes(
                directory / "chain.pem", issuing.public_bytes(pem) + root.public_bytes(pem)
            )
        except OSError as e:
            raise ConfigError(f"cannot write the device CA in {directory}: {e.strerror}") from e
        logger.info("created device CA in %s", directory)
        return cls(directory, root=root, issuing=issuing, issuing_key=key)

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        serial: str,
        hardware_id: str,
        now: dt.datetime,
        lifetime: dt.timedelta,
    ) -> x509.Certificate:
        """Issue a client certificate for a checked CSR (see :func:`check_device_csr`).

        Only the CSR's public key is used: the name and hardware id come from the caller
        (the registry), never from the request.
        """
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise VerificationError("the CSR key must be EC P-256")
        return (
            device_leaf_builder(
                issuer=self.issuing.subject,
                public_key=public_key,
                serial=serial,
                hardware_id=hardware_id,
                now=now,
                lifetime=lifetime,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    def issue_service(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        name: str,
        now: dt.datetime,
        lifetime: dt.timedelta,
    ) -> x509.Certificate:
        """A client certificate for a fleet service (CN = ``name``), not a device.

        The MQTT broker trusts this CA and takes the CN as the username: a service name
        cannot be a device serial (:data:`SERVICE_NAME_PATTERN`), and the device routes
        refuse it (no registry entry issued it).

        Raises:
            ConfigError: ``name`` is not a service name.
        """
        if not re.fullmatch(SERVICE_NAME_PATTERN, name):
            raise ConfigError(f"service name {name[:64]!r} must match {SERVICE_NAME_PATTERN}")
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.issuing.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
