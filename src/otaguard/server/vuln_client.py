"""The operator's client of vulnerability response (``otaguard vuln import/affected/report``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from otaguard.model.errors import TransportError
from otaguard.server.ops_client import OpsClient, _opt_str, _str

__all__ = ["Affected", "AffectedHit", "ExposureRow", "RunningRow", "VulnClient"]


@dataclass(frozen=True)
class AffectedHit:
    """A release and the component version that makes it affected (or fixes it)."""

    target: str
    version: str
    component: str
    component_version: str | None


@dataclass(frozen=True)
class RunningRow:
    """A device running an affected release (its newest accepted check-in)."""

    serial: str
    target: str
    last_checkin: dt.datetime


@dataclass(frozen=True)
class Affected:
    """``vuln affected``: the advisory's id and summary, releases, devices, fixes."""

    id: str
    summary: str
    packages: tuple[str, ...]
    releases: tuple[AffectedHit, ...]
    devices: tuple[RunningRow, ...]
    fixed_by: tuple[AffectedHit, ...]


@dataclass(frozen=True)
class ExposureRow:
    """One device's exposure to one advisory (``patched_at`` None: still exposed)."""

    vuln_id: str
    serial: str
    target: str
    affected_since: dt.datetime
    patched_at: dt.datetime | None
    patched_to: str | None
    time_to_patch_seconds: float | None


def _hit(obj: Any) -> AffectedHit:
    return AffectedHit(
        _str(obj["target"]),
        _str(obj["version"]),
        _str(obj["component"]),
        _opt_str(obj["component_version"]),
    )


def _time(value: Any) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(_str(value))


class VulnClient(OpsClient):
    """Vulnerability response over the operator API."""

    def import_document(self, document: Any) -> list[tuple[str, bool]]:
        """Send a parsed OSV/VEX document (the server parses it again); (id, new) each."""
        answer = self._call("import vulnerabilities", "POST", "/api/v1/vulns", document)
        try:
            return [(_str(r["id"]), bool(r["new"])) for r in answer]
        except (KeyError, TypeError) as e:
            raise TransportError("the server's import answer is malformed") from e

    def affected(self, vuln_id: str) -> Affected:
        """Releases and devices ``vuln_id`` affects, and the releases that fix it."""
        path = f"/api/v1/vulns/{quote(vuln_id, safe='')}/affected"
        a = self._call(f"affected {vuln_id}", "GET", path)
        try:
            return Affected(
                id=_str(a["vuln"]["id"]),
                summary=_str(a["vuln"]["summary"]),
                packages=tuple(_str(p) for p in a["vuln"]["packages"]),
                releases=tuple(_hit(h) for h in a["releases"]),
                devices=tuple(
                    RunningRow(
                        _str(d["serial"]),
                        _str(d["target"]),
                        dt.datetime.fromisoformat(_str(d["last_checkin"])),
                    )
                    for d in a["devices"]
                ),
                fixed_by=tuple(_hit(h) for h in a["fixed_by"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's affected answer is malformed") from e

    def report(self) -> tuple[list[ExposureRow], bool]:
        """Every exposure with its time to patch; and whether the server cut the history."""
        a = self._call("vulnerability report", "GET", "/api/v1/vulns/report")
        try:
            rows = [
                ExposureRow(
                    vuln_id=_str(e["vuln_id"]),
                    serial=_str(e["serial"]),
                    target=_str(e["target"]),
                    affected_since=dt.datetime.fromisoformat(_str(e["affected_since"])),
                    patched_at=_time(e["patched_at"]),
                    patched_to=_opt_str(e["patched_to"]),
                    time_to_patch_seconds=None
                    if e["time_to_patch_seconds"] is None
                    else float(e["time_to_patch_seconds"]),
                )
                for e in a["exposures"]
            ]
            return rows, bool(a["truncated"])
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's report answer is malformed") from e
