"""Zero-trust check-in: a fresh nonce, a signed device manifest, measured-boot checks.

URL layout::

    POST /api/v1/device/nonce            device: a fresh single-use nonce (mutual TLS)
    POST /api/v1/device/checkin          device: its signed manifest answering the nonce
    POST /api/v1/device/attestation-key  device: register its TPM attestation key, once
    GET  /api/v1/devices/{serial}/checkins  operator: last check-ins and alerts

Every device request is authenticated by its verified client certificate
(:class:`~otaguard.server.device_auth.DeviceGate`), so a quarantined or revoked device
is refused at its very next nonce request. The manifest is verified by pure code
(:mod:`.checkin_verify`, :mod:`.attestation`); this module does the I/O around it.

What a check-in decides, and why (ADR 0007):

* the manifest is refused (403, nothing recorded but the log line) when its signature,
  serial or nonce is wrong -- replays and cross-device reports never count;
* a device that registered an attestation key must present a valid quote; a missing or
  invalid one, or a boot measurement that is not the sha256 the image repository lists
  for the target the device says it runs, **quarantines** the device with the reason and
  records an alert (the check-in itself is kept in the history as ``quarantined``);
* otherwise the check-in is accepted and recorded, and for :data:`CHECKIN_WINDOW` the
  certificate may read ``/metadata`` and ``/targets`` (:meth:`CheckinServices.require_recent`).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from threading import Lock
from typing import Annotated, Any, Final, NoReturn, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from tuf.api.metadata import Metadata, Targets
from tuf.api.serialization import DeserializationError

from otaguard.crypto.envelope import MAX_ENVELOPE_BYTES
from otaguard.model.errors import AccessDeniedError, OperatorError, VerificationError
from otaguard.model.manifest import DeviceManifest
from otaguard.model.names import DEVICE_SERIAL_PATTERN
from otaguard.server._api import ErrorBody, StrictRequest
from otaguard.server.attestation import ListedImage, assess_boot, verify_quote
from otaguard.server.checkin_verify import CheckinRefusedError, check_nonce, verify_manifest
from otaguard.server.device_auth import AuthenticatedDevice, DeviceGate, PresentedCertificate
from otaguard.server.director import Director
from otaguard.server.storage.base import (
    CheckinRecord,
    CheckinStore,
    DeviceAlert,
    DeviceState,
    DeviceStore,
    MetadataStore,
    NonceRecord,
)
from otaguard.server.storage.monitoring import HealthNote

__all__ = [
    "CHECKIN_WINDOW",
    "NEXT_NONCE_TTL",
    "NONCE_BYTES",
    "NONCE_TTL",
    "RENEWAL_CHECKIN_WINDOW",
    "CheckinBody",
    "CheckinObserver",
    "CheckinServices",
    "NonceBody",
    "checkin_router",
    "checkins_router",
    "issue_nonce",
    "run_checkin",
]

logger = logging.getLogger(__name__)

#: 256 random bits per nonce: far above the 128-bit floor, never guessed, never repeated
NONCE_BYTES: Final = 32
#: a nonce is answered within one round trip; a minute covers a slow link and a TPM
#: quote (~100 ms on a discrete TPM) and keeps a stolen-in-transit nonce short-lived
NONCE_TTL: Final = dt.timedelta(seconds=60)
#: the nonce handed out with an accepted check-in, for the device's next one (one request
#: per check-in, ADR 0036): the next poll is minutes away (5 by default, jittered), a day
#: covers long intervals and hours offline. Past it the device asks for a fresh nonce
#: (one request more), so nothing fails. Still single use, bound to the device and its
#: certificate, useless without the device key; it travels inside mutual TLS only.
NEXT_NONCE_TTL: Final = dt.timedelta(hours=24)
#: after a check-in, the certificate may read metadata and images for this long: a
#: device checks in before every update check, and ngclient's fetches plus the start of
#: the image download follow within seconds; a download already started is not cut
#: off. Short, so a device that stopped checking in stops being served soon.
CHECKIN_WINDOW: Final = dt.timedelta(minutes=15)
#: renewing the certificate of a device with an attestation key needs an accepted
#: (hence attested) check-in by the current certificate this recently: "just before"
RENEWAL_CHECKIN_WINDOW: Final = dt.timedelta(minutes=2)
#: check-ins and alerts the operator API returns per device
HISTORY_LIMIT: Final = 20
# An attestation key is one PEM public key (~180 bytes).
MAX_AK_PEM_CHARS: Final = 1024


class CheckinObserver(Protocol):
    """What the check-in tells fleet monitoring (:class:`~otaguard.server.monitor.Monitor`)."""

    def checkin_refused(self, reason: str) -> None:
        """A check-in was refused before it was recorded."""

    def checkin_note(
        self, *, serial: str, hardware_id: str, manifest: DeviceManifest, now: dt.datetime
    ) -> HealthNote:
        """The health row a check-in writes with its record (in the same statement)."""

    def note_checkin(self, note: HealthNote) -> None:
        """Inside the check-in's transaction: write ``note`` (a quarantining check-in)."""

    def note_instructed(
        self, *, serial: str, hardware_id: str, manifest: DeviceManifest, answer: bytes
    ) -> None:
        """Inside the answer's transaction: the instruction, if ``answer`` names an image."""

    def after_checkin(
        self,
        *,
        serial: str,
        hardware_id: str,
        manifest: DeviceManifest,
        problem: str | None,
        answer: bytes | None,
    ) -> None:
        """After the commit: a check-in was recorded (``problem``: why it quarantined
        the device)."""


class CheckinServices:
    """What the check-in routes use, and the check-in window the device routes enforce."""

    def __init__(
        self,
        *,
        checkins: CheckinStore,
        devices: DeviceStore,
        metadata: MetadataStore,
        clock: Callable[[], dt.datetime],
        director: Director | None = None,
        unit: Callable[[], AbstractContextManager[object]] = nullcontext,
        answer_in_unit: bool = False,
    ):
        """Use these stores and this clock (the server's notion of now).

        ``director``: answers each accepted check-in with the device's signed
        instruction; ``None`` (no ``--director``) answers with acceptance only.
        ``unit``: opens one transaction for the store calls of one request
        (:func:`~otaguard.server.storage.unit.unit_of_work` of the stores' engine): a
        nonce or a check-in is one connection and one commit, not one per statement.
        ``answer_in_unit``: the director's answer joins the check-in's unit (one
        connection per check-in; PostgreSQL, whose row locks block no other device),
        rather than a unit of its own after the commit (SQLite: its one write lock,
        taken by the nonce claim, would be held through the policy and the signing, and
        other requests' deferred transactions that read before it commits fail to
        upgrade to writers instead of waiting; ADR 0019).
        """
        self.unit = unit
        self.answer_in_unit = answer_in_unit
        self.director = director
        self.checkins = checkins
        self.devices = devices
        self.metadata = metadata
        self.clock = clock
        #: told of every check-in and refusal (fleet monitoring, ADR 0026); set by the app
        self.monitor: CheckinObserver | None = None
        self._index_lock = Lock()
        # (newest targets version indexed, [(image, its hardware ids)])
        self._index: tuple[int, list[tuple[ListedImage, frozenset[str]]]] = (0, [])

    def require_recent(self, dev: AuthenticatedDevice, *, window: dt.timedelta) -> None:
        """Refuse a device whose certificate has no accepted check-in within ``window``.

        Raises:
            AccessDeniedError: no recent check-in (the reason says what to do).
        """
        last = self.checkins.last_accepted(dev.identity.cert_serial)
        if last is None or self.clock() - last > window:
            logger.warning(
                "device request refused: %s has no check-in by certificate %s in the last %d s",
                dev.record.serial,
                dev.identity.cert_serial,
                window.total_seconds(),
            )
            raise AccessDeniedError(
                f"device {dev.record.serial} has not checked in with this certificate in the "
                f"last {int(window.total_seconds())} s; check in first"
            )

    def before_renewal(self, dev: AuthenticatedDevice) -> None:
        """A device with an attestation key renews only right after an attested check-in.

        Raises:
            AccessDeniedError: it has an attestation key and no such check-in.
        """
        if dev.record.attestation_key is not None:
            self.require_recent(dev, window=RENEWAL_CHECKIN_WINDOW)

    def listed_images(self, hardware_id: str) -> list[ListedImage]:
        """Every target any published targets version lists for ``hardware_id``.

        Withdrawn releases count: a device may still run one. Cached per newest
        targets version (versions are immutable once published).
        """
        # A cheap version read (not the bytes) notices a publication by any process.
        newest = self.metadata.newest_version("targets")
        if newest is None:
            return []
        with self._index_lock:
            if self._index[0] != newest:
                entries: list[tuple[ListedImage, frozenset[str]]] = []
                for version in range(1, newest + 1):
                    rec = self.metadata.get_record(f"{version}.targets.json")
                    if rec is None:
                        continue
                    try:
                        md = Metadata[Targets].from_bytes(rec.data)
                    except (DeserializationError, ValueError) as e:
                        raise VerificationError(f"stored {rec.filename} is unreadable") from e
                    for name, t in md.signed.targets.items():
                        hw = (t.unrecognized_fields.get("custom") or {}).get("hardware_ids", [])
                        sha = t.hashes.get("sha256")
                        if isinstance(hw, list) and sha:
                            image = ListedImage(name=name, sha256=sha, length=t.length)
                            entries.append((image, frozenset(str(h) for h in hw)))
                self._index = (newest, entries)
            return [image for image, hws in self._index[1] if hardware_id in hws]


class NonceBody(BaseModel):
    """A fresh check-in nonce."""

    nonce: str = Field(description="single use, bound to the device and its certificate")
    expires: dt.datetime
    attestation_key_registered: bool = Field(
        description="whether the server holds an attestation key for this device (a device "
        "with a TPM registers one before checking in)"
    )


class CheckinBody(BaseModel):
    """An accepted check-in."""

    serial: str
    time: dt.datetime = Field(description="server time of the check-in")
    attested: bool = Field(description="a verified TPM quote backs the boot measurement")
    boot_sha256: str
    valid_for_seconds: int = Field(
        description="how long this certificate may read /metadata and /targets from now"
    )
    director_targets: str | None = Field(
        default=None,
        description="the director's instruction: TUF targets metadata (exact signed JSON "
        "text) signed by the director root's targets key, naming the one image to install "
        "or none, bound to this manifest's nonce; null when the server has no director",
    )
    next_nonce: NonceBody | None = Field(
        default=None,
        description="a nonce for the device's next check-in (single use, valid for a day): "
        "its next check-in is one request, without asking for a nonce first",
    )


class AttestationKeyRequest(StrictRequest):
    """The public part of a device's TPM attestation key."""

    public_pem: str = Field(max_length=MAX_AK_PEM_CHARS, description="PEM SubjectPublicKeyInfo")


class AttestationKeyBody(BaseModel):
    """A registered attestation key."""

    serial: str
    registered: bool


class CheckinInfo(BaseModel):
    """One recorded check-in."""

    time: dt.datetime
    device_time: str
    running_version: str
    target: str
    boot_sha256: str
    attested: bool
    outcome: str = Field(description="accepted or quarantined")
    detail: str


class AlertInfo(BaseModel):
    """One stored alert."""

    time: dt.datetime
    kind: str
    detail: str


class CheckinsBody(BaseModel):
    """A device's check-in history (newest first) and alerts."""

    serial: str
    attestation_key: bool
    checkins: list[CheckinInfo]
    alerts: list[AlertInfo]


_CHECKIN_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    403: {"model": ErrorBody, "description": "Device or check-in refused (reason given)"},
    413: {"model": ErrorBody, "description": "Manifest too large"},
}
_CHECKIN_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": 'signed device manifest: {"signed": {...}, "signatures": '
                    '[{"keyid": ..., "sig": ...}]}, signed by the key of the client '
                    "certificate over the canonical JSON of signed",
                    "required": ["signed", "signatures"],
                }
            }
        },
    }
}


def _presented(gate: DeviceGate, request: Request) -> PresentedCertificate:
    presented = gate.certificate(request.scope)
    if presented is None:
        raise AccessDeniedError("a check-in needs the device's client certificate")
    return presented


def _authenticated(gate: DeviceGate, request: Request) -> AuthenticatedDevice:
    dev = gate.authenticate(request.scope)
    if dev is None:
        raise AccessDeniedError("a check-in needs the device's client certificate")
    return dev


async def _read_manifest(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_ENVELOPE_BYTES:
        raise HTTPException(413, f"the manifest exceeds {MAX_ENVELOPE_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_ENVELOPE_BYTES:
            raise HTTPException(413, f"the manifest exceeds {MAX_ENVELOPE_BYTES} bytes")
    return bytes(body)


def _refused(serial: str, reason: str) -> CheckinRefusedError:
    logger.warning("check-in of %s refused: %s", serial, reason)
    return CheckinRefusedError(reason)


def _check_attestation(
    svc: CheckinServices, dev: AuthenticatedDevice, manifest: DeviceManifest
) -> tuple[str | None, int | None]:
    """(why the device must be quarantined or None, verified TPM reset count or None)."""
    serial = dev.record.serial
    ak = dev.record.attestation_key  # read with the registry check (one statement)
    if ak is None:
        if manifest.quote is not None:
            raise _refused(serial, "check-in refused: a quote, but no attestation key registered")
        return None, None
    if manifest.quote is None:
        return "no TPM quote from a device that registered an attestation key", None
    try:
        attested = verify_quote(
            manifest.quote,
            ak_pem=ak,
            nonce=manifest.nonce,
            serial=serial,
            min_reset_count=svc.checkins.last_reset_count(serial),
        )
    except VerificationError as e:
        return f"invalid TPM quote: {e}", None
    return None, attested.reset_count


def _claim_nonce(
    svc: CheckinServices, dev: AuthenticatedDevice, manifest: DeviceManifest, *, now: dt.datetime
) -> None:
    """Spend the manifest's nonce in one statement; on failure, read it to say why."""
    serial, cert_serial = dev.record.serial, dev.identity.cert_serial
    if not svc.checkins.claim_nonce(
        manifest.nonce, serial=serial, cert_serial=cert_serial, now=now
    ):
        _refuse_unclaimed(svc, dev, manifest, now=now)


def _refuse_unclaimed(
    svc: CheckinServices, dev: AuthenticatedDevice, manifest: DeviceManifest, *, now: dt.datetime
) -> NoReturn:
    """The manifest's nonce could not be claimed: read it to say why, and refuse."""
    serial, cert_serial = dev.record.serial, dev.identity.cert_serial
    try:
        check_nonce(
            manifest,
            serial=serial,
            cert_serial=cert_serial,
            nonce=svc.checkins.get_nonce(manifest.nonce),
            now=now,
        )
    except CheckinRefusedError as e:
        raise _refused(serial, str(e)) from e
    # The claim failed yet the record read after it passes every check: not expected
    # (the claim and the checks use one time); never accepted without a claim.
    raise _refused(serial, "check-in refused: the nonce was already used (replay)")


def _record(
    svc: CheckinServices, dev: AuthenticatedDevice, data: bytes
) -> tuple[CheckinRecord, DeviceManifest, str | None, NonceBody | None]:
    """Verify and record one check-in: (its record, the manifest, why it quarantines, the
    nonce for the device's next check-in when it is accepted).

    Runs inside the request's unit: the nonce claim, the reads and the writes commit
    together (a quarantine included), or not at all when a refusal raises. Everything is
    decided before the first write (the manifest, the quote, the boot measurement), so an
    accepted check-in is one write (:meth:`~.storage.base.CheckinStore.accept_checkin`:
    the claim, the record and the next nonce); a refusal writes nothing.
    """
    serial, cert_serial = dev.record.serial, dev.identity.cert_serial
    now = svc.clock()
    try:
        manifest = verify_manifest(data, certificate=dev.certificate, serial=serial)
    except CheckinRefusedError as e:
        raise _refused(serial, str(e)) from e
    problem, reset_count = _check_attestation(svc, dev, manifest)
    if problem is None:
        problem = assess_boot(manifest, listed=svc.listed_images(dev.record.hardware_id))
    installed = manifest.installed
    entry = CheckinRecord(
        serial=serial,
        cert_serial=cert_serial,
        time=now,
        device_time=manifest.time,
        running_version=installed.version if installed else "recovery",
        target=installed.name if installed else "",
        boot_sha256=manifest.boot.sha256,
        attested=reset_count is not None,
        reset_count=reset_count,
        outcome="accepted" if problem is None else "quarantined",
        detail=problem
        or " ".join(
            [f"{k}={v}" for k, v in sorted(manifest.last_result.items())]
            + ([f"attack_flags={','.join(manifest.attack_flags)}"] if manifest.attack_flags else [])
        ),
        manifest=data,
    )
    health = (
        None
        if svc.monitor is None  # fleet monitoring (ADR 0026): the device's health row
        else svc.monitor.checkin_note(
            serial=serial, hardware_id=dev.record.hardware_id, manifest=manifest, now=now
        )
    )
    if problem is not None:  # recorded only against a nonce claimed now, like any check-in
        _claim_nonce(svc, dev, manifest, now=now)
        svc.checkins.record_checkin(entry)
        reason = f"measured boot: {problem}"
        svc.checkins.add_alert(DeviceAlert(serial, now, "measured-boot", problem))
        svc.devices.set_status(serial, DeviceState.QUARANTINED, reason=reason[:500], now=now)
        if svc.monitor is not None and health is not None:
            svc.monitor.note_checkin(health)
        return entry, manifest, problem, None
    # An accepted check-in by a device with an attestation key was attested (else it
    # quarantines): the key is registered exactly when it was. The claimed nonce is
    # replaced by the next one: the open ones cannot grow here (no bound to enforce).
    record, next_nonce = _nonce(dev, now=now, ttl=NEXT_NONCE_TTL, registered=entry.attested)
    if not svc.checkins.accept_checkin(
        entry, nonce=manifest.nonce, next_nonce=record, health=health
    ):
        _refuse_unclaimed(svc, dev, manifest, now=now)
    if manifest.attack_flags:
        flags = ", ".join(manifest.attack_flags)
        svc.checkins.add_alert(DeviceAlert(serial, now, "attack", f"device refused: {flags}"))
    return entry, manifest, None, next_nonce


def issue_nonce(
    svc: CheckinServices, gate: DeviceGate, presented: PresentedCertificate, scope: object
) -> NonceBody:
    """A fresh nonce for the device ``presented`` names, after the registry's checks
    (blocking: one transaction). Used by the route and by :mod:`.checkin_fastpath`.

    Raises:
        AccessDeniedError: the device or its certificate is refused (the reason).
        ServerStorageError: the database failed.
    """
    with svc.unit():  # the registry check (and the key) and the nonce: one transaction
        dev = gate.admit(presented, scope)
        registered = dev.record.attestation_key is not None
        record, body = _nonce(dev, now=svc.clock(), ttl=NONCE_TTL, registered=registered)
        svc.checkins.issue_nonce(record)
        return body


def _nonce(
    dev: AuthenticatedDevice, *, now: dt.datetime, ttl: dt.timedelta, registered: bool
) -> tuple[NonceRecord, NonceBody]:
    """A new nonce for ``dev``'s certificate, valid for ``ttl``: (to store, to answer)."""
    value = secrets.token_urlsafe(NONCE_BYTES)
    record = NonceRecord(
        nonce=value,
        serial=dev.record.serial,
        cert_serial=dev.identity.cert_serial,
        issued_at=now,
        expires_at=now + ttl,
        used_at=None,
    )
    return record, NonceBody(nonce=value, expires=now + ttl, attestation_key_registered=registered)


def run_checkin(
    svc: CheckinServices,
    gate: DeviceGate,
    presented: PresentedCertificate,
    scope: object,
    data: bytes,
) -> CheckinBody:
    """Verify and record one check-in and answer it (blocking). Used by the route and by
    :mod:`.checkin_fastpath`.

    Raises:
        AccessDeniedError: refused (a :class:`CheckinRefusedError` for the manifest, or
            the device quarantined by this check-in); the message is the reason.
        ServerStorageError: the database failed.
    """
    # One transaction from the registry check to the recorded check-in, and on PostgreSQL
    # to the director's answer too (``answer_in_unit``): its reads (assignment, policy)
    # join it through the unit helpers (storage/unit.py), so a check-in is one pooled
    # connection and one commit. Either way the commit comes before the answer is sent:
    # the manifest is durable when the device reads its instruction. A quarantine commits
    # and is raised after it; it gets no answer.
    director = None
    try:
        with svc.unit():
            dev = gate.admit(presented, scope)
            entry, manifest, problem, next_nonce = _record(svc, dev, data)
            if problem is None and svc.answer_in_unit:
                director = _answer(svc, dev, manifest, entry)
    except CheckinRefusedError as e:
        if svc.monitor is not None:
            svc.monitor.checkin_refused(str(e))
        raise
    if problem is None and not svc.answer_in_unit:
        with svc.unit():  # its own unit, after the commit; the note joins it
            director = _answer(svc, dev, manifest, entry)
    serial = dev.record.serial
    if svc.monitor is not None:  # fleet monitoring (ADR 0026), after the commit
        svc.monitor.after_checkin(
            serial=serial,
            hardware_id=dev.record.hardware_id,
            manifest=manifest,
            problem=problem,
            answer=director.encode() if director is not None else None,
        )
    if problem is not None:
        logger.error("ALERT device %s quarantined at check-in: %s", serial, problem)
        raise AccessDeniedError(f"device {serial} quarantined at check-in: {problem}")
    if manifest.attack_flags:
        logger.error(
            "ALERT device %s reports refused attacks: %s", serial, ", ".join(manifest.attack_flags)
        )
    logger.info(
        "device %s checked in (%s, %s)",
        serial,
        entry.running_version,
        "attested" if entry.attested else "unattested measurement",
    )
    return CheckinBody(
        serial=serial,
        time=entry.time,
        attested=entry.attested,
        boot_sha256=entry.boot_sha256,
        valid_for_seconds=int(CHECKIN_WINDOW.total_seconds()),
        director_targets=director,
        next_nonce=next_nonce,
    )


def _answer(
    svc: CheckinServices,
    dev: AuthenticatedDevice,
    manifest: DeviceManifest,
    entry: CheckinRecord,
) -> str | None:
    """The director's signed instruction for an accepted check-in (``None``: no director),
    noted on the device's health row when it names an image (in the caller's unit)."""
    if svc.director is None:
        return None
    serial, hardware_id = dev.record.serial, dev.record.hardware_id
    answer = svc.director.answer(
        serial=serial,
        hardware_id=hardware_id,
        installed=manifest.installed,
        nonce=manifest.nonce,
        recorded=entry,
    )
    if svc.monitor is not None:
        svc.monitor.note_instructed(
            serial=serial, hardware_id=hardware_id, manifest=manifest, answer=answer
        )
    return answer.decode()


def _checked_ak(pem: str) -> str:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as e:
        raise OperatorError("the attestation key is not a PEM public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise OperatorError("the attestation key must be ECDSA P-256")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def checkin_router(svc: CheckinServices, gate: DeviceGate) -> APIRouter:
    """The device's check-in routes under ``/api/v1/device`` (mutual TLS)."""
    router = APIRouter(prefix="/api/v1/device", tags=["device"], responses=_CHECKIN_ERRORS)

    @router.post("/nonce", summary="A fresh check-in nonce")
    def nonce(request: Request) -> NonceBody:
        """A random single-use nonce bound to the device and its certificate, valid briefly."""
        return issue_nonce(svc, gate, _presented(gate, request), request.scope)

    @router.post(
        "/checkin", summary="Check in: a signed device manifest", openapi_extra=_CHECKIN_BODY
    )
    async def checkin(request: Request) -> CheckinBody:
        """Verify the manifest (signature by the certificate's key, serial, nonce, quote)
        and compare the measured boot with the image repository.

        Refused (403) with the reason; a measured boot that contradicts the repository, or
        a missing or invalid quote from a device with an attestation key, quarantines it.
        """
        # The certificate's own checks first (no I/O), then the capped body, then the
        # registry check and the check-in in one thread and one transaction.
        presented = _presented(gate, request)
        data = await _read_manifest(request)
        return await run_in_threadpool(run_checkin, svc, gate, presented, request.scope, data)

    @router.post("/attestation-key", summary="Register the device's TPM attestation key")
    def attestation_key(request: Request, req: AttestationKeyRequest) -> AttestationKeyBody:
        """Register the public part of the device's attestation key, once.

        The same key again is accepted; another key is refused (a different TPM) and
        recorded as an alert. From then on every check-in needs a quote made with it.
        """
        dev = _authenticated(gate, request)
        pem = _checked_ak(req.public_pem)
        serial = dev.record.serial
        if not svc.checkins.register_attestation_key(serial, pem, now=svc.clock()):
            svc.checkins.add_alert(
                DeviceAlert(serial, svc.clock(), "attestation-key", "another key was offered")
            )
            raise _refused(serial, f"device {serial} already registered another attestation key")
        logger.info("device %s registered its attestation key", serial)
        return AttestationKeyBody(serial=serial, registered=True)

    return router


_SERIAL_PARAM: Final = PathParam(description="device serial", pattern=f"^{DEVICE_SERIAL_PATTERN}$")


def checkins_router(svc: CheckinServices, require_operator: Callable[..., object]) -> APIRouter:
    """The operator's view of check-ins under ``/api/v1/devices/{serial}/checkins``."""
    router = APIRouter(
        prefix="/api/v1/devices",
        tags=["fleet"],
        dependencies=[Depends(require_operator)],
        responses={404: {"model": ErrorBody, "description": "No such device"}},
    )

    @router.get("/{serial}/checkins", summary="A device's check-ins and alerts")
    def checkins(serial: Annotated[str, _SERIAL_PARAM]) -> CheckinsBody:
        """The latest check-ins (newest first) and alerts of one device."""
        if svc.devices.get(serial) is None:
            raise HTTPException(404, f"no device {serial!r} in the registry")
        return CheckinsBody(
            serial=serial,
            attestation_key=svc.checkins.attestation_key(serial) is not None,
            checkins=[
                CheckinInfo(
                    time=c.time,
                    device_time=c.device_time,
                    running_version=c.running_version,
                    target=c.target,
                    boot_sha256=c.boot_sha256,
                    attested=c.attested,
                    outcome=c.outcome,
                    detail=c.detail,
                )
                for c in svc.checkins.history(serial, limit=HISTORY_LIMIT)
            ],
            alerts=[
                AlertInfo(time=a.time, kind=a.kind, detail=a.detail)
                for a in svc.checkins.alerts(serial, limit=HISTORY_LIMIT)
            ],
        )

    return router
