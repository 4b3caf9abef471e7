"""The device manifest: what a device reports at each check-in, signed by its key.

A check-in **is** a device manifest (Uptane's "signed device manifest"): the device asks
the server for a fresh nonce, then posts this record, wrapped in a canonical-JSON
envelope ``{"signed": <manifest>, "signatures": [{"keyid", "sig"}]}`` signed by its
device key (:mod:`otaguard.crypto.envelope`). The server verifies it against the key of
the client certificate the request came with. The director (issue 7) answers it.

Pure types and strict parsing only: every field is checked for type and bound, unknown
keys are refused, so hostile input fails here with a one-line :class:`VerificationError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from otaguard.model.errors import VerificationError

__all__ = [
    "ATTACK_FLAGS",
    "BOOT_PCR",
    "MANIFEST_TYPE",
    "MAX_EVENTS",
    "RECOVERY_MEASUREMENT",
    "BootMeasurement",
    "DeviceManifest",
    "InstalledTarget",
    "MeasurementEvent",
    "Quote",
    "printable_text",
    "quote_qualifying_data",
    "replay_pcr",
]

#: ``signed._type`` of a device manifest: a signature over one kind of record can never
#: be presented as another (the same device key signs CSRs and TLS handshakes)
MANIFEST_TYPE: Final = "otaguard-device-manifest"
#: the sha256-bank PCR the simulated bootloader extends with the booted slot's digest.
#: PCR 9 is what the TCG PC Client profile gives the OS loader for the code it loads (GRUB
#: measures the kernel and initrd it loads there); it is reset only by a TPM reset, unlike
#: PCR 16 and 23, which software at locality 0 may reset at will.
BOOT_PCR: Final = 9
#: events of one TPM reset epoch a device may report: a boot adds one, and a device that
#: boots hundreds of times without a TPM reset is broken or hostile (bounds the server's
#: replay work and the manifest's size)
MAX_EVENTS: Final = 256
#: what the bootloader measures when no slot qualified (recovery): no image runs
RECOVERY_MEASUREMENT: Final = hashlib.sha256(b"otaguard:recovery").hexdigest()
#: what a device reports having refused since its last accepted check-in (Uptane's
#: "attack flags"): an image whose hash or length did not match its metadata, an
#: instruction or offer older than what it runs or below its floor, a director
#: instruction the image repository does not back (absent, other length, hashes or
#: hardware), and director metadata that failed verification (bad signature, expired,
#: another nonce)
ATTACK_FLAGS: Final = frozenset(
    {"forged-image", "downgrade", "director-image-mismatch", "director-metadata-invalid"}
)
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
# Short strings (serials, names, versions, times) and the free-text install detail.
_MAX_SHORT: Final = 256
_MAX_DETAIL: Final = 1024
# base64 of a TPMS_ATTEST (~150 bytes for one PCR) and a DER ECDSA signature (~72 bytes).
_MAX_B64: Final = 4096


def quote_qualifying_data(nonce: str, serial: str) -> bytes:
    """The ``qualifyingData`` of a check-in's TPM2_Quote: binds the quote to the nonce.

    SHA-256 over a label, the server's nonce and the device serial, so a quote made for
    one check-in is worthless for any other, and a quote is never mistaken for another
    protocol's signed blob.
    """
    return hashlib.sha256(b"otaguard-quote\0" + nonce.encode() + b"\0" + serial.encode()).digest()


def replay_pcr(digests: list[str]) -> bytes:
    """The value a sha256-bank PCR holds after a TPM reset and these extends, in order."""
    pcr = bytes(32)
    for d in digests:
        pcr = hashlib.sha256(pcr + bytes.fromhex(d)).digest()
    return pcr


def _obj(raw: Any, what: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise VerificationError(f"{what} must be a JSON object")
    missing = keys - set(raw)
    unknown = set(raw) - keys
    if missing:
        raise VerificationError(f"{what} lacks {', '.join(sorted(missing))}")
    if unknown:
        raise VerificationError(f"{what} has unknown fields {', '.join(sorted(unknown))}")
    return raw


def _str(raw: Any, what: str, limit: int = _MAX_SHORT) -> str:
    if not isinstance(raw, str) or len(raw) > limit:
        raise VerificationError(f"{what} must be a string of at most {limit} characters")
    # What a manifest says is stored, logged and shown to operators: a NUL cannot be stored
    # in PostgreSQL text, a lone surrogate cannot be encoded at all, and control characters
    # forge log lines. The agent cleans what it reports (printable_text), so only a hostile
    # or broken manifest meets this.
    if not raw.isprintable():
        raise VerificationError(f"{what} holds a control character or an invalid code point")
    return raw


def printable_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, each non-printable one replaced by ``?``: what
    a device may report as free text (an error message may quote a hostile server)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _int(raw: Any, what: str) -> int:
    # bool is an int in Python; JSON true is not a number.
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw < 2**63:
        raise VerificationError(f"{what} must be a non-negative integer")
    return raw


def _sha(raw: Any, what: str) -> str:
    if not isinstance(raw, str) or not _SHA256.fullmatch(raw):
        raise VerificationError(f"{what} must be a lowercase hex SHA-256")
    return raw


@dataclass(frozen=True)
class InstalledTarget:
    """The image in the slot the device booted, as its boot environment records it."""

    name: str
    length: int
    sha256: str
    version: str
    security_counter: int
    #: SHA-256 of the release's SBOM the device verified with the image. An optional
    #: key: a manifest from an agent before SBOMs (or for an image installed before
    #: them) has none and still parses; when present it must be a SHA-256.
    sbom_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``sbom_sha256`` only when known)."""
        out: dict[str, Any] = {
            "name": self.name,
            "length": self.length,
            "sha256": self.sha256,
            "version": self.version,
            "security_counter": self.security_counter,
        }
        if self.sbom_sha256 is not None:
            out["sbom_sha256"] = self.sbom_sha256
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> InstalledTarget:
        """Parse and check. Raises :class:`VerificationError`."""
        keys = {"name", "length", "sha256", "version", "security_counter"}
        has_sbom = isinstance(raw, dict) and "sbom_sha256" in raw
        d = _obj(raw, "installed", keys | {"sbom_sha256"} if has_sbom else keys)
        return cls(
            name=_str(d["name"], "installed.name"),
            length=_int(d["length"], "installed.length"),
            sha256=_sha(d["sha256"], "installed.sha256"),
            version=_str(d["version"], "installed.version"),
            security_counter=_int(d["security_counter"], "installed.security_counter"),
            sbom_sha256=_sha(d["sbom_sha256"], "installed.sbom_sha256") if has_sbom else None,
        )


@dataclass(frozen=True)
class MeasurementEvent:
    """One boot measurement in the device's event log.

    Attributes:
        sha256: the digest extended into :data:`BOOT_PCR` (the booted slot's verified
            image digest, or :data:`RECOVERY_MEASUREMENT`).
        slot: the slot booted, or ``None`` in recovery.
        reset_count: the TPM's ``resetCount`` when it was extended (``None`` without a
            TPM): events of one TPM reset epoch replay to the PCR's value.
        time: when (device clock, ISO 8601).
    """

    sha256: str
    slot: str | None
    reset_count: int | None
    time: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "sha256": self.sha256,
            "slot": self.slot,
            "reset_count": self.reset_count,
            "time": self.time,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> MeasurementEvent:
        """Parse and check. Raises :class:`VerificationError`."""
        d = _obj(raw, "event", {"sha256", "slot", "reset_count", "time"})
        return cls(
            sha256=_sha(d["sha256"], "event.sha256"),
            slot=None if d["slot"] is None else _str(d["slot"], "event.slot", 8),
            reset_count=None if d["reset_count"] is None else _int(d["reset_count"], "reset"),
            time=_str(d["time"], "event.time"),
        )


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote over :data:`BOOT_PCR`, made with the device's attestation key.

    Attributes:
        attest: the ``TPMS_ATTEST`` structure the TPM signed (marshalled bytes).
        signature: the attestation key's ECDSA P-256 signature over it (DER).
        events: the event log of the quote's TPM reset epoch, oldest first: replayed,
            it must give the quoted PCR value.
    """

    attest: bytes
    signature: bytes
    events: tuple[MeasurementEvent, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (binary fields base64)."""
        return {
            "attest": base64.b64encode(self.attest).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "events": [e.to_dict() for e in self.events],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Quote:
        """Parse and check. Raises :class:`VerificationError`."""
        d = _obj(raw, "quote", {"attest", "signature", "events"})
        try:
            attest = base64.b64decode(_str(d["attest"], "quote.attest", _MAX_B64), validate=True)
            sig = base64.b64decode(_str(d["signature"], "quote.signature", _MAX_B64), validate=True)
        except (binascii.Error, ValueError) as e:
            raise VerificationError("quote.attest and quote.signature must be base64") from e
        events = d["events"]
        if not isinstance(events, list) or len(events) > MAX_EVENTS:
            raise VerificationError(f"quote.events must be a list of at most {MAX_EVENTS}")
        return cls(attest, sig, tuple(MeasurementEvent.from_dict(e) for e in events))


@dataclass(frozen=True)
class BootMeasurement:
    """What the bootloader measured at the last boot, and whether a TPM attests it.

    Attributes:
        sha256: the last measurement (see :class:`MeasurementEvent`).
        slot: the slot booted, or ``None`` in recovery.
        attested: a TPM holds it in :data:`BOOT_PCR` (the manifest carries a quote);
            without a TPM the server has only the device's word.
    """

    sha256: str
    slot: str | None
    attested: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"sha256": self.sha256, "slot": self.slot, "attested": self.attested}

    @classmethod
    def from_dict(cls, raw: Any) -> BootMeasurement:
        """Parse and check. Raises :class:`VerificationError`."""
        d = _obj(raw, "boot", {"sha256", "slot", "attested"})
        if not isinstance(d["attested"], bool):
            raise VerificationError("boot.attested must be true or false")
        return cls(
            sha256=_sha(d["sha256"], "boot.sha256"),
            slot=None if d["slot"] is None else _str(d["slot"], "boot.slot", 8),
            attested=d["attested"],
        )


_MANIFEST_KEYS: Final = {
    "_type",
    "serial",
    "nonce",
    "time",
    "installed",
    "last_result",
    "boot",
    "quote",
    "attack_flags",
}


@dataclass(frozen=True)
class DeviceManifest:
    """One check-in: who, which nonce, what runs, how the last install ended, what booted.

    Attributes:
        serial: the device serial; must be the certificate's.
        nonce: the server's single-use nonce this manifest answers.
        time: the device's clock (ISO 8601), recorded, never trusted.
        installed: the image in the booted slot, ``None`` in recovery.
        last_result: outcome and detail of the last install (``{}`` if none yet).
        boot: the last boot measurement.
        quote: the TPM quote over the boot PCR, ``None`` on a device without a TPM.
        attack_flags: what the device refused since its last accepted check-in (each
            one of :data:`ATTACK_FLAGS`, sorted, no repeats).
    """

    serial: str
    nonce: str
    time: str
    installed: InstalledTarget | None
    last_result: dict[str, str]
    boot: BootMeasurement
    quote: Quote | None
    attack_flags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The ``signed`` part of the envelope."""
        return {
            "_type": MANIFEST_TYPE,
            "serial": self.serial,
            "nonce": self.nonce,
            "time": self.time,
            "installed": self.installed.to_dict() if self.installed else None,
            "last_result": dict(self.last_result),
            "boot": self.boot.to_dict(),
            "quote": self.quote.to_dict() if self.quote else None,
            "attack_flags": sorted(set(self.attack_flags)),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> DeviceManifest:
        """Parse and check the ``signed`` part. Raises :class:`VerificationError`."""
        d = _obj(raw, "manifest", _MANIFEST_KEYS)
        if d["_type"] != MANIFEST_TYPE:
            raise VerificationError(f"the signed record is not a {MANIFEST_TYPE}")
        result = d["last_result"]
        if not isinstance(result, dict) or len(result) > 8:
            raise VerificationError("last_result must be an object of at most 8 strings")
        last = {
            _str(k, "last_result key", 32): _str(v, f"last_result.{k}", _MAX_DETAIL)
            for k, v in result.items()
        }
        flags = d["attack_flags"]
        if (
            not isinstance(flags, list)
            or len(flags) > len(ATTACK_FLAGS)
            or not all(isinstance(f, str) and f in ATTACK_FLAGS for f in flags)
            or len(set(flags)) != len(flags)
        ):
            raise VerificationError(
                f"attack_flags must be a list of distinct flags among {sorted(ATTACK_FLAGS)}"
            )
        return cls(
            serial=_str(d["serial"], "serial", 64),
            nonce=_str(d["nonce"], "nonce", 128),
            time=_str(d["time"], "time"),
            installed=None if d["installed"] is None else InstalledTarget.from_dict(d["installed"]),
            last_result=last,
            boot=BootMeasurement.from_dict(d["boot"]),
            quote=None if d["quote"] is None else Quote.from_dict(d["quote"]),
            attack_flags=tuple(flags),
        )
