"""Device identity on the server: the fleet operator API and EST enrollment (RFC 7030).

URL layout::

    POST /api/v1/devices                      operator: register a device, get its token
    POST /api/v1/devices/{serial}/quarantine  operator: refuse it until released
    POST /api/v1/devices/{serial}/release     operator: end a quarantine
    POST /api/v1/devices/{serial}/revoke      operator: refuse it for good
    POST /api/v1/devices/{serial}/token       operator: a new enrollment token
    GET  /.well-known/est/cacerts             the device CA (base64 DER PKCS#7 certs-only)
    POST /.well-known/est/simpleenroll        HTTP Basic serial:token, or a factory
                                              certificate as TLS client certificate
                                              (RFC 7030 3.3.2); base64 DER PKCS#10
    POST /.well-known/est/simplereenroll      the current device certificate

Listing and showing devices are the inventory's (:mod:`.inventory`). "operator" above is
the role each route needs (:mod:`.auth`); every one of them is audited (:mod:`.audit`).

Enrollment tokens are 256 random bits, shown once, stored only as their SHA-256, bound
to one serial, single use and short-lived. The certificate's subject and hardware id come
from the registry; the CSR contributes only its public key (after proving possession).

Factory enrollment (ADR 0005): when the server trusts a manufacturer CA, a device may
authenticate ``simpleenroll`` with its factory certificate instead of a token. Its serial
and hardware id must match the registry (the operator registers the device first: unknown
serials are refused), a revoked or quarantined device is refused, and a device that still
holds an unexpired device certificate must renew with it instead.
"""

import base64
import binascii
import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from fastapi import APIRouter, HTTPException, Request, Security
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field

from otaguard.crypto.device_ca import DeviceCA, check_device_csr
from otaguard.crypto.manufacturer import verify_factory_certificate
from otaguard.model.errors import (
    AccessDeniedError,
    OperatorError,
    StateConflictError,
    VerificationError,
)
from otaguard.model.names import (
    DEVICE_SERIAL_PATTERN,
    HARDWARE_ID_PATTERN,
    MAX_HARDWARE_ID,
    check_device_serial,
    check_hardware_id,
)
from otaguard.server._api import ErrorBody, StrictRequest
from otaguard.server._tls import client_certificate_der, client_certificate_error
from otaguard.server.audit import role_route
from otaguard.server.auth import OperatorAuth, Role, note_audit
from otaguard.server.device_auth import AuthenticatedDevice, DeviceGate
from otaguard.server.storage.base import DeviceRecord, DeviceStanding, DeviceState, DeviceStore

__all__ = [
    "ENROLLMENT_TOKEN_BYTES",
    "EST_CERTS_MEDIA_TYPE",
    "DeviceBody",
    "FleetServices",
    "NewDeviceBody",
    "est_router",
    "factory_device",
    "fleet_router",
    "hash_token",
]

logger = logging.getLogger(__name__)

#: 256 random bits: far beyond guessing, and above the 128-bit floor of the design
ENROLLMENT_TOKEN_BYTES: Final = 32
# A CSR is a few hundred bytes (base64 of at most MAX_CSR_BYTES).
MAX_EST_REQUEST_BYTES: Final = 32 * 1024
EST_CERTS_MEDIA_TYPE: Final = "application/pkcs7-mime; smime-type=certs-only"
EST_CSR_MEDIA_TYPE: Final = "application/pkcs10"

_SERIAL_PARAM: Final = PathParam(description="device serial", pattern=f"^{DEVICE_SERIAL_PATTERN}$")


# The EST request body: a CSR, base64 DER PKCS#10 (RFC 7030 §4.2).
_CSR_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            EST_CSR_MEDIA_TYPE: {"schema": {"type": "string", "description": "base64 DER PKCS#10"}}
        },
    }
}


def hash_token(token: str) -> str:
    """Return the stored form of an enrollment token (SHA-256 hex)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class FleetServices:
    """What the device-identity routes use.

    ``manufacturer_cas`` are the manufacturer CAs whose factory certificates may enroll
    a device in place of a token; empty: factory enrollment is off.
    """

    devices: DeviceStore
    ca: DeviceCA
    clock: Callable[[], dt.datetime]
    cert_lifetime: dt.timedelta
    token_lifetime: dt.timedelta
    manufacturer_cas: tuple[x509.Certificate, ...] = ()


class DeviceBody(BaseModel):
    """One device of the registry."""

    serial: str
    hardware_id: str
    status: str = Field(description="registered, enrolled, quarantined or revoked")
    reason: str = Field(description="why it was quarantined or revoked")
    cert_serials: list[str] = Field(description="serial numbers (hex) of issued certificates")
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, rec: DeviceRecord) -> "DeviceBody":
        """Build the response body of a registry record."""
        return cls(
            serial=rec.serial,
            hardware_id=rec.hardware_id,
            status=rec.status.value,
            reason=rec.reason,
            cert_serials=list(rec.cert_serials),
            created_at=rec.created_at,
            updated_at=rec.updated_at,
        )


class NewDeviceRequest(StrictRequest):
    """A device to register."""

    serial: str = Field(pattern=f"^{DEVICE_SERIAL_PATTERN}$", max_length=64)
    hardware_id: str = Field(pattern=f"^{HARDWARE_ID_PATTERN}$", max_length=MAX_HARDWARE_ID)


class NewDeviceBody(BaseModel):
    """A registered device and its single-use enrollment token (shown only here)."""

    device: DeviceBody
    token: str = Field(description="single-use enrollment token; store it nowhere")
    token_expires: dt.datetime


class ReasonRequest(StrictRequest):
    """Why an operator quarantines or revokes a device."""

    reason: str = Field(min_length=1, max_length=500)


_OP_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorBody, "description": "Not allowed as asked"},
    404: {"model": ErrorBody, "description": "No such device"},
    422: {"model": ErrorBody, "description": "Malformed request"},
}


def _new_token(svc: FleetServices) -> tuple[str, str, dt.datetime]:
    token = secrets.token_urlsafe(ENROLLMENT_TOKEN_BYTES)
    return token, hash_token(token), svc.clock() + svc.token_lifetime


def fleet_router(svc: FleetServices, auth: OperatorAuth) -> APIRouter:
    """The operator's device registry API under ``/api/v1/devices`` (role ``operator``)."""
    router = APIRouter(prefix="/api/v1/devices", tags=["fleet"], responses=_OP_ERRORS)

    def audited(action: str) -> dict[str, Any]:
        return role_route(auth, Role.OPERATOR, action)

    @router.post("", summary="Register a device", status_code=201, **audited("device.add"))
    def add_device(req: NewDeviceRequest, request: Request) -> NewDeviceBody:
        """Register a device and return its single-use enrollment token and its expiry.

        The token is stored only as a hash: this answer is the only place it appears.
        """
        note_audit(request, target=req.serial, detail=f"hardware id {req.hardware_id}")
        try:
            check_device_serial(req.serial)
            check_hardware_id(req.hardware_id)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        token, digest, expires = _new_token(svc)
        rec = svc.devices.add(
            req.serial, req.hardware_id, token_hash=digest, token_expires=expires, now=svc.clock()
        )
        return NewDeviceBody(device=DeviceBody.of(rec), token=token, token_expires=expires)

    def _get(serial: str) -> DeviceRecord:
        rec = svc.devices.get(serial)
        if rec is None:
            raise HTTPException(404, f"no device {serial!r} in the registry")
        return rec

    @router.post(
        "/{serial}/quarantine", summary="Quarantine a device", **audited("device.quarantine")
    )
    def quarantine(
        serial: Annotated[str, _SERIAL_PARAM], req: ReasonRequest, request: Request
    ) -> DeviceBody:
        """Refuse the device on its next request until it is released."""
        note_audit(request, detail=req.reason)
        rec = svc.devices.set_status(
            serial, DeviceState.QUARANTINED, reason=req.reason, now=svc.clock()
        )
        logger.warning("device %s quarantined: %s", serial, req.reason)
        return DeviceBody.of(rec)

    @router.post(
        "/{serial}/release", summary="Release a quarantined device", **audited("device.release")
    )
    def release(serial: Annotated[str, _SERIAL_PARAM]) -> DeviceBody:
        """End a quarantine: the device is served again (enrolled if it has a certificate)."""
        rec = _get(serial)
        if rec.status is not DeviceState.QUARANTINED:
            raise StateConflictError(f"device {serial!r} is {rec.status.value}, not quarantined")
        status = DeviceState.ENROLLED if rec.cert_serials else DeviceState.REGISTERED
        return DeviceBody.of(svc.devices.set_status(serial, status, reason="", now=svc.clock()))

    @router.post("/{serial}/revoke", summary="Revoke a device for good", **audited("device.revoke"))
    def revoke(
        serial: Annotated[str, _SERIAL_PARAM], request: Request, req: ReasonRequest | None = None
    ) -> DeviceBody:
        """Refuse the device from its next request on; it can never enroll again."""
        reason = req.reason if req is not None else "revoked by the operator"
        note_audit(request, detail=reason)
        rec = svc.devices.set_status(serial, DeviceState.REVOKED, reason=reason, now=svc.clock())
        logger.warning("device %s revoked: %s", serial, reason)
        return DeviceBody.of(rec)

    @router.post("/{serial}/token", summary="New enrollment token", **audited("device.token"))
    def new_token(serial: Annotated[str, _SERIAL_PARAM]) -> NewDeviceBody:
        """Issue a new single-use token (re-enrollment); earlier unused ones stop working."""
        token, digest, expires = _new_token(svc)
        rec = svc.devices.new_token(
            serial, token_hash=digest, token_expires=expires, now=svc.clock()
        )
        return NewDeviceBody(device=DeviceBody.of(rec), token=token, token_expires=expires)

    return router


async def _read_base64_body(request: Request, what: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_EST_REQUEST_BYTES:
        raise HTTPException(413, f"request body exceeds {MAX_EST_REQUEST_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_EST_REQUEST_BYTES:
            raise HTTPException(413, f"request body exceeds {MAX_EST_REQUEST_BYTES} bytes")
    try:
        return base64.b64decode(b"".join(bytes(body).split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise VerificationError(f"the {what} is not base64") from e


def _certs_response(der_pkcs7: bytes) -> Response:
    return Response(
        content=base64.encodebytes(der_pkcs7),
        media_type=EST_CERTS_MEDIA_TYPE,
        headers={"Content-Transfer-Encoding": "base64", "Cache-Control": "no-store"},
    )


def issue_certificate(
    svc: FleetServices, rec: DeviceRecord | DeviceStanding, csr_der: bytes
) -> bytes:
    """Issue and record a certificate for a checked device; returns the PKCS#7 (DER).

    Raises:
        VerificationError: the CSR is malformed or fails a check.
    """
    csr = check_device_csr(csr_der, serial=rec.serial)
    now = svc.clock()
    cert = svc.ca.issue(
        csr,
        serial=rec.serial,
        hardware_id=rec.hardware_id,
        now=now,
        lifetime=svc.cert_lifetime,
    )
    svc.devices.record_certificate(
        rec.serial, format(cert.serial_number, "x"), not_after=cert.not_valid_after_utc, now=now
    )
    return pkcs7.serialize_certificates([cert, svc.ca.issuing], serialization.Encoding.DER)


def _refuse_factory(reason: str, subject: str) -> AccessDeniedError:
    logger.warning("factory enrollment refused: %s (presented subject: %s)", reason, subject)
    return AccessDeniedError(f"factory enrollment refused: {reason}")


def factory_device(svc: FleetServices, scope: object) -> DeviceRecord | None:
    """The registry entry a request's factory certificate may enroll, after every check.

    Returns:
        ``None`` when the request carries no client certificate.

    Raises:
        AccessDeniedError: the certificate or the device is refused; the reason is given
            and logged with the presented subject.
    """
    forwarded_error = client_certificate_error(scope)
    if forwarded_error is not None:
        raise _refuse_factory(forwarded_error, "?")
    try:
        der = client_certificate_der(scope)
        cert = x509.load_der_x509_certificate(der) if der is not None else None
    except ValueError as e:
        raise _refuse_factory("the client certificate is unreadable", "?") from e
    if cert is None:
        return None
    subject = cert.subject.rfc4514_string()
    if not svc.manufacturer_cas:
        raise _refuse_factory("this server trusts no manufacturer CA", subject)
    now = svc.clock()
    try:
        ident = verify_factory_certificate(cert, trusted=svc.manufacturer_cas, now=now)
    except VerificationError as e:
        raise _refuse_factory(str(e), subject) from e
    rec = svc.devices.get(ident.serial)
    if rec is None:
        raise _refuse_factory(
            f"device {ident.serial} is not in the registry (the operator registers it first)",
            subject,
        )
    if rec.hardware_id != ident.hardware_id:
        raise _refuse_factory(
            f"the factory certificate names hardware id {ident.hardware_id}, the registry "
            f"{rec.hardware_id}",
            subject,
        )
    if rec.status in (DeviceState.REVOKED, DeviceState.QUARANTINED):
        raise _refuse_factory(f"device {rec.serial} is {rec.status.value}: {rec.reason}", subject)
    if rec.certs_valid_until is not None and rec.certs_valid_until > now:
        raise _refuse_factory(
            f"device {rec.serial} holds a certificate valid until "
            f"{rec.certs_valid_until:%Y-%m-%dT%H:%M:%SZ}: renew with it (simplereenroll)",
            subject,
        )
    return rec


_EST_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": ErrorBody, "description": "No HTTP Basic credentials"},
    403: {"model": ErrorBody, "description": "Token or device refused (reason given)"},
    422: {"model": ErrorBody, "description": "CSR refused (reason given)"},
}
_CERTS_CONTENT: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "content": {EST_CERTS_MEDIA_TYPE: {"schema": {"type": "string", "format": "base64"}}},
        "description": "base64 DER PKCS#7 certs-only",
    }
}


def est_router(
    svc: FleetServices,
    gate: DeviceGate,
    *,
    before_renewal: Callable[[AuthenticatedDevice], None],
) -> APIRouter:
    """EST (RFC 7030) enrollment and renewal under ``/.well-known/est``.

    ``before_renewal`` may refuse a renewal (a device with a TPM attestation key renews
    only right after an attested check-in).
    """
    router = APIRouter(prefix="/.well-known/est", tags=["enrollment"])
    basic = HTTPBasic(
        auto_error=False,
        scheme_name="enrollmentToken",
        description="user name = device serial, password = its enrollment token",
    )

    @router.get(
        "/cacerts",
        summary="Device CA certificates",
        response_class=Response,
        responses=_CERTS_CONTENT,
    )
    def cacerts() -> Response:
        """The issuing CA and root that sign device certificates (base64 DER PKCS#7)."""
        return _certs_response(
            pkcs7.serialize_certificates([svc.ca.issuing, svc.ca.root], serialization.Encoding.DER)
        )

    @router.post(
        "/simpleenroll",
        summary="Enroll a device (token)",
        response_class=Response,
        responses={**_CERTS_CONTENT, **_EST_ERRORS},
        openapi_extra=_CSR_BODY,
    )
    async def simpleenroll(
        request: Request,
        creds: Annotated[HTTPBasicCredentials | None, Security(basic)],
    ) -> Response:
        """Issue the device certificate for a CSR, once per enrollment token.

        The CSR must be signed by its key (proof of possession), name the serial as its
        CN and hold an EC P-256 key; the token must be the serial's, unused and unexpired.
        Without a token, a factory certificate from a trusted manufacturer CA presented
        as the TLS client certificate authenticates the request (RFC 7030 3.3.2) for the
        serial and hardware id it names, as registered.
        """
        if creds is None:
            factory = await run_in_threadpool(factory_device, svc, request.scope)
            if factory is None:
                raise HTTPException(
                    401,
                    "enrollment needs HTTP Basic serial:token or a factory certificate",
                    headers={"WWW-Authenticate": "Basic"},
                )
            der = await _read_base64_body(request, "CSR")
            check_device_csr(der, serial=factory.serial)
            der_pkcs7 = await run_in_threadpool(issue_certificate, svc, factory, der)
            logger.info("device %s enrolled with its factory certificate", factory.serial)
            return _certs_response(der_pkcs7)
        try:
            serial = check_device_serial(creds.username)
        except ValueError as e:
            raise AccessDeniedError(str(e)) from e
        der = await _read_base64_body(request, "CSR")
        # The CSR is checked before the token is spent, so a bad request can be retried.
        check_device_csr(der, serial=serial)
        rec = await run_in_threadpool(
            svc.devices.redeem_token, serial, hash_token(creds.password), now=svc.clock()
        )
        der_pkcs7 = await run_in_threadpool(issue_certificate, svc, rec, der)
        logger.info("device %s enrolled", serial)
        return _certs_response(der_pkcs7)

    @router.post(
        "/simplereenroll",
        summary="Renew a device certificate (client certificate)",
        response_class=Response,
        responses={**_CERTS_CONTENT, **_EST_ERRORS},
        openapi_extra=_CSR_BODY,
    )
    async def simplereenroll(request: Request) -> Response:
        """Issue a new certificate to a device authenticated by its current one.

        The current certificate must be valid (not expired, issued by the registry to
        this device, device neither quarantined nor revoked); the CSR must name the same
        serial. An expired certificate cannot renew: the device enrolls again with a
        new token.
        """
        dev = await run_in_threadpool(gate.authenticate, request.scope)
        if dev is None:
            raise AccessDeniedError("renewal needs the current client certificate")
        await run_in_threadpool(before_renewal, dev)
        der = await _read_base64_body(request, "CSR")
        check_device_csr(der, serial=dev.record.serial)
        der_pkcs7 = await run_in_threadpool(issue_certificate, svc, dev.record, der)
        logger.info("device %s renewed its certificate", dev.record.serial)
        return _certs_response(der_pkcs7)

    return router
