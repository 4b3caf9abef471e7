"""Vulnerability response: which releases and devices an advisory affects, and how fast
devices got patched.

An imported advisory (:mod:`otaguard.model.vuln`) is matched against the SBOM index
(:mod:`otaguard.server.sbom_index`): a release is *affected* if its SBOM lists a component
of an affected package at an affected version (:func:`~otaguard.server.vuln_match.is_affected`).
A device *runs* a release when its newest accepted check-in reports booting that release's
image (the digest it booted, as the SBOM index joins them). A release *fixes* it when it
is on the same line as an affected one (the same target name but for the version), newer
than every affected release of that line, and lists the package at an unaffected version.

The report walks each exposed device's accepted check-ins: exposed from the first one that
boots an affected release, patched at the first later one booting an indexed release that
is not affected. A device booting an image the index does not know is not counted patched
(the server cannot say what it contains).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

from otaguard.model.version import Version
from otaguard.model.vuln import Vulnerability
from otaguard.server.sbom_index import SbomIndex
from otaguard.server.storage.fleet_base import UnknownNameError
from otaguard.server.storage.vulns import CheckinPoint, IndexedRelease, StoredVuln, VulnStore
from otaguard.server.vuln_match import is_affected, package_key

__all__ = [
    "AffectedRelease",
    "Exposure",
    "UnknownVulnerabilityError",
    "VulnAffected",
    "VulnReport",
    "VulnService",
]

logger = logging.getLogger(__name__)


class UnknownVulnerabilityError(UnknownNameError):
    """No vulnerability with that id was imported (HTTP 404, exit 2)."""


@dataclass(frozen=True)
class AffectedRelease:
    """A release whose SBOM lists an affected (or, for a fix, unaffected) component."""

    target: str
    version: str
    component: str
    component_version: str | None


@dataclass(frozen=True)
class RunningDevice:
    """A device whose newest accepted check-in boots an affected release."""

    serial: str
    target: str
    since: dt.datetime


@dataclass(frozen=True)
class VulnAffected:
    """``vuln affected ID``: affected releases, the devices running them, the fixes."""

    vuln: StoredVuln
    releases: list[AffectedRelease]
    devices: list[RunningDevice]
    fixed_by: list[AffectedRelease]


@dataclass(frozen=True)
class Exposure:
    """One device's exposure to one vulnerability (``patched_at`` None: still exposed)."""

    vuln_id: str
    serial: str
    target: str
    affected_since: dt.datetime
    patched_at: dt.datetime | None
    patched_to: str | None

    @property
    def time_to_patch(self) -> dt.timedelta | None:
        """Patched minus affected-since, or None while exposed."""
        return None if self.patched_at is None else self.patched_at - self.affected_since


@dataclass(frozen=True)
class VulnReport:
    """Every exposure of every imported vulnerability; ``truncated`` if history was cut."""

    exposures: list[Exposure]
    truncated: bool


def _line(target: str, version: str) -> str:
    # fw-1.0.0.img and fw-1.1.0.img are one line; the version is part of the target name.
    return target.replace(version, "{version}")


def _release_order(h: AffectedRelease) -> tuple[Version, str]:
    return _version(h.version), h.target


def _version(text: str) -> Version:
    try:
        return Version.parse(text)
    except ValueError:
        return Version.parse("0.0.0")


class VulnService:
    """Imports advisories and answers "affected" and "report" from the SBOM index."""

    def __init__(
        self, *, store: VulnStore, sboms: SbomIndex, clock: Callable[[], dt.datetime]
    ) -> None:
        """Use ``store`` and the server's ``sboms`` index (refreshed before each answer)."""
        self._store = store
        self._sboms = sboms
        self._clock = clock

    def import_(self, vulns: list[Vulnerability], *, actor: str) -> list[tuple[str, bool]]:
        """Store parsed advisories; (id, new) for each."""
        now = self._clock()
        return [(v.id, self._store.put(v, actor=actor, now=now)) for v in vulns]

    def listed(self) -> list[StoredVuln]:
        """Every imported advisory, by id."""
        return self._store.all()

    def _classify(
        self, vuln: Vulnerability
    ) -> tuple[list[IndexedRelease], list[AffectedRelease], list[AffectedRelease]]:
        """(every indexed release, affected hits, unaffected hits of the same packages)."""
        self._sboms.refresh()
        releases = self._store.releases()
        by_target = {r.target: r for r in releases}
        bad: list[AffectedRelease] = []
        good: list[AffectedRelease] = []
        for pkg in vuln.affected:
            key = package_key(pkg.purl)
            if key is None:
                continue
            name = key.rsplit("/", 1)[-1]
            for c in self._store.components(key, name):
                if package_key(c.purl) != key or c.target not in by_target:
                    continue
                hit = AffectedRelease(c.target, by_target[c.target].version, c.purl, c.version)
                (bad if is_affected(pkg, c.version) else good).append(hit)
        return releases, bad, good

    def affected(self, vuln_id: str) -> VulnAffected:
        """Affected releases, the devices running them now, and the releases that fix it.

        Raises:
            UnknownVulnerabilityError: never imported.
            ServerStorageError: the database failed.
        """
        stored = self._store.get(vuln_id)
        if stored is None:
            raise UnknownVulnerabilityError(f"no vulnerability {vuln_id!r} was imported")
        releases, bad, good = self._classify(stored.vuln)
        affected_targets = {h.target for h in bad}
        images = {r.image_sha256: r.target for r in releases if r.target in affected_targets}
        history, _ = self._store.history(sorted(images))
        devices = []
        for serial, points in groupby(history, key=lambda p: p.serial):
            last = list(points)[-1]
            if last.boot_sha256 in images:
                devices.append(RunningDevice(serial, images[last.boot_sha256], last.time))
        newest_bad: dict[str, Version] = {}
        for h in bad:
            line = _line(h.target, h.version)
            if line not in newest_bad or _version(h.version) > newest_bad[line]:
                newest_bad[line] = _version(h.version)
        fixed = [
            h
            for h in good
            if h.target not in affected_targets
            and _line(h.target, h.version) in newest_bad
            and _version(h.version) > newest_bad[_line(h.target, h.version)]
        ]
        return VulnAffected(
            vuln=stored,
            releases=sorted(set(bad), key=_release_order, reverse=True),
            devices=devices,
            fixed_by=sorted(set(fixed), key=_release_order),
        )

    def report(self) -> VulnReport:
        """Each device's exposure to each imported advisory, with its time to patch.

        Raises:
            ServerStorageError: the database failed.
        """
        exposures: list[Exposure] = []
        truncated = False
        for stored in self._store.all():
            releases, bad, _ = self._classify(stored.vuln)
            affected_targets = {h.target for h in bad}
            affected = {r.image_sha256: r.target for r in releases if r.target in affected_targets}
            unaffected = {r.image_sha256 for r in releases} - affected.keys()
            history, cut = self._store.history(sorted(affected))
            truncated |= cut
            for serial, points in groupby(history, key=lambda p: p.serial):
                found = _exposure(stored, serial, list(points), affected, unaffected)
                if found is not None:
                    exposures.append(found)
        return VulnReport(exposures=exposures, truncated=truncated)


def _exposure(
    stored: StoredVuln,
    serial: str,
    points: list[CheckinPoint],
    affected: dict[str, str],
    unaffected: set[str],
) -> Exposure | None:
    """The device's latest exposure that lasted past the import, or None."""
    by_version = {p.boot_sha256: p.running_version for p in points}
    episodes: list[tuple[dt.datetime, str, dt.datetime | None, str | None]] = []
    start: tuple[dt.datetime, str] | None = None
    for p in points:
        if start is None and p.boot_sha256 in affected:
            start = (p.time, affected[p.boot_sha256])
        elif start is not None and p.boot_sha256 in unaffected:
            episodes.append((start[0], start[1], p.time, by_version[p.boot_sha256]))
            start = None
    if start is not None:
        episodes.append((start[0], start[1], None, None))
    imported = stored.imported_at
    live = [e for e in episodes if e[2] is None or e[2] > imported]
    if not live:
        return None  # patched before the operator knew: never exposed to a known advisory
    began, target, patched, patched_to = live[-1]
    return Exposure(
        vuln_id=stored.vuln.id,
        serial=serial,
        target=target,
        affected_since=max(began, imported),
        patched_at=patched,
        patched_to=patched_to,
    )
