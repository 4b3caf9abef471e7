"""Device health telemetry: the versioned schema and its pure, bounded parser.

Telemetry is untrusted input: it arrives over the HTTPS device API (authenticated by the
device certificate) and over MQTT (the broker authenticated the certificate; the topic
names the device). Both transports carry the same JSON document, schema
``otaguard.telemetry/1`` (``docs/telemetry.md``)::

    {"schema": "otaguard.telemetry/1", "serial": "dev1", "time": "2026-11-22T12:00:00Z",
     "boot_id": "<32 hex>", "seq": 7, "uptime_s": 3600, "boot_count": 12, "rollbacks": 0,
     "free_storage_bytes": 104857600, "agent_errors": 0, "running_version": "1.1.0",
     "last_install": {"result": "updated", "version": "1.1.0", "duration_s": 42.5},
     "attestation": "ok", "refused_attacks": 0}

:func:`parse_telemetry` takes bytes and returns a :class:`Telemetry` or raises
:class:`TelemetryError` naming the problem. It bounds the size (before parsing), the
nesting depth (by a scan before ``json.loads``, so a deeply nested document never reaches
the recursive parser), every string's length and every number's range, and refuses
duplicate keys, unknown keys, NaN and infinities.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from otaguard.model.errors import VerificationError
from otaguard.model.names import DEVICE_SERIAL_PATTERN

__all__ = [
    "ATTESTATION_RESULTS",
    "INSTALL_RESULTS",
    "MAX_TELEMETRY_BYTES",
    "MAX_TELEMETRY_DEPTH",
    "TELEMETRY_SCHEMA",
    "TOPIC_PREFIX",
    "LastInstall",
    "Telemetry",
    "TelemetryError",
    "hint_topic",
    "parse_telemetry",
    "serial_of_topic",
    "telemetry_json_schema",
    "telemetry_topic",
]

#: the schema name and version; a new incompatible version is a new name (the device API
#: version moves with it)
TELEMETRY_SCHEMA: Final = "otaguard.telemetry/1"
#: one report is ~400 bytes; 4 KiB leaves room for long version strings and refuses a
#: document meant to exhaust the parser or the database
MAX_TELEMETRY_BYTES: Final = 4096
#: the schema nests one object (last_install) inside the document: depth 2. A scan refuses
#: anything deeper before json.loads recurses into it
MAX_TELEMETRY_DEPTH: Final = 2
#: counters fit a JSON number exactly (2**53) and a database BIGINT
MAX_COUNTER: Final = 2**53
#: a version string or a device time: short display text
MAX_TEXT_CHARS: Final = 64
#: an install takes minutes; a day is far beyond any honest figure
MAX_INSTALL_SECONDS: Final = 86_400.0

INSTALL_RESULTS: Final = frozenset(
    {"none", "in-progress", "updated", "up-to-date", "failed", "rolled-back"}
)
ATTESTATION_RESULTS: Final = frozenset({"ok", "failed", "none"})

_SERIAL_RE: Final = re.compile(DEVICE_SERIAL_PATTERN)
_BOOT_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_PRINTABLE_RE: Final = re.compile(r"[\x20-\x7e]*")

_COUNTERS: Final = (
    "seq",
    "uptime_s",
    "boot_count",
    "rollbacks",
    "free_storage_bytes",
    "agent_errors",
    "refused_attacks",
)
_KEYS: Final = frozenset(
    {
        "schema",
        "serial",
        "time",
        "boot_id",
        "running_version",
        "last_install",
        "attestation",
        *_COUNTERS,
    }
)
_INSTALL_KEYS: Final = frozenset({"result", "version", "duration_s"})


def telemetry_json_schema() -> dict[str, Any]:
    """The JSON Schema of a telemetry document: what :func:`parse_telemetry` accepts,
    except that ``serial`` must also be the sender's own (a rule of the transport)."""
    text = {"type": "string", "pattern": "^[\\x20-\\x7e]*$", "maxLength": MAX_TEXT_CHARS}
    counter = {"type": "integer", "minimum": 0, "maximum": MAX_COUNTER}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": sorted(_KEYS),
        "properties": {
            "schema": {"const": TELEMETRY_SCHEMA},
            "serial": {"type": "string", "pattern": f"^{DEVICE_SERIAL_PATTERN}$"},
            "time": text,
            "boot_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "running_version": text,
            "attestation": {"enum": sorted(ATTESTATION_RESULTS)},
            "last_install": {
                "type": "object",
                "additionalProperties": False,
                "required": sorted(_INSTALL_KEYS),
                "properties": {
                    "result": {"enum": sorted(INSTALL_RESULTS)},
                    "version": text,
                    "duration_s": {"type": "number", "minimum": 0, "maximum": MAX_INSTALL_SECONDS},
                },
            },
            **{key: counter for key in _COUNTERS},
        },
    }


#: MQTT topics: ``otaguard/v1/devices/<serial>/telemetry`` (the device publishes) and
#: ``.../hint`` (the server publishes, the device subscribes). The broker's ACL
#: (deploy/mosquitto/acl) lets a certificate whose CN is <serial> use only its own pair.
TOPIC_PREFIX: Final = "otaguard/v1/devices/"


def telemetry_topic(serial: str) -> str:
    """The topic ``serial`` publishes its telemetry to."""
    return f"{TOPIC_PREFIX}{serial}/telemetry"


def hint_topic(serial: str) -> str:
    """The topic the server publishes ``serial``'s "check in now" hints to."""
    return f"{TOPIC_PREFIX}{serial}/hint"


def serial_of_topic(topic: str) -> str | None:
    """The serial a telemetry topic names, or ``None`` if it is not one."""
    if not topic.startswith(TOPIC_PREFIX) or not topic.endswith("/telemetry"):
        return None
    serial = topic[len(TOPIC_PREFIX) : -len("/telemetry")]
    return serial if _SERIAL_RE.fullmatch(serial) else None


class TelemetryError(VerificationError):
    """A telemetry document is malformed, too large, too deep or out of range."""


@dataclass(frozen=True)
class LastInstall:
    """The outcome and duration of the device's last install attempt."""

    result: str
    version: str
    duration_s: float


@dataclass(frozen=True)
class Telemetry:
    """One health report of one device (schema :data:`TELEMETRY_SCHEMA`).

    ``boot_id`` is random per boot and ``seq`` counts reports within a boot: the server
    uses both to tell one device from two devices sharing its credentials.
    """

    serial: str
    time: str
    boot_id: str
    seq: int
    uptime_s: int
    boot_count: int
    rollbacks: int
    free_storage_bytes: int
    agent_errors: int
    running_version: str
    last_install: LastInstall
    attestation: str
    refused_attacks: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of this report (what :func:`parse_telemetry` reads)."""
        return {
            "schema": TELEMETRY_SCHEMA,
            "serial": self.serial,
            "time": self.time,
            "boot_id": self.boot_id,
            "seq": self.seq,
            "uptime_s": self.uptime_s,
            "boot_count": self.boot_count,
            "rollbacks": self.rollbacks,
            "free_storage_bytes": self.free_storage_bytes,
            "agent_errors": self.agent_errors,
            "running_version": self.running_version,
            "last_install": {
                "result": self.last_install.result,
                "version": self.last_install.version,
                "duration_s": self.last_install.duration_s,
            },
            "attestation": self.attestation,
            "refused_attacks": self.refused_attacks,
        }

    def to_bytes(self) -> bytes:
        """Compact JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def _depth(data: bytes) -> int:
    """Deepest nesting of JSON objects/arrays in ``data`` (strings skipped), no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x7D, 0x5D):  # } ]
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise TelemetryError(f"telemetry repeats the key {key[:32]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise TelemetryError(f"telemetry holds {name}, which JSON does not allow")


def _text(doc: dict[str, Any], key: str, *, where: str = "") -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise TelemetryError(f"telemetry {where}{key} must be a string")
    if len(value) > MAX_TEXT_CHARS or not _PRINTABLE_RE.fullmatch(value):
        raise TelemetryError(
            f"telemetry {where}{key} must be printable ASCII of at most {MAX_TEXT_CHARS} chars"
        )
    return value


def _counter(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    # bool is an int in Python; JSON true is not a count
    if not isinstance(value, int) or isinstance(value, bool):
        raise TelemetryError(f"telemetry {key} must be an integer")
    if not 0 <= value <= MAX_COUNTER:
        raise TelemetryError(f"telemetry {key} is out of range (0..2^53)")
    return value


def _last_install(value: object) -> LastInstall:
    if not isinstance(value, dict):
        raise TelemetryError("telemetry last_install must be an object")
    unknown = set(value) - _INSTALL_KEYS
    if unknown:
        raise TelemetryError(f"telemetry last_install has unknown key {sorted(unknown)[0][:32]!r}")
    result = _text(value, "result", where="last_install.")
    if result not in INSTALL_RESULTS:
        raise TelemetryError(f"telemetry last_install.result {result!r} is not one of the schema's")
    duration = value.get("duration_s")
    if not isinstance(duration, int | float) or isinstance(duration, bool):
        raise TelemetryError("telemetry last_install.duration_s must be a number")
    if not (math.isfinite(duration) and 0 <= duration <= MAX_INSTALL_SECONDS):
        raise TelemetryError("telemetry last_install.duration_s is out of range (0..86400)")
    return LastInstall(result, _text(value, "version", where="last_install."), float(duration))


def parse_telemetry(data: bytes, *, serial: str) -> Telemetry:
    """Parse one telemetry document sent by (or for) the device ``serial``.

    Args:
        data: the document's bytes, as received.
        serial: who the transport authenticated (certificate, MQTT topic); the document
            must name the same device.

    Returns:
        The report, every field checked.

    Raises:
        TelemetryError: the first problem found, named (size, depth, JSON, key, type,
            range, another device's serial).
    """
    # 1. Size before anything else reads it; 2. depth before the recursive parser.
    if len(data) > MAX_TELEMETRY_BYTES:
        raise TelemetryError(f"telemetry is larger than {MAX_TELEMETRY_BYTES} bytes")
    if _depth(data) > MAX_TELEMETRY_DEPTH:
        raise TelemetryError(f"telemetry nests deeper than {MAX_TELEMETRY_DEPTH} levels")
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except UnicodeDecodeError as e:
        raise TelemetryError("telemetry is not UTF-8") from e
    except json.JSONDecodeError as e:
        raise TelemetryError(f"telemetry is not JSON: {e.msg} at {e.pos}") from e
    if not isinstance(doc, dict):
        raise TelemetryError("telemetry must be a JSON object")
    # 3. Schema and identity, then every field.
    if doc.get("schema") != TELEMETRY_SCHEMA:
        raise TelemetryError(f"telemetry schema must be {TELEMETRY_SCHEMA!r}")
    unknown = set(doc) - _KEYS
    if unknown:
        raise TelemetryError(f"telemetry has unknown key {sorted(unknown)[0][:32]!r}")
    named = _text(doc, "serial")
    if not _SERIAL_RE.fullmatch(named):
        raise TelemetryError("telemetry serial is not a device serial")
    if named != serial:
        raise TelemetryError(f"telemetry names device {named!r}, but comes from {serial!r}")
    boot_id = _text(doc, "boot_id")
    if not _BOOT_ID_RE.fullmatch(boot_id):
        raise TelemetryError("telemetry boot_id must be 32 lowercase hex digits")
    attestation = _text(doc, "attestation")
    if attestation not in ATTESTATION_RESULTS:
        raise TelemetryError(f"telemetry attestation {attestation!r} is not one of the schema's")
    counters = {key: _counter(doc, key) for key in _COUNTERS}
    return Telemetry(
        serial=named,
        time=_text(doc, "time"),
        boot_id=boot_id,
        running_version=_text(doc, "running_version"),
        last_install=_last_install(doc.get("last_install")),
        attestation=attestation,
        **counters,
    )
