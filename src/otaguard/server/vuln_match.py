"""Is this component version affected? purls by packageurl-python, versions by univers.

A package is compared by its normalised purl without version (packageurl-python applies
the purl spec's per-type rules, e.g. PyPI names lower-cased). A version is affected if it
is listed explicitly, or falls in an OSV ``ECOSYSTEM``/``SEMVER`` range, or in a VEX
``vers:`` range. OSV ranges are evaluated as the OSV schema's pseudo-code does: events
sorted by version, ``introduced`` opens, ``fixed`` closes at that version,
``last_affected`` closes after it. Versions are compared with univers's version class for
the purl's type (``pkg:pypi`` → PEP 440, ``pkg:deb`` → Debian, ``pkg:generic`` → semver…).

A version that the type's version class cannot parse is counted as affected (fail
closed: an operator is better told to look than told "fine"), and logged.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from packageurl import PackageURL
from univers.version_range import RANGE_CLASS_BY_SCHEMES, VersionRange
from univers.versions import InvalidVersion, SemverVersion, Version

from otaguard.model.vuln import AffectedPackage, AffectedRange

__all__ = ["is_affected", "package_key"]

logger = logging.getLogger(__name__)

#: a purl type univers has no scheme for is compared as semver (what "generic" uses)
_FALLBACK_VERSION: Final[type[Version]] = SemverVersion


def package_key(purl: str) -> str | None:
    """The normalised purl of the package (no version, qualifiers or subpath), or None if
    ``purl`` is not a purl."""
    try:
        p = PackageURL.from_string(purl)
    except ValueError:
        return None
    return str(PackageURL(type=p.type, namespace=p.namespace, name=p.name).to_string())


def _version_class(purl: str) -> type[Version]:
    kind = purl[4:].split("/", 1)[0].lower()
    range_class = RANGE_CLASS_BY_SCHEMES.get(kind)
    made = range_class.version_class if range_class is not None else None
    return made if made is not None else _FALLBACK_VERSION


def _in_osv_range(v: Any, rng: AffectedRange, make: type[Version]) -> bool:
    def order(event_version: str) -> tuple[int, Any]:
        return (0, None) if event_version == "0" else (1, make(event_version))

    events = sorted(
        (e for e in rng.events if e.kind != "limit"),
        key=lambda e: order(e.version),
        # equal versions: "introduced" before "fixed" as the OSV reference code sorts them
    )
    affected = False
    for e in events:
        if e.kind == "introduced":
            if e.version == "0" or v >= make(e.version):
                affected = True
        elif e.kind == "fixed":
            if v >= make(e.version):
                affected = False
        elif e.kind == "last_affected" and v > make(e.version):
            affected = False
    return affected


def _in_range(version: str, rng: AffectedRange, make: type[Version]) -> bool:
    if rng.vers is not None:
        parsed = VersionRange.from_string(rng.vers)  # type: ignore[no-untyped-call]
        return parsed.version_class(version) in parsed
    return _in_osv_range(make(version), rng, make)


def is_affected(package: AffectedPackage, version: str | None) -> bool:
    """Whether ``version`` of ``package`` is affected.

    Args:
        package: what the advisory says (purl without version, ranges, versions).
        version: the component's version in an SBOM; None (no version) counts as affected.
    """
    if version is None:
        return True
    if version in package.versions:
        return True
    make = _version_class(package.purl)
    for rng in package.ranges:
        try:
            if _in_range(version, rng, make):
                return True
        except (InvalidVersion, ValueError, TypeError) as e:
            logger.warning(
                "vulnerability match: %s@%s against %s unparsable (%s): counted as affected",
                package.purl, version, rng.vers or rng.type, e,
            )  # fmt: skip
            return True
    return False
