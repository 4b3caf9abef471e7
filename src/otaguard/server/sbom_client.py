"""The operator's client of the SBOM index (``otaguard sbom find``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from otaguard.model.errors import TransportError
from otaguard.server.ops_client import OpsClient, _opt_str, _str

__all__ = ["SbomClient", "SbomFound", "SbomFoundDevice", "SbomFoundRelease"]


@dataclass(frozen=True)
class SbomFoundRelease:
    """A release containing the component."""

    target: str
    release: str
    name: str
    version: str | None
    purl: str | None


@dataclass(frozen=True)
class SbomFoundDevice:
    """A device running one of those releases (its newest check-in)."""

    serial: str
    target: str
    running_version: str
    last_checkin: dt.datetime


@dataclass(frozen=True)
class SbomFound:
    """The server's answer."""

    releases: tuple[SbomFoundRelease, ...]
    devices: tuple[SbomFoundDevice, ...]

    @classmethod
    def parse(cls, obj: Any) -> SbomFound:
        """Read the answer strictly.

        Raises:
            TransportError: malformed.
        """
        try:
            return cls(
                releases=tuple(
                    SbomFoundRelease(
                        _str(r["target"]),
                        _str(r["release"]),
                        _str(r["name"]),
                        _opt_str(r["version"]),
                        _opt_str(r["purl"]),
                    )
                    for r in obj["releases"]
                ),
                devices=tuple(
                    SbomFoundDevice(
                        _str(d["serial"]),
                        _str(d["target"]),
                        _str(d["running_version"]),
                        dt.datetime.fromisoformat(_str(d["last_checkin"])),
                    )
                    for d in obj["devices"]
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's SBOM answer is malformed") from e


class SbomClient(OpsClient):
    """The SBOM index over the operator API."""

    def find(self, component: str, *, version: str | None = None) -> SbomFound:
        """Releases containing ``component`` (name or purl), and the devices running them."""
        query = {"component": component} | ({"version": version} if version else {})
        answer = self._call(f"find {component}", "GET", f"/api/v1/sboms/find?{urlencode(query)}")
        return SbomFound.parse(answer)
