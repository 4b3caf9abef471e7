"""A release's software bill of materials: CycloneDX JSON, checked and bound to its image.

Every release carries a CycloneDX 1.5 or 1.6 JSON SBOM (EU CRA). It travels as a target
of the image repository of its own (``<image target>.cdx.json``, custom
``{"sbom_of": <image target>}``) and the image target's ``custom`` binds it::

    "sbom": {"path": "fw-1.1.0.img.cdx.json", "hashes": {"sha256": "…"}, "length": 1234}

so the offline targets signature covers the SBOM's exact bytes, and a device downloads it
through the same python-tuf path as the image (length and hash checked).

Pure: bytes in, a checked object out, :class:`VerificationError` otherwise. The schema
check is cyclonedx-python-lib's JSON validator (imported when first needed: the device
agent never validates a schema, it checks hashes).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from otaguard.model.errors import VerificationError
from otaguard.model.names import check_target_name

__all__ = [
    "MAX_SBOM_BYTES",
    "MAX_SBOM_COMPONENTS",
    "SBOM_CUSTOM_KEY",
    "SBOM_OF_KEY",
    "SBOM_SPEC_VERSIONS",
    "SBOM_SUFFIX",
    "Component",
    "Sbom",
    "SbomRef",
    "is_sbom_target",
    "parse_sbom",
    "sbom_target_name",
]

#: an SBOM larger than this is refused at release time and never downloaded by a device.
#: A Yocto image's CycloneDX SBOM with a few thousand packages is 1-5 MB; 16 MiB leaves
#: room for that, and bounds what a device stages and the server parses.
MAX_SBOM_BYTES: Final = 16 * 1024 * 1024
#: components indexed per SBOM (nested ones counted): far above a firmware image's few
#: thousand packages, a bound on the server's index rows per release
MAX_SBOM_COMPONENTS: Final = 50_000
#: the CycloneDX specification versions accepted (JSON only)
SBOM_SPEC_VERSIONS: Final = ("1.5", "1.6")
#: the image target's ``custom`` key binding its SBOM target
SBOM_CUSTOM_KEY: Final = "sbom"
#: the SBOM target's ``custom`` key naming the image it describes
SBOM_OF_KEY: Final = "sbom_of"
#: appended to the image target name to name its SBOM target
SBOM_SUFFIX: Final = ".cdx.json"
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
# Component fields are indexed as database strings; longer ones are not package names.
_MAX_FIELD: Final = 1024


def sbom_target_name(image_target: str) -> str:
    """The SBOM target's name for an image target (``fw-1.1.0.img.cdx.json``).

    Raises:
        ValueError: the name would not be a valid target name (too long).
    """
    return check_target_name(f"{image_target}{SBOM_SUFFIX}")


def is_sbom_target(custom: Any) -> bool:
    """True when a target's ``custom`` marks it as an SBOM, not a firmware image."""
    return isinstance(custom, Mapping) and SBOM_OF_KEY in custom


@dataclass(frozen=True)
class SbomRef:
    """The SBOM binding in an image target's ``custom``: which target, which bytes."""

    path: str
    sha256: str
    length: int

    def __post_init__(self) -> None:
        check_target_name(self.path)
        if not isinstance(self.sha256, str) or _SHA256.fullmatch(self.sha256) is None:
            raise ValueError("sbom sha256 must be 64 lowercase hex digits")
        if isinstance(self.length, bool) or not 0 < self.length <= MAX_SBOM_BYTES:
            raise ValueError(f"sbom length must be between 1 and {MAX_SBOM_BYTES} bytes")

    @classmethod
    def from_custom(cls, raw: Any) -> SbomRef:
        """Parse the ``sbom`` value of an image target's ``custom``.

        Raises:
            ValueError: malformed.
        """
        if not isinstance(raw, Mapping) or set(raw) != {"path", "hashes", "length"}:
            raise ValueError("sbom must be an object of path, hashes and length")
        hashes = raw["hashes"]
        if not isinstance(hashes, Mapping) or not isinstance(hashes.get("sha256"), str):
            raise TypeError("sbom hashes must hold a sha256")
        if not isinstance(raw["path"], str) or not isinstance(raw["length"], int):
            raise TypeError("sbom path must be a string and length an integer")
        return cls(raw["path"], hashes["sha256"], raw["length"])

    def to_custom(self) -> dict[str, Any]:
        """The ``sbom`` value of an image target's ``custom``."""
        return {"path": self.path, "hashes": {"sha256": self.sha256}, "length": self.length}


@dataclass(frozen=True)
class Component:
    """One component an SBOM lists (what the server indexes)."""

    name: str
    version: str | None
    purl: str | None
    type: str


@dataclass(frozen=True)
class Sbom:
    """A checked CycloneDX JSON SBOM: its exact bytes, digest and components."""

    data: bytes
    spec_version: str
    components: tuple[Component, ...]

    @property
    def sha256(self) -> str:
        """SHA-256 of the exact bytes (what the image target binds)."""
        return hashlib.sha256(self.data).hexdigest()


def _text(raw: Any, what: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > _MAX_FIELD:
        raise VerificationError(f"SBOM {what} must be a string of at most {_MAX_FIELD} characters")
    return raw


def _walk(components: Any) -> Iterator[Mapping[str, Any]]:
    """Every component, nested ones included (the schema already checked the shape)."""
    stack = [components] if isinstance(components, list) else []
    while stack:
        for c in stack.pop():
            if isinstance(c, Mapping):
                yield c
                if isinstance(c.get("components"), list):
                    stack.append(c["components"])


def _schema_problem(text: str, spec_version: str) -> str | None:
    """cyclonedx-python-lib's JSON schema check: the first problem, located, or None."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    schema = SchemaVersion.from_version(spec_version)
    error = JsonStrictValidator(schema).validate_str(text)
    if error is None:
        return None
    where = "/".join(str(p) for p in getattr(error.data, "absolute_path", ()))
    message = getattr(error.data, "message", str(error))
    return f"{message} (at {where or 'the top level'})"


def parse_sbom(data: bytes) -> Sbom:
    """Check ``data`` is a CycloneDX 1.5 or 1.6 JSON SBOM and list its components.

    Raises:
        VerificationError: too large, not JSON, not CycloneDX, another spec version, or
            not valid against its CycloneDX JSON schema (the message names the problem
            and where it is).
    """
    if len(data) > MAX_SBOM_BYTES:
        raise VerificationError(f"SBOM is larger than {MAX_SBOM_BYTES} bytes")
    try:
        text = data.decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise VerificationError(f"SBOM is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX":
        raise VerificationError('SBOM is not CycloneDX JSON (no "bomFormat": "CycloneDX")')
    spec = doc.get("specVersion")
    if spec not in SBOM_SPEC_VERSIONS:
        raise VerificationError(
            f"SBOM is CycloneDX {spec!r}; only {' and '.join(SBOM_SPEC_VERSIONS)} are accepted"
        )
    problem = _schema_problem(text, spec)
    if problem is not None:
        raise VerificationError(f"SBOM is not valid CycloneDX {spec}: {problem}")
    components: list[Component] = []
    for c in _walk(doc.get("components")):
        if len(components) >= MAX_SBOM_COMPONENTS:
            raise VerificationError(f"SBOM lists more than {MAX_SBOM_COMPONENTS} components")
        components.append(
            Component(
                name=_text(c.get("name"), "component name") or "",
                version=_text(c.get("version"), "component version"),
                purl=_text(c.get("purl"), "component purl"),
                type=_text(c.get("type"), "component type") or "",
            )
        )
    return Sbom(data=data, spec_version=spec, components=tuple(components))
