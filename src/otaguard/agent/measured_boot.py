"""Measured boot: the bootloader's event log, a PCR extend, and quotes for the server.

Each simulated boot measures what it starts -- the verified sha256 of the booted slot's
image, or :data:`~otaguard.model.manifest.RECOVERY_MEASUREMENT` when no slot qualified --
into an append-only event log in the device directory (``measured-boot.json``, atomic
writes) and, on a device with a TPM, extends PCR :data:`~otaguard.model.manifest.BOOT_PCR`
of the sha256 bank with it first. Each event records the TPM's ``resetCount``: a TPM
reset zeroes the PCR, so only the events of the current reset epoch replay to its value,
and older epochs are dropped from the log when a new one starts.

The attestation key (AK) is a restricted ECDSA P-256 signing key the TPM derives from its
endorsement seed and a fixed template (a *primary* key): the same key every time on the
same TPM, so nothing is stored and nothing can be copied off the device. The endorsement
hierarchy, not the owner's, because a quote signed by a key of another hierarchy carries
an *obfuscated* ``resetCount`` (TPM 2.0 Part 1, "Obfuscation of clockInfo"), which the
server needs to tell reset epochs apart; and its seed survives an owner ``TPM2_Clear``.
Restricted means the TPM signs with it only structures it generated itself (quotes),
never a digest an attacker chose to look like one. The server learns its public part
once, over mutual TLS (:func:`~otaguard.agent.checkin.register_attestation_key`, at
enrollment), and from then on accepts a check-in only with a quote made by it over the
boot PCR, qualified by the check-in's nonce.

Without a TPM the measurement is still reported, as *unattested*: the server compares it
with the image repository all the same, but has only the device's word for it.

``tpm2_pytss`` is imported here only when a TPM is configured (extra ``tpm``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from otaguard._fs import atomic_write_json
from otaguard.agent.config import DevicePaths
from otaguard.model.errors import ConfigError, DeviceStorageError, VerificationError
from otaguard.model.manifest import BOOT_PCR, MAX_EVENTS, RECOVERY_MEASUREMENT, MeasurementEvent

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

__all__ = ["AK_UNIQUE", "TpmAttestor", "measure_boot", "read_event_log"]

#: the template's ``unique`` field: a primary key of its own, apart from any other key an
#: application derives from the owner seed with the same algorithm
AK_UNIQUE: Final = b"otaguard-attestation-key"
# The event log holds at most MAX_EVENTS events of ~150 bytes; larger is not ours.
MAX_EVENT_LOG_BYTES: Final = 256 * 1024


@contextmanager
def _esapi(tcti: str) -> Iterator[ESAPI]:
    """One connection per operation, as the anti-rollback store does."""
    try:
        from tpm2_pytss import ESAPI
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
    except ImportError as e:
        raise ConfigError("measured boot with a TPM needs tpm2-pytss (otaguard[tpm])") from e
    try:
        ctx = ESAPI(tcti)
    except TSS2_Exception as e:
        raise DeviceStorageError(f"cannot reach the TPM at {tcti!r}: {e}") from e
    try:
        yield ctx
    except TSS2_Exception as e:
        raise DeviceStorageError(f"the TPM at {tcti!r} failed: {e}") from e
    finally:
        ctx.close()


class TpmAttestor:
    """The boot PCR and the attestation key of one TPM."""

    def __init__(self, tcti: str):
        """Use the TPM reached through ``tcti`` (a connection per operation)."""
        self.tcti = tcti

    def extend(self, sha256_hex: str) -> int:
        """Extend the boot PCR with a measurement; return the TPM's current reset count.

        Raises:
            DeviceStorageError: the TPM cannot be reached or failed.
        """
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        with _esapi(self.tcti) as ctx:
            reset_count = int(ctx.read_clock().clockInfo.resetCount)
            digest = TPMT_HA(
                hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=bytes.fromhex(sha256_hex))
            )
            ctx.pcr_extend(ESYS_TR.PCR0 + BOOT_PCR, TPML_DIGEST_VALUES([digest]))
        return reset_count

    @staticmethod
    def _create_ak(ctx: ESAPI) -> tuple[object, str]:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

        attrs = (
            TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.SIGN_ENCRYPT
            | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
        )
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attrs)
        # A signing key has no symmetric algorithm; the parser's default is for storage keys.
        template.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
        template.publicArea.unique.ecc.x = AK_UNIQUE
        handle, public, *_ = ctx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        return handle, public.to_pem().decode("ascii")

    def ak_public_pem(self) -> str:
        """The attestation key's public part (PEM).

        Raises:
            DeviceStorageError: the TPM cannot be reached or failed.
        """
        with _esapi(self.tcti) as ctx:
            handle, pem = self._create_ak(ctx)
            ctx.flush_context(handle)
        return pem

    def quote(self, qualifying_data: bytes) -> tuple[bytes, bytes]:
        """A TPM2_Quote over the boot PCR: (marshalled ``TPMS_ATTEST``, DER ECDSA signature).

        Raises:
            DeviceStorageError: the TPM cannot be reached or failed.
        """
        from tpm2_pytss.constants import TPM2_ALG
        from tpm2_pytss.types import TPM2B_DATA, TPML_PCR_SELECTION, TPMT_SIG_SCHEME

        with _esapi(self.tcti) as ctx:
            handle, _ = self._create_ak(ctx)
            try:
                quoted, sig = ctx.quote(
                    handle,
                    TPML_PCR_SELECTION.parse(f"sha256:{BOOT_PCR}"),
                    TPM2B_DATA(qualifying_data),
                    TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                )
            finally:
                ctx.flush_context(handle)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return bytes(quoted), encode_dss_signature(r, s)


def read_event_log(paths: DevicePaths) -> list[MeasurementEvent]:
    """The device's boot event log, oldest first (empty if it never booted measured).

    Raises:
        ConfigError: the log is corrupt.
    """
    try:
        with paths.event_log.open("rb") as f:
            data = f.read(MAX_EVENT_LOG_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"cannot read the boot event log {paths.event_log}: {e.strerror}") from e
    corrupt = f"the boot event log {paths.event_log} is corrupt"
    if len(data) > MAX_EVENT_LOG_BYTES:
        raise ConfigError(corrupt)
    try:
        raw = json.loads(data)
    except ValueError as e:
        raise ConfigError(corrupt) from e
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
        raise ConfigError(corrupt)
    try:
        return [MeasurementEvent.from_dict(e) for e in raw["events"]]
    except VerificationError as e:
        raise ConfigError(corrupt) from e


def measure_boot(
    paths: DevicePaths, *, slot: str | None, sha256: str, tpm: str | None
) -> MeasurementEvent:
    """Measure what the bootloader started: extend the PCR (TPM first), then log it.

    The TPM goes first: if the extend fails, the log is untouched and the boot fails. A
    power cut between the two leaves the PCR one event ahead of the log, which the server
    sees as a quote that does not replay (the device is quarantined until an operator
    looks; a real bootloader keeps its log in memory across that gap).

    Args:
        paths: the device directory.
        slot: the slot started, or ``None`` (recovery).
        sha256: the verified digest of its image (ignored in recovery).
        tpm: the device's TPM (TCTI), or ``None``: the measurement is logged unattested.

    Raises:
        DeviceStorageError: the TPM failed or the log cannot be written.
        ConfigError: the existing log is corrupt.
    """
    digest = sha256 if slot is not None else RECOVERY_MEASUREMENT
    reset_count = TpmAttestor(tpm).extend(digest) if tpm is not None else None
    events = [e for e in read_event_log(paths) if e.reset_count == reset_count]
    event = MeasurementEvent(
        sha256=digest,
        slot=slot,
        reset_count=reset_count,
        time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    events = [*events, event][-MAX_EVENTS:]
    try:
        atomic_write_json(
            paths.event_log, {"pcr": BOOT_PCR, "events": [e.to_dict() for e in events]}
        )
    except OSError as e:
        raise DeviceStorageError(f"cannot write the boot event log: {e.strerror}") from e
    return event
