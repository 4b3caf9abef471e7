"""Vulnerability files an operator imports: OSV JSON or a CycloneDX VEX document.

Pure and bounded: :func:`parse_vulnerabilities` takes bytes and returns checked
:class:`Vulnerability` objects or raises :class:`VulnerabilityFileError` naming the
problem. No I/O, no version library: ranges are kept as the file states them and
evaluated by the server's matcher (:mod:`otaguard.server.vuln_match`).

Accepted shapes:

* OSV (https://ossf.github.io/osv-schema/): one record, or a list of records. Each needs
  ``id`` and ``affected[].package`` with a ``purl`` or an ``ecosystem`` + ``name`` whose
  ecosystem maps to a purl type. ``ranges`` of type ``ECOSYSTEM`` or ``SEMVER`` with
  ``introduced``/``fixed``/``last_affected`` events, and explicit ``versions``, are kept;
  ``GIT`` ranges name commits an SBOM does not list, and are dropped.
* CycloneDX VEX (``bomFormat: CycloneDX``, ``vulnerabilities[]``): each vulnerability's
  ``affects[].ref`` resolves to a component of the document (its purl) or is a purl;
  ``versions[]`` entries with status ``affected`` give a ``version`` or a ``vers:`` range;
  an analysis state of ``not_affected``/``false_positive`` leaves nothing affected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from otaguard.model.errors import OperatorError

__all__ = [
    "MAX_AFFECTED",
    "MAX_EVENTS",
    "MAX_JSON_DEPTH",
    "MAX_RECORDS",
    "MAX_VULN_FILE_BYTES",
    "AffectedPackage",
    "AffectedRange",
    "RangeEvent",
    "Vulnerability",
    "VulnerabilityFileError",
    "parse_vulnerabilities",
]

#: a file an operator imports holds a few advisories; the largest single OSV records
#: (Linux kernel CVEs with hundreds of ranges) stay well under 1 MiB
MAX_VULN_FILE_BYTES: Final = 8 * 1024 * 1024
#: OSV and VEX nest about 6 levels; deeper is not one of them (and would cost recursion)
MAX_JSON_DEPTH: Final = 32
#: records per file: an export of a whole ecosystem is not an operator's import
MAX_RECORDS: Final = 1000
#: affected packages per record, versions per package and events per range
MAX_AFFECTED: Final = 1000
MAX_EVENTS: Final = 1000
#: an id, alias, purl or version longer than this is not one
MAX_FIELD_CHARS: Final = 1024
#: OSV ecosystems that name a purl type (https://ossf.github.io/osv-schema/#affectedpackage-field)
_ECOSYSTEM_PURL: Final = {
    "PyPI": "pypi", "npm": "npm", "Go": "golang", "Maven": "maven", "crates.io": "cargo",
    "NuGet": "nuget", "RubyGems": "gem", "Packagist": "composer", "Hex": "hex",
    "Pub": "pub", "Debian": "deb", "Ubuntu": "deb", "Alpine": "apk", "ConanCenter": "conan",
    "GitHub Actions": "github", "OSS-Fuzz": "generic",
}  # fmt: skip
_EVENT_KINDS: Final = ("introduced", "fixed", "last_affected", "limit")
_RANGE_TYPES: Final = ("ECOSYSTEM", "SEMVER")
_NOT_AFFECTED_STATES: Final = ("not_affected", "false_positive")


class VulnerabilityFileError(OperatorError):
    """The vulnerability file is not OSV JSON nor CycloneDX VEX we can read (problem named)."""


@dataclass(frozen=True)
class RangeEvent:
    """One OSV range event: ``introduced``, ``fixed``, ``last_affected`` or ``limit``."""

    kind: str
    version: str


@dataclass(frozen=True)
class AffectedRange:
    """An OSV ``ECOSYSTEM``/``SEMVER`` range (events) or a VEX ``vers:`` range (``vers``)."""

    type: str
    events: tuple[RangeEvent, ...] = ()
    vers: str | None = None


@dataclass(frozen=True)
class AffectedPackage:
    """A package (purl without version) and the versions of it the file calls affected."""

    purl: str
    ranges: tuple[AffectedRange, ...]
    versions: tuple[str, ...]


@dataclass(frozen=True)
class Vulnerability:
    """One advisory, normalised from OSV or VEX."""

    id: str
    source: str
    summary: str
    aliases: tuple[str, ...]
    affected: tuple[AffectedPackage, ...]

    def to_json(self) -> str:
        """The normalised record (stored by the server; read back by :meth:`from_json`)."""
        return json.dumps(
            {
                "id": self.id, "source": self.source, "summary": self.summary,
                "aliases": list(self.aliases),
                "affected": [
                    {
                        "purl": p.purl, "versions": list(p.versions),
                        "ranges": [
                            {"type": r.type, "vers": r.vers,
                             "events": [{e.kind: e.version} for e in r.events]}
                            for r in p.ranges
                        ],
                    }
                    for p in self.affected
                ],
            },
            sort_keys=True,
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Vulnerability:
        """Read a record :meth:`to_json` wrote.

        Raises:
            VulnerabilityFileError: not such a record.
        """
        try:
            obj = json.loads(text)
            return cls(
                id=obj["id"],
                source=obj["source"],
                summary=obj["summary"],
                aliases=tuple(obj["aliases"]),
                affected=tuple(
                    AffectedPackage(
                        purl=p["purl"],
                        versions=tuple(p["versions"]),
                        ranges=tuple(
                            AffectedRange(
                                type=r["type"],
                                vers=r["vers"],
                                events=tuple(
                                    RangeEvent(k, v) for e in r["events"] for k, v in e.items()
                                ),
                            )
                            for r in p["ranges"]
                        ),
                    )
                    for p in obj["affected"]
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VulnerabilityFileError(f"stored vulnerability record unreadable: {e}") from e


def _walk_depth(obj: Any) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def _text(obj: Any, key: str, where: str, *, required: bool = True) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise VulnerabilityFileError(f"{where}: {key!r} missing or not a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise VulnerabilityFileError(f"{where}: {key!r} longer than {MAX_FIELD_CHARS} characters")
    return value


def _list(obj: Any, key: str, where: str, *, cap: int) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise VulnerabilityFileError(f"{where}: {key!r} is not a list")
    if len(value) > cap:
        raise VulnerabilityFileError(f"{where}: more than {cap} entries in {key!r}")
    return value


def _versionless(purl: str, where: str) -> str:
    if not purl.startswith("pkg:") or "/" not in purl:
        raise VulnerabilityFileError(f"{where}: {purl!r} is not a purl (pkg:TYPE/NAME)")
    # The package, not one version of it: drop qualifiers, subpath and version.
    base = purl.split("#", 1)[0].split("?", 1)[0]
    name_part = base.rsplit("/", 1)
    if "@" in name_part[-1]:
        base = base[: base.rindex("@")]
    return base


def _osv_package(entry: Any, where: str) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("package"), dict):
        raise VulnerabilityFileError(f"{where}: 'package' missing or not an object")
    pkg = entry["package"]
    if pkg.get("purl") is not None:
        return _versionless(_text(pkg, "purl", where), where)
    ecosystem = _text(pkg, "ecosystem", where).split(":", 1)[0]
    name = _text(pkg, "name", where)
    kind = _ECOSYSTEM_PURL.get(ecosystem)
    if kind is None:
        return None  # an ecosystem no SBOM purl names (Linux, Android…): nothing to match
    return f"pkg:{kind}/{name.lower() if kind == 'pypi' else name}"


def _osv_ranges(entry: dict[str, Any], where: str) -> tuple[AffectedRange, ...]:
    ranges = []
    for i, r in enumerate(_list(entry, "ranges", where, cap=MAX_AFFECTED)):
        rwhere = f"{where}.ranges[{i}]"
        kind = _text(r, "type", rwhere)
        if kind not in _RANGE_TYPES:
            continue  # GIT: commits, which an SBOM's versions are not
        events = []
        for j, e in enumerate(_list(r, "events", rwhere, cap=MAX_EVENTS)):
            if not isinstance(e, dict) or len(e) != 1:
                raise VulnerabilityFileError(f"{rwhere}.events[{j}]: not one event")
            ((k, _),) = e.items()
            if k not in _EVENT_KINDS:
                raise VulnerabilityFileError(f"{rwhere}.events[{j}]: unknown event {k!r}")
            events.append(RangeEvent(k, _text(e, k, f"{rwhere}.events[{j}]")))
        if not any(e.kind == "introduced" for e in events):
            raise VulnerabilityFileError(f"{rwhere}: no 'introduced' event")
        ranges.append(AffectedRange(type=kind, events=tuple(events)))
    return tuple(ranges)


def _osv(record: Any, where: str) -> Vulnerability:
    if not isinstance(record, dict):
        raise VulnerabilityFileError(f"{where}: not a JSON object")
    vid = _text(record, "id", where)
    where = f"{where} ({vid})"
    affected = []
    for i, entry in enumerate(_list(record, "affected", where, cap=MAX_AFFECTED)):
        ewhere = f"{where}.affected[{i}]"
        purl = _osv_package(entry, ewhere)
        versions = _list(entry, "versions", ewhere, cap=MAX_EVENTS)
        if not all(isinstance(v, str) and 0 < len(v) <= MAX_FIELD_CHARS for v in versions):
            raise VulnerabilityFileError(f"{ewhere}: 'versions' are not version strings")
        ranges = _osv_ranges(entry, ewhere)
        if purl is not None and (ranges or versions):
            affected.append(AffectedPackage(purl, ranges, tuple(versions)))
    if not affected:
        raise VulnerabilityFileError(f"{where}: no affected package with a purl and versions")
    aliases = _list(record, "aliases", where, cap=MAX_AFFECTED)
    return Vulnerability(
        id=vid,
        source="osv",
        summary=_text(record, "summary", where, required=False)[:MAX_FIELD_CHARS],
        aliases=tuple(str(a)[:MAX_FIELD_CHARS] for a in aliases),
        affected=tuple(affected),
    )


def _vex_refs(doc: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """bom-ref → (purl, version) of the document's components (nested ones too)."""
    refs: dict[str, tuple[str, str | None]] = {}

    def walk(components: list[Any]) -> Iterator[dict[str, Any]]:
        for c in components:
            if isinstance(c, dict):
                yield c
                if isinstance(c.get("components"), list):
                    yield from walk(c["components"])

    for c in walk(_list(doc, "components", "components", cap=MAX_RECORDS * 10)):
        ref, purl = c.get("bom-ref"), c.get("purl")
        if isinstance(ref, str) and isinstance(purl, str):
            version = c.get("version")
            refs[ref] = (purl, version if isinstance(version, str) else None)
    return refs


def _vex_affects(a: Any, awhere: str, refs: dict[str, tuple[str, str | None]]) -> AffectedPackage:
    ref = _text(a, "ref", awhere)
    if ref not in refs and not ref.startswith("pkg:"):
        raise VulnerabilityFileError(f"{awhere}: ref {ref!r} is no component's bom-ref")
    purl, version = refs.get(ref) or (ref, None)
    if version is None and "@" in purl.split("?")[0].split("#")[0].rsplit("/", 1)[-1]:
        version = purl.split("?")[0].split("#")[0].rsplit("@", 1)[1]
    versions: list[str] = []
    ranges: list[AffectedRange] = []
    for k, entry in enumerate(_list(a, "versions", awhere, cap=MAX_EVENTS)):
        vwhere = f"{awhere}.versions[{k}]"
        if not isinstance(entry, dict):
            raise VulnerabilityFileError(f"{vwhere}: not an object")
        if entry.get("status", "affected") != "affected":
            continue
        if "range" in entry:
            vers = _text(entry, "range", vwhere)
            if not vers.startswith("vers:"):
                raise VulnerabilityFileError(f"{vwhere}: range {vers!r} is not vers:")
            ranges.append(AffectedRange(type="VERS", vers=vers))
        else:
            versions.append(_text(entry, "version", vwhere))
    if not versions and not ranges and version is not None:
        versions.append(version)  # the component as the BOM lists it
    if not versions and not ranges:
        raise VulnerabilityFileError(f"{awhere}: no affected version or range")
    return AffectedPackage(_versionless(purl, awhere), tuple(ranges), tuple(versions))


def _vex(doc: dict[str, Any]) -> list[Vulnerability]:
    refs = _vex_refs(doc)
    found = []
    for i, v in enumerate(_list(doc, "vulnerabilities", "vulnerabilities", cap=MAX_RECORDS)):
        where = f"vulnerabilities[{i}]"
        vid = _text(v, "id", where)
        where = f"{where} ({vid})"
        affected = [
            _vex_affects(a, f"{where}.affects[{j}]", refs)
            for j, a in enumerate(_list(v, "affects", where, cap=MAX_AFFECTED))
        ]
        analysis = v.get("analysis")
        if isinstance(analysis, dict) and analysis.get("state") in _NOT_AFFECTED_STATES:
            affected = []  # the VEX statement: this product is not affected
        found.append(
            Vulnerability(
                id=vid,
                source="cyclonedx-vex",
                summary=_text(v, "description", where, required=False)[:MAX_FIELD_CHARS],
                aliases=(),
                affected=tuple(affected),
            )
        )
    if not found:
        raise VulnerabilityFileError("CycloneDX document lists no vulnerabilities")
    return found


def parse_vulnerabilities(data: bytes) -> list[Vulnerability]:
    """Parse an OSV record, a list of OSV records, or a CycloneDX VEX document.

    Args:
        data: the file's bytes.

    Returns:
        The vulnerabilities it states, in file order (ids unique).

    Raises:
        VulnerabilityFileError: too large, too deep, not JSON, or a required field is
            missing or malformed (the message names it).
    """
    if len(data) > MAX_VULN_FILE_BYTES:
        raise VulnerabilityFileError(f"file larger than {MAX_VULN_FILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except RecursionError as e:
        raise VulnerabilityFileError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise VulnerabilityFileError(f"not JSON: {e}") from e
    if _walk_depth(doc) > MAX_JSON_DEPTH:
        raise VulnerabilityFileError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(doc, dict) and doc.get("bomFormat") == "CycloneDX":
        vulns = _vex(doc)
    elif isinstance(doc, list):
        if not doc:
            raise VulnerabilityFileError("empty list: no OSV record")
        if len(doc) > MAX_RECORDS:
            raise VulnerabilityFileError(f"more than {MAX_RECORDS} records")
        vulns = [_osv(r, f"record[{i}]") for i, r in enumerate(doc)]
    elif isinstance(doc, dict):
        vulns = [_osv(doc, "record")]
    else:
        raise VulnerabilityFileError("neither an OSV record (object or list) nor CycloneDX VEX")
    ids = [v.id for v in vulns]
    if len(set(ids)) != len(ids):
        raise VulnerabilityFileError("the same vulnerability id twice in one file")
    return vulns
