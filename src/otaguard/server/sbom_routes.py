"""The SBOM index route of the operator API (ADR 0015)::

    GET /api/v1/sboms/find?component=NAME|PURL[&version=V]   viewer

Which releases contain a component (matched by purl or by name, optionally at one
version) and which devices' newest check-in reports running one of them.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Final

from fastapi import APIRouter, Query
from pydantic import BaseModel

from otaguard.server.audit import role_route
from otaguard.server.auth import OperatorAuth, Role
from otaguard.server.sbom_index import SbomIndex

__all__ = ["SbomComponentBody", "SbomDeviceBody", "SbomFindBody", "sbom_router"]

#: a component name, version or purl longer than this is not one an SBOM lists
MAX_QUERY_CHARS: Final = 1024


class SbomComponentBody(BaseModel):
    """A release containing the component."""

    target: str
    release: str
    name: str
    version: str | None
    purl: str | None


class SbomDeviceBody(BaseModel):
    """A device whose newest check-in runs one of those releases."""

    serial: str
    target: str
    running_version: str
    last_checkin: dt.datetime


class SbomFindBody(BaseModel):
    """Releases with the component (newest first) and the devices running them."""

    releases: list[SbomComponentBody]
    devices: list[SbomDeviceBody]


def sbom_router(index: SbomIndex, auth: OperatorAuth) -> APIRouter:
    """The SBOM index routes."""
    router = APIRouter(tags=["sboms"])

    @router.get(
        "/api/v1/sboms/find",
        summary="Releases containing a component, and the devices running them",
        **role_route(auth, Role.VIEWER),
    )
    def find(
        component: Annotated[
            str, Query(min_length=1, max_length=MAX_QUERY_CHARS, description="name or purl")
        ],
        version: Annotated[str | None, Query(min_length=1, max_length=MAX_QUERY_CHARS)] = None,
    ) -> SbomFindBody:
        """Answer "which devices run a vulnerable X" from the per-release SBOM index."""
        found = index.find(component, version=version)
        return SbomFindBody(
            releases=[
                SbomComponentBody(
                    target=h.target,
                    release=h.release,
                    name=h.name,
                    version=h.version,
                    purl=h.purl,
                )
                for h in found.releases
            ],
            devices=[
                SbomDeviceBody(
                    serial=d.serial,
                    target=d.target,
                    running_version=d.running_version,
                    last_checkin=d.last_checkin,
                )
                for d in found.devices
            ],
        )

    return router
