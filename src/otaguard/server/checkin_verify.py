"""Pure verification of a check-in: bytes + certificate + nonce record in, manifest out.

No I/O: the route calls :func:`verify_manifest`, then claims the nonce in one atomic
store step (unused, unexpired, this serial and certificate) and, only when the claim
fails, reads the nonce's record and calls :func:`check_nonce` for the reason; then it
records the check-in. Checks (each refusal names its reason):

1. the envelope verifies with the public key of the *current, verified* client
   certificate (ECDSA P-256) -- not with any key the request names;
2. the signed record is a well-formed device manifest (:mod:`otaguard.model.manifest`);
3. its serial is the certificate's (a device cannot report for another);
4. its nonce was issued (unknown nonces are refused), to this serial (a nonce issued
   to another device is refused), by this certificate, is unused (replay) and unexpired;
5. a quote, if present, backs the reported boot measurement (last event = measurement).
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import SSlibKey

from otaguard.crypto.envelope import open_envelope
from otaguard.model.errors import AccessDeniedError, VerificationError
from otaguard.model.manifest import DeviceManifest
from otaguard.server.storage.base import NonceRecord

__all__ = [
    "ECDSA_P256_SCHEME",
    "CheckinRefusedError",
    "check_nonce",
    "device_key",
    "verify_checkin",
    "verify_manifest",
]

#: device keys kept once made (as many as device_auth.VERIFIED_CERTIFICATES_KEPT: a fleet of
#: 10,000 devices checking in in turn would otherwise make every key again)
DEVICE_KEYS_KEPT: Final = 16384
#: the securesystemslib scheme of device keys (EC P-256, as the device CA requires)
ECDSA_P256_SCHEME: Final = "ecdsa-sha2-nistp256"


class CheckinRefusedError(AccessDeniedError):
    """A check-in was refused: bad signature, wrong serial, unknown/used/foreign nonce."""


# A device presents the same certificate at every check-in for a day: its key is made
# once, as the gate verifies the certificate once (as many kept as the gate keeps).
@functools.lru_cache(maxsize=DEVICE_KEYS_KEPT)
def device_key(certificate: x509.Certificate) -> SSlibKey:
    """The securesystemslib key of a device certificate's public key.

    Raises:
        CheckinRefusedError: the certificate's key is not EC P-256.
    """
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise CheckinRefusedError("the client certificate's key is not ECDSA P-256")
    return SSlibKey.from_crypto(public, scheme=ECDSA_P256_SCHEME)


def verify_manifest(data: bytes, *, certificate: x509.Certificate, serial: str) -> DeviceManifest:
    """Checks 1, 2, 3 and 5 of the module docstring: all but the nonce's record.

    The check-in runs these first, then claims the nonce atomically in the store and,
    only when that fails, reads the record and calls :func:`check_nonce` for the reason.

    Raises:
        CheckinRefusedError: the check-in is refused; the message is the reason.
    """
    try:
        signed = open_envelope(data, key=device_key(certificate))
        manifest = DeviceManifest.from_dict(signed)
    except VerificationError as e:
        raise CheckinRefusedError(f"check-in refused: {e}") from e
    if manifest.serial != serial:
        raise CheckinRefusedError(
            f"check-in refused: the manifest is for device {manifest.serial!r}, "
            f"the certificate for {serial!r}"
        )
    if manifest.quote is not None:
        events = manifest.quote.events
        if not manifest.boot.attested:
            raise CheckinRefusedError("check-in refused: a quote for an unattested measurement")
        if not events or (events[-1].sha256, events[-1].slot) != (
            manifest.boot.sha256,
            manifest.boot.slot,
        ):
            raise CheckinRefusedError(
                "check-in refused: the event log does not end with the reported boot measurement"
            )
    elif manifest.boot.attested:
        raise CheckinRefusedError("check-in refused: an attested measurement without a quote")
    return manifest


def check_nonce(
    manifest: DeviceManifest,
    *,
    serial: str,
    cert_serial: str,
    nonce: NonceRecord | None,
    now: dt.datetime,
) -> None:
    """Check 4 of the module docstring: the nonce's record fits this manifest.

    Raises:
        CheckinRefusedError: it does not; the message is the reason.
    """
    if nonce is None or nonce.nonce != manifest.nonce:
        raise CheckinRefusedError("check-in refused: unknown nonce (ask for a fresh one)")
    if nonce.serial != serial:
        raise CheckinRefusedError("check-in refused: the nonce was issued to another device")
    if nonce.cert_serial != cert_serial:
        raise CheckinRefusedError("check-in refused: the nonce was issued to another certificate")
    if nonce.used_at is not None:
        raise CheckinRefusedError("check-in refused: the nonce was already used (replay)")
    if nonce.expires_at <= now:
        raise CheckinRefusedError("check-in refused: the nonce has expired (ask for a fresh one)")


def verify_checkin(
    data: bytes,
    *,
    certificate: x509.Certificate,
    serial: str,
    cert_serial: str,
    nonce: NonceRecord | None,
    now: dt.datetime,
) -> DeviceManifest:
    """Verify a signed device manifest (see the module docstring for the checks).

    :func:`verify_manifest` then :func:`check_nonce`.

    Args:
        data: the envelope as received.
        certificate: the request's verified client certificate.
        serial: the device serial that certificate names.
        cert_serial: the certificate's serial number (hex), as the registry stores it.
        nonce: the stored record of the nonce the manifest names (looked up by the
            caller after a first parse), or ``None`` if no such nonce was issued.
        now: the server's time.

    Returns:
        The verified manifest.

    Raises:
        CheckinRefusedError: the check-in is refused; the message is the reason.
    """
    manifest = verify_manifest(data, certificate=certificate, serial=serial)
    check_nonce(manifest, serial=serial, cert_serial=cert_serial, nonce=nonce, now=now)
    return manifest
