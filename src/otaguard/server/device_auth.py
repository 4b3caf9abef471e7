"""Who is asking, from the verified client certificate: the device routes' gate.

Checked on every request, so quarantine and revocation take effect on the very next one:
the TLS layer (or a trusted proxy that forwarded it) verified the certificate against the
device CA (:mod:`._tls` puts it into the ASGI scope); here its signature is verified
against the device issuing CA once more -- a forwarded certificate was checked by another
process, and a manufacturer CA the TLS layer also trusts must never mint device
identities --, the serial comes from its subject CN (never from the request),
the certificate must not be expired, its serial number must be one the registry issued
to that device, and the device must be neither revoked nor quarantined. The checks of
the certificate's bytes (parse, issuer, signature, identity) are kept per certificate
(:data:`VERIFIED_CERTIFICATES_KEPT`): the same bytes always give the same answer. The
validity period and the registry -- what changes -- are checked on every request. A refusal is a
403 with a one-line reason, logged at WARNING with the presented subject.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from threading import Lock
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from otaguard.crypto.device_ca import DeviceIdentity, device_identity
from otaguard.model.errors import AccessDeniedError, OtaguardError
from otaguard.server._tls import (
    client_certificate_der,
    client_certificate_error,
    client_certificate_proxy,
)
from otaguard.server.storage.base import DeviceStanding, DeviceState, DeviceStore

__all__ = [
    "VERIFIED_CERTIFICATES_KEPT",
    "AuthenticatedDevice",
    "DeviceGate",
    "PresentedCertificate",
]

logger = logging.getLogger(__name__)

#: certificates whose signature the gate verified, kept (about 2 KiB each) so a device's
#: next request does not parse and verify the same bytes again; the validity period and
#: the registry are still checked on every request. Each worker behind a balancer sees
#: the whole fleet: 4,096 made every check-in of a 10,000-device fleet verify again.
VERIFIED_CERTIFICATES_KEPT: Final = 16384


@dataclass(frozen=True)
class AuthenticatedDevice:
    """A device whose certificate passed every check.

    Attributes:
        record: its standing in the registry as read for this request (status, the
            certificate issued to it, its attestation key).
        identity: what its certificate says.
        certificate: the certificate itself.
    """

    record: DeviceStanding
    identity: DeviceIdentity
    certificate: x509.Certificate


@dataclass(frozen=True)
class PresentedCertificate:
    """A client certificate that passed the gate's checks of the certificate alone.

    Attributes:
        certificate: the certificate.
        identity: what it says.
        subject: its subject, for the log line of a refusal.
    """

    certificate: x509.Certificate
    identity: DeviceIdentity
    subject: str


class DeviceGate:
    """Authenticates device requests by their verified client certificate."""

    def __init__(
        self,
        devices: DeviceStore,
        *,
        issuing_ca: x509.Certificate,
        clock: Callable[[], dt.datetime],
        required: bool,
    ):
        """Prepare the gate.

        Args:
            devices: the registry.
            issuing_ca: the device CA's issuing CA (certificates must be signed by it).
            clock: the server's notion of now.
            required: refuse requests without a client certificate; ``False`` only in
                the named insecure development mode.
        """
        self._devices = devices
        self._issuing_ca = issuing_ca
        self._lock = Lock()
        # certificate DER -> its checks passed (bytes, issuer and signature never change)
        self._verified: OrderedDict[bytes, PresentedCertificate] = OrderedDict()
        self._clock = clock
        self.required = required

    def _refuse(self, reason: str, subject: str, scope: object) -> AccessDeniedError:
        proxy = client_certificate_proxy(scope)
        via = f", via proxy {proxy}" if proxy else ""
        logger.warning("device request refused: %s (presented subject: %s%s)", reason, subject, via)
        return AccessDeniedError(reason)

    def authenticate(self, scope: object) -> AuthenticatedDevice | None:
        """Return the device a request's certificate names, after every check.

        :meth:`certificate` and then :meth:`admit`.

        Returns:
            The device, or ``None`` for a request without a certificate when client
            certificates are not required (insecure development mode).

        Raises:
            AccessDeniedError: no certificate, or the certificate or device is refused;
                the message is the reason.
        """
        presented = self.certificate(scope)
        return None if presented is None else self.admit(presented, scope)

    def certificate(self, scope: object) -> PresentedCertificate | None:
        """The checks of the certificate itself, without the registry (no I/O).

        Returns:
            The certificate and what it says, or ``None`` for a request without one when
            client certificates are not required (insecure development mode).

        Raises:
            AccessDeniedError: no certificate, or it is refused; the message is the reason.
        """
        forwarded_error = client_certificate_error(scope)
        if forwarded_error is not None:
            raise self._refuse(forwarded_error, "?", scope)
        try:
            der = client_certificate_der(scope)
        except ValueError as e:
            raise self._refuse("the client certificate is unreadable", "?", scope) from e
        if der is None:
            if not self.required:
                return None
            raise self._refuse(
                "a client certificate is required (enroll the device)", "none", scope
            )
        with self._lock:
            known = self._verified.get(der)
            if known is not None:
                self._verified.move_to_end(der)
        presented = known or self._verify(der, scope)
        self._check_validity(presented, scope)
        return presented

    def _verify(self, der: bytes, scope: object) -> PresentedCertificate:
        """The checks of the certificate's bytes (the same bytes always pass or fail)."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as e:
            raise self._refuse("the client certificate is unreadable", "?", scope) from e
        subject = cert.subject.rfc4514_string()
        if cert.issuer != self._issuing_ca.subject:
            raise self._refuse("the client certificate is not from the device CA", subject, scope)
        try:
            cert.verify_directly_issued_by(self._issuing_ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise self._refuse(
                "the client certificate's signature does not verify against the device CA",
                subject,
                scope,
            ) from e
        try:
            ident = device_identity(cert)
        except OtaguardError as e:
            raise self._refuse("the client certificate names no device", subject, scope) from e
        presented = PresentedCertificate(certificate=cert, identity=ident, subject=subject)
        with self._lock:
            self._verified[der] = presented
            while len(self._verified) > VERIFIED_CERTIFICATES_KEPT:
                self._verified.popitem(last=False)
        return presented

    def _check_validity(self, presented: PresentedCertificate, scope: object) -> None:
        """The certificate's validity period against now (checked on every request)."""
        cert, ident, subject = presented.certificate, presented.identity, presented.subject
        now = self._clock()
        if cert.not_valid_after_utc <= now:
            raise self._refuse(
                f"the client certificate of {ident.serial} expired at "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; re-enroll",
                subject,
                scope,
            )
        if cert.not_valid_before_utc > now:
            raise self._refuse("the client certificate is not valid yet", subject, scope)

    def admit(self, presented: PresentedCertificate, scope: object) -> AuthenticatedDevice:
        """The registry's checks of a certificate :meth:`certificate` passed (one read).

        Read on every request, never cached: a quarantine or revocation by any server
        process refuses the device's very next request.

        Raises:
            AccessDeniedError: the device or this certificate is refused (the reason).
        """
        ident, subject = presented.identity, presented.subject
        rec = self._devices.standing(ident.serial, cert_serial=ident.cert_serial)
        if rec is None:
            raise self._refuse(f"device {ident.serial} is not in the registry", subject, scope)
        if not rec.cert_issued:
            raise self._refuse(
                f"certificate {ident.cert_serial} was not issued to device {ident.serial} "
                "by the registry",
                subject,
                scope,
            )
        if rec.status in (DeviceState.REVOKED, DeviceState.QUARANTINED):
            raise self._refuse(
                f"device {ident.serial} is {rec.status.value}: {rec.reason}", subject, scope
            )
        return AuthenticatedDevice(record=rec, identity=ident, certificate=presented.certificate)
