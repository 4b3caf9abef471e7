"""Vulnerability response routes of the operator API (ADR 0034)::

    POST /api/v1/vulns                    operator (audited)  import OSV JSON or CycloneDX VEX
    GET  /api/v1/vulns                    viewer              imported advisories
    GET  /api/v1/vulns/report             viewer              exposure and time-to-patch per device
    GET  /api/v1/vulns/{vuln_id}/affected viewer              releases, devices running them, fixes

The import body is the file itself; the server parses it with the same pure, bounded
parser the CLI runs first (:func:`otaguard.model.vuln.parse_vulnerabilities`).
"""

# No "from __future__ import annotations": FastAPI evaluates the route's Annotated
# dependency (the operator) from the function's annotations at definition time.

import datetime as dt
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi import Path as PathParam
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from otaguard.model.vuln import MAX_VULN_FILE_BYTES, parse_vulnerabilities
from otaguard.server.audit import role_route
from otaguard.server.auth import Operator, OperatorAuth, Role, note_audit
from otaguard.server.vulns import AffectedRelease, VulnService

__all__ = ["vuln_router"]

#: an OSV id, a CVE or a GHSA id; nothing longer names an advisory
VULN_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"

_IMPORT_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "description": "an OSV record, a list of OSV records, or a CycloneDX VEX "
                    f"document; at most {MAX_VULN_FILE_BYTES} bytes",
                }
            }
        },
    }
}


class ImportedBody(BaseModel):
    """One advisory of the file, and whether its id is new."""

    id: str
    new: bool


class VulnBody(BaseModel):
    """An imported advisory."""

    id: str
    source: str
    summary: str
    aliases: list[str]
    packages: list[str]
    imported_at: dt.datetime
    imported_by: str


class ReleaseHitBody(BaseModel):
    """A release and the component version that makes it affected (or fixed)."""

    target: str
    version: str
    component: str
    component_version: str | None

    @classmethod
    def of(cls, h: AffectedRelease) -> "ReleaseHitBody":
        """From the service's record."""
        return cls(
            target=h.target,
            version=h.version,
            component=h.component,
            component_version=h.component_version,
        )


class RunningBody(BaseModel):
    """A device whose newest accepted check-in boots an affected release."""

    serial: str
    target: str
    last_checkin: dt.datetime


class AffectedBody(BaseModel):
    """Releases affected, the devices running them now, the releases that fix it."""

    vuln: VulnBody
    releases: list[ReleaseHitBody]
    devices: list[RunningBody]
    fixed_by: list[ReleaseHitBody]


class ExposureBody(BaseModel):
    """One device's exposure to one advisory."""

    vuln_id: str
    serial: str
    target: str
    affected_since: dt.datetime
    patched_at: dt.datetime | None
    patched_to: str | None
    time_to_patch_seconds: float | None


class ReportBody(BaseModel):
    """Every exposure; ``truncated`` if the check-in history read was cut."""

    exposures: list[ExposureBody]
    truncated: bool


def _vuln_body(stored: Any) -> VulnBody:
    v = stored.vuln
    return VulnBody(
        id=v.id,
        source=v.source,
        summary=v.summary,
        aliases=list(v.aliases),
        packages=[p.purl for p in v.affected],
        imported_at=stored.imported_at,
        imported_by=stored.imported_by,
    )


def vuln_router(service: VulnService, auth: OperatorAuth) -> APIRouter:
    """The vulnerability response routes."""
    router = APIRouter(prefix="/api/v1/vulns", tags=["vulns"])
    importer = auth.require(Role.OPERATOR, action="vuln.import")
    import_route = role_route(auth, Role.OPERATOR, "vuln.import")
    import_route["openapi_extra"] = import_route["openapi_extra"] | _IMPORT_BODY

    @router.post(
        "",
        summary="Import vulnerabilities (OSV JSON or CycloneDX VEX)",
        **import_route,
    )
    async def import_vulns(
        request: Request, op: Annotated[Operator, Depends(importer)]
    ) -> list[ImportedBody]:
        """Parse the file (bounded; a bad one is refused, naming the problem) and store it."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_VULN_FILE_BYTES:
            raise HTTPException(413, f"vulnerability file exceeds {MAX_VULN_FILE_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_VULN_FILE_BYTES:
                raise HTTPException(413, f"vulnerability file exceeds {MAX_VULN_FILE_BYTES} bytes")
        vulns = await run_in_threadpool(parse_vulnerabilities, bytes(body))
        note_audit(request, target=",".join(v.id for v in vulns)[:200])
        done = await run_in_threadpool(service.import_, vulns, actor=op.name)
        return [ImportedBody(id=i, new=new) for i, new in done]

    @router.get("", summary="Imported vulnerabilities", **role_route(auth, Role.VIEWER))
    def list_vulns() -> list[VulnBody]:
        """Every imported advisory, by id."""
        return [_vuln_body(s) for s in service.listed()]

    @router.get(
        "/report",
        summary="Exposure and time-to-patch per vulnerability and device",
        **role_route(auth, Role.VIEWER),
    )
    def report() -> ReportBody:
        """Per advisory and device: affected since, patched at, time to patch (null while
        exposed)."""
        found = service.report()
        return ReportBody(
            exposures=[
                ExposureBody(
                    vuln_id=e.vuln_id,
                    serial=e.serial,
                    target=e.target,
                    affected_since=e.affected_since,
                    patched_at=e.patched_at,
                    patched_to=e.patched_to,
                    time_to_patch_seconds=None
                    if e.time_to_patch is None
                    else e.time_to_patch.total_seconds(),
                )
                for e in found.exposures
            ],
            truncated=found.truncated,
        )

    @router.get(
        "/{vuln_id}/affected",
        summary="Releases and devices a vulnerability affects, and the releases fixing it",
        **role_route(auth, Role.VIEWER),
    )
    def affected(
        vuln_id: Annotated[str, PathParam(pattern=VULN_ID_PATTERN)],
    ) -> AffectedBody:
        """From the SBOM index: affected releases (newest first), the devices whose newest
        accepted check-in boots one, and newer releases of the same line that fix it."""
        found = service.affected(vuln_id)
        return AffectedBody(
            vuln=_vuln_body(found.vuln),
            releases=[ReleaseHitBody.of(h) for h in found.releases],
            devices=[
                RunningBody(serial=d.serial, target=d.target, last_checkin=d.since)
                for d in found.devices
            ],
            fixed_by=[ReleaseHitBody.of(h) for h in found.fixed_by],
        )

    return router
