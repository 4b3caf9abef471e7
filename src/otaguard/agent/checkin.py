"""The agent's check-in: a fresh server nonce, a signed device manifest, before every update.

Zero trust: before each update check the device re-proves who it is and reports what it
runs. It asks the server for a nonce, builds its :class:`~otaguard.model.manifest.DeviceManifest`
(installed target, last install result, last boot measurement and, with a TPM, a quote
over the boot PCR qualified by the nonce), signs it with the device key
(:func:`~otaguard.agent.identity.device_signer`) and posts it. An accepted check-in hands
out the nonce for the next one (:mod:`.next_nonce`, ADR 0036), so a device that keeps it
checks in with one request; it asks first only without one (or when the kept one is
refused). Every request goes through
the agent's fetcher seam (:meth:`~otaguard.agent.fetcher.Fetcher.post`), over the same
mutual TLS as the metadata.

A refused check-in stops the update: :class:`AccessDeniedError` (exit 77) when the
server refused the device or the manifest (quarantined, revoked, replay, wrong key),
:class:`VerificationError` (exit 3) when the server's answer is malformed,
:class:`TransportError` (exit 4) when it cannot be reached.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any, Final

from securesystemslib.signer import Signer
from tuf.api import exceptions

from otaguard.agent.attack_flags import clear_flags, read_flags
from otaguard.agent.boot import read_booted
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.fetcher import Fetcher
from otaguard.agent.install import InstallState
from otaguard.agent.measured_boot import TpmAttestor, read_event_log
from otaguard.agent.next_nonce import (
    StoredNonce,
    discard_next_nonce,
    read_next_nonce,
    store_next_nonce,
)
from otaguard.agent.slots import BootEnv
from otaguard.crypto.envelope import sign_envelope
from otaguard.model.errors import (
    AccessDeniedError,
    ConfigError,
    TransportError,
    VerificationError,
)
from otaguard.model.manifest import (
    RECOVERY_MEASUREMENT,
    BootMeasurement,
    DeviceManifest,
    InstalledTarget,
    Quote,
    printable_text,
    quote_qualifying_data,
)

__all__ = [
    "ATTESTATION_KEY_PATH",
    "CHECKIN_PATH",
    "MAX_ANSWER_BYTES",
    "MAX_NONCE_CHARS",
    "NONCE_PATH",
    "NONCE_REFUSAL_MARK",
    "CheckinResult",
    "build_manifest",
    "check_in",
    "parse_answer",
    "parse_checkin_answer",
    "parse_nonce_answer",
    "register_attestation_key",
]

logger = logging.getLogger(__name__)

NONCE_PATH: Final = "/api/v1/device/nonce"
CHECKIN_PATH: Final = "/api/v1/device/checkin"
ATTESTATION_KEY_PATH: Final = "/api/v1/device/attestation-key"
#: the server's answers are a few hundred bytes of JSON plus the director's instruction
#: (bounded by MAX_DIRECTOR_TARGETS_BYTES, escaped into a JSON string); more is hostile
MAX_ANSWER_BYTES: Final = 32 * 1024
#: every refusal of a check-in's nonce (unknown, expired, spent, another device's or
#: certificate's) says so: server/checkin_verify.py ``check_nonce``
NONCE_REFUSAL_MARK: Final = "nonce"
#: the server's nonces are 32 random bytes in URL-safe base64 (43 characters); far longer
#: is hostile
MAX_NONCE_CHARS: Final = 128
# What of the last install result goes into the manifest (strings only, see the model).
_RESULT_KEYS: Final = ("outcome", "target", "version", "error", "detail", "time")


@dataclass(frozen=True)
class CheckinResult:
    """An accepted check-in, as the server answered."""

    serial: str
    time: str
    attested: bool
    boot_sha256: str
    #: the nonce the accepted manifest answered (the director's instruction must name it)
    nonce: str
    #: the director's signed instruction (exact bytes), ``None`` when the server has no
    #: director; verified by :mod:`.director`, never trusted as it comes
    director: bytes | None
    #: the nonce for the next check-in the server handed out with this one (ADR 0036)
    next_nonce: StoredNonce | None = None


def _reason(data: bytes) -> str:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return "no reason given"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return " ".join(body["error"].split())[:300]
    return "no reason given"


def parse_answer(status: int, data: bytes, what: str) -> dict[str, Any]:
    """Map one HTTP answer of the check-in protocol to a JSON object or otaguard's errors.

    Pure (status and bytes in): the agent's fetcher path and the fleet simulator's asyncio
    path (:mod:`otaguard.sim.fleetsim`) share it.

    Raises:
        AccessDeniedError: 401 or 403 (reason given).
        VerificationError: 413 or 422, or an answer that is not a JSON object.
        TransportError: any other status than 200.
    """
    if status in (401, 403):
        # One prefix, not three: "access denied: check-in refused (HTTP 403): check-in
        # refused: ..." says the same thing thrice.
        why = _reason(data).removeprefix("access denied: ").removeprefix(f"{what} refused: ")
        raise AccessDeniedError(f"{what} refused (HTTP {status}): {why}")
    if status in (413, 422):
        raise VerificationError(f"{what} refused as malformed (HTTP {status}): {_reason(data)}")
    if status != 200:
        raise TransportError(f"{what} failed: server answered {status}: {_reason(data)}")
    try:
        answer = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise VerificationError(f"{what}: the server's answer is not JSON") from e
    if not isinstance(answer, dict):
        raise VerificationError(f"{what}: the server's answer is not a JSON object")
    return answer


def _post(fetcher: Fetcher, url: str, body: Any, what: str) -> dict[str, Any]:
    """POST JSON through the fetcher seam; map the answer to otaguard's errors."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        status, data = fetcher.post(
            url, payload, content_type="application/json", max_length=MAX_ANSWER_BYTES
        )
    except exceptions.DownloadError as e:
        raise TransportError(f"{what}: {e}") from e
    return parse_answer(status, data, what)


def parse_nonce_answer(answer: dict[str, Any]) -> tuple[str, bool]:
    """The nonce, and whether an attestation key is registered, from the nonce answer.

    Raises:
        VerificationError: malformed (no nonce string of at most :data:`MAX_NONCE_CHARS`).
    """
    nonce, registered = answer.get("nonce"), answer.get("attestation_key_registered")
    if (
        not isinstance(nonce, str)
        or not nonce
        or len(nonce) > MAX_NONCE_CHARS
        or not isinstance(registered, bool)
    ):
        raise VerificationError("check-in: the server's nonce answer is malformed")
    return nonce, registered


def _parse_next_nonce(value: Any) -> StoredNonce | None:
    """The answer's ``next_nonce`` (absent from servers before ADR 0036: ``None``).

    Raises:
        VerificationError: present but malformed.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise VerificationError("check-in: the server's next nonce is malformed")
    nonce, registered = parse_nonce_answer(value)
    try:
        expires = dt.datetime.fromisoformat(str(value.get("expires")))
    except ValueError as e:
        raise VerificationError("check-in: the server's next nonce has no valid expiry") from e
    if expires.tzinfo is None:
        raise VerificationError("check-in: the server's next nonce expiry has no time zone")
    return StoredNonce(nonce=nonce, attestation_key_registered=registered, expires=expires)


def parse_checkin_answer(accepted: dict[str, Any], *, nonce: str, serial: str) -> CheckinResult:
    """The server's acceptance of the manifest that answered ``nonce``, for ``serial``.

    Raises:
        VerificationError: malformed, or it accepted another serial.
    """
    director = accepted.get("director_targets")
    if director is not None and not isinstance(director, str):
        raise VerificationError("check-in: the server's director instruction is malformed")
    try:
        result = CheckinResult(
            serial=str(accepted["serial"]),
            time=str(accepted["time"]),
            attested=bool(accepted["attested"]),
            boot_sha256=str(accepted["boot_sha256"]),
            nonce=nonce,
            director=director.encode() if director is not None else None,
            next_nonce=_parse_next_nonce(accepted.get("next_nonce")),
        )
    except KeyError as e:
        raise VerificationError("check-in: the server's answer is malformed") from e
    if result.serial != serial:
        raise VerificationError(f"check-in: the server accepted serial {result.serial!r}")
    return result


def build_manifest(
    paths: DevicePaths, config: DeviceConfig, *, nonce: str, tpm: TpmAttestor | None
) -> DeviceManifest:
    """The manifest answering ``nonce``: what the device booted and runs, and its quote.

    Raises:
        ConfigError: the device has not booted, or its boot state or event log is corrupt.
        DeviceStorageError: the TPM failed.
    """
    booted = read_booted(paths)
    if booted is None:
        raise ConfigError("the device has not booted yet: run otaguard agent DEVICE_DIR boot")
    installed = None
    if booted.slot is not None:
        image = BootEnv.load(paths.bootenv).slots.get(booted.slot)
        if image is not None:
            installed = InstalledTarget(
                name=image.target,
                length=image.length,
                sha256=image.sha256,
                version=image.version,
                security_counter=image.security_counter,
                sbom_sha256=image.sbom_sha256,
            )
    events = read_event_log(paths)
    if events:
        last = events[-1]
        measurement = (last.sha256, last.slot)
    else:  # booted before measured boot existed: the boot record is all there is
        measurement = (booted.sha256 or RECOVERY_MEASUREMENT, booted.slot)
    quote = None
    if tpm is not None:
        attest, signature = tpm.quote(quote_qualifying_data(nonce, config.serial))
        # Only the quote's epoch replays; the server checks the quote's reset count.
        epoch = events[-1].reset_count if events else None
        quote = Quote(attest, signature, tuple(e for e in events if e.reset_count == epoch))
    result = InstallState.load(paths.install_state).last_result or {}
    return DeviceManifest(
        serial=config.serial,
        nonce=nonce,
        time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        installed=installed,
        last_result={k: printable_text(str(result[k]), 1024) for k in _RESULT_KEYS if k in result},
        boot=BootMeasurement(
            sha256=measurement[0], slot=measurement[1], attested=quote is not None
        ),
        quote=quote,
        attack_flags=read_flags(paths),
    )


def register_attestation_key(fetcher: Fetcher, *, config: DeviceConfig, tpm: TpmAttestor) -> None:
    """Register the TPM's attestation key with the server (mutual TLS; once per device).

    Raises:
        AccessDeniedError: the server holds another key for this device, or refused it.
        TransportError: the server cannot be reached.
        DeviceStorageError: the TPM failed.
    """
    url = config.server_url.rstrip("/") + ATTESTATION_KEY_PATH
    _post(fetcher, url, {"public_pem": tpm.ak_public_pem()}, "attestation key registration")
    logger.info("registered the TPM attestation key of %s", config.serial)


def check_in(
    fetcher: Fetcher, *, paths: DevicePaths, config: DeviceConfig, signer: Signer
) -> CheckinResult:
    """Check in with the server: nonce, (attestation key), signed manifest.

    Args:
        fetcher: the agent's network seam, presenting the device certificate.
        paths: the device directory.
        config: the device configuration (server URL, serial, TPM).
        signer: the device key (:func:`~otaguard.agent.identity.device_signer`).

    Returns:
        The server's acceptance.

    Raises:
        AccessDeniedError: the server refused the device or the check-in (reason given).
        VerificationError: the server's answer is malformed.
        TransportError: the server cannot be reached.
        ConfigError: the device's boot state is missing or corrupt.
        DeviceStorageError: the TPM failed.
    """
    base = config.server_url.rstrip("/")
    # With a real bootloader nothing extends the boot PCR: the agent's own measurement is
    # unattested (ADR 0038), so no attestation key and no quote; the TPM still holds the
    # floor (and the key, if so configured).
    attests = config.tpm is not None and config.bootloader is None
    tpm = TpmAttestor(config.tpm) if attests and config.tpm is not None else None
    stored = read_next_nonce(paths, now=dt.datetime.now(dt.UTC))
    accepted: dict[str, Any] | None = None
    if stored is not None and (tpm is None or stored.attestation_key_registered):
        # One request: the nonce the last accepted check-in handed out (ADR 0036).
        nonce = stored.nonce
        manifest = build_manifest(paths, config, nonce=nonce, tpm=tpm)
        try:
            accepted = _post(
                fetcher, base + CHECKIN_PATH, sign_envelope(signer, manifest.to_dict()), "check-in"
            )
        except AccessDeniedError as e:
            if NONCE_REFUSAL_MARK not in str(e):
                discard_next_nonce(paths)  # answered: it is spent either way
                raise
            discard_next_nonce(paths)
            # Expired, spent (an answer lost to a power cut) or forgotten by the server:
            # the protocol's first step, as for a device with no nonce kept.
            logger.info("the kept check-in nonce was refused (%s); asking for a fresh one", e)
    if accepted is None:
        answer = _post(fetcher, base + NONCE_PATH, b"", "check-in nonce request")
        nonce, registered = parse_nonce_answer(answer)
        if tpm is not None and not registered:
            # First check-in after enrollment: the attestation key joins the identity (TOFU
            # under the fresh device certificate; ADR 0007).
            register_attestation_key(fetcher, config=config, tpm=tpm)
        manifest = build_manifest(paths, config, nonce=nonce, tpm=tpm)
        envelope = sign_envelope(signer, manifest.to_dict())
        accepted = _post(fetcher, base + CHECKIN_PATH, envelope, "check-in")
    result = parse_checkin_answer(accepted, nonce=nonce, serial=config.serial)
    if result.next_nonce is not None:
        store_next_nonce(paths, result.next_nonce)  # replaces the one just spent
    else:
        discard_next_nonce(paths)
    clear_flags(paths, manifest.attack_flags)
    logger.info(
        "checked in as %s (%s)", result.serial, "attested" if result.attested else "unattested"
    )
    return result
