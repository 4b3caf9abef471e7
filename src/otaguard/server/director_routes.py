"""HTTP routes of the director.

URL layout::

    GET    /api/v1/device/director/{N}.root.json   device: director root version N
    GET    /api/v1/devices/{serial}/assignment     operator: the device's assignment
    PUT    /api/v1/devices/{serial}/assignment     operator: assign a release, or hold
    DELETE /api/v1/devices/{serial}/assignment     operator: back to the default policy

The director's instruction itself is part of the check-in answer (:mod:`.checkin`).
Root versions are public signed metadata; they are served to authenticated devices so
that a device follows root rotations like ngclient does for the image repository.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any, Final

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from otaguard.model.errors import AccessDeniedError, OperatorError
from otaguard.model.names import DEVICE_SERIAL_PATTERN
from otaguard.model.version import MAX_VERSION_LENGTH, VERSION_PATTERN, Version
from otaguard.server._api import ErrorBody, StrictRequest
from otaguard.server.audit import role_route
from otaguard.server.auth import OperatorAuth, Role, note_audit
from otaguard.server.device_auth import DeviceGate
from otaguard.server.director import Director
from otaguard.server.storage.assignments import Assignment
from otaguard.server.storage.base import DeviceStore

__all__ = ["AssignmentBody", "AssignmentRequest", "director_router"]

logger = logging.getLogger(__name__)

_SERIAL_PARAM: Final = PathParam(description="device serial", pattern=f"^{DEVICE_SERIAL_PATTERN}$")
_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorBody, "description": "No such device or root version"},
}


class AssignmentRequest(StrictRequest):
    """Assign a release (``version``) or nothing (``hold``) to one device."""

    # Exactly one of the two, as the schema says (the route refuses both or neither).
    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "oneOf": [
                {"required": ["version"], "properties": {"version": {"type": "string"},
                                                         "hold": {"const": False}}},
                {"required": ["hold"], "properties": {"version": {"type": "null"},
                                                      "hold": {"const": True}}},
            ]
        }
    )  # fmt: skip

    version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        max_length=MAX_VERSION_LENGTH,
        description="release version",
    )
    hold: bool = Field(default=False, description="install nothing until changed")


class AssignmentBody(BaseModel):
    """A device's assignment (``mode`` ``default``: the newest release for its hardware)."""

    serial: str
    mode: str = Field(description="default, release or hold")
    version: str | None
    assigned_at: dt.datetime | None


def _body(serial: str, a: Assignment | None) -> AssignmentBody:
    if a is None:
        return AssignmentBody(serial=serial, mode="default", version=None, assigned_at=None)
    return AssignmentBody(serial=serial, mode=a.mode, version=a.version, assigned_at=a.assigned_at)


def director_router(
    director: Director | None,
    *,
    gate: DeviceGate,
    devices: DeviceStore,
    auth: OperatorAuth,
) -> APIRouter:
    """The director's device and operator routes (``director`` ``None``: the server runs
    none; the operator routes then say so instead of a bare 404)."""
    router = APIRouter(responses=_ERRORS)

    def _director() -> Director:
        if director is None:
            raise OperatorError("this server runs no director (start it with --director DIR)")
        return director

    @router.get(
        "/api/v1/device/director/{version}.root.json",
        tags=["device"],
        summary="A version of the director's root metadata (root rotation)",
        response_class=Response,
    )
    def director_root(
        request: Request, version: Annotated[int, PathParam(ge=1, le=10**6)]
    ) -> Response:
        """Exact signed bytes of director root ``version``; 404 past the newest."""
        if gate.authenticate(request.scope) is None:
            raise AccessDeniedError("the director root is served to enrolled devices")
        data = director.root(version) if director is not None else None
        if data is None:
            raise HTTPException(404, f"no director root version {version}")
        return Response(data, media_type="application/json")

    def _known(serial: str) -> None:
        if devices.get(serial) is None:
            raise HTTPException(404, f"no device {serial!r} in the registry")

    @router.get(
        "/api/v1/devices/{serial}/assignment",
        tags=["fleet"],
        summary="A device's director assignment",
        **role_route(auth, Role.VIEWER),
    )
    def get_assignment(serial: Annotated[str, _SERIAL_PARAM]) -> AssignmentBody:
        """What the director will instruct this device (by policy)."""
        _known(serial)
        return _body(serial, _director().assignments.get(serial))

    @router.put(
        "/api/v1/devices/{serial}/assignment",
        tags=["fleet"],
        summary="Assign a release to a device, or hold it",
        **role_route(auth, Role.OPERATOR, "device.assign"),
    )
    def put_assignment(
        serial: Annotated[str, _SERIAL_PARAM], req: AssignmentRequest, request: Request
    ) -> AssignmentBody:
        """From the next check-in, the director instructs this release (or nothing)."""
        note_audit(
            request, target=serial, detail=f"release {req.version}" if req.version else "hold"
        )
        d = _director()
        _known(serial)
        if req.hold == (req.version is not None):
            raise OperatorError("give either a version or hold, not both or neither")
        if req.version is not None:
            try:
                version = str(Version.parse(req.version))
            except ValueError as e:
                raise OperatorError(str(e)) from e
            a = Assignment(serial, "release", version, d.clock())
        else:
            a = Assignment(serial, "hold", None, d.clock())
        d.assignments.set(a)
        logger.info("assigned %s to %s", a.version or "hold", serial)
        d.on_instruction([serial])
        return _body(serial, a)

    @router.delete(
        "/api/v1/devices/{serial}/assignment",
        tags=["fleet"],
        summary="Back to the default policy (newest release for the hardware id)",
        **role_route(auth, Role.OPERATOR, "device.unassign"),
    )
    def delete_assignment(
        serial: Annotated[str, _SERIAL_PARAM], request: Request
    ) -> AssignmentBody:
        """Forget the device's assignment."""
        note_audit(request, target=serial)
        d = _director()
        _known(serial)
        d.assignments.clear(serial)
        d.on_instruction([serial])
        return _body(serial, None)

    return router
