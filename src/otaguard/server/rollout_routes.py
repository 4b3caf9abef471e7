"""HTTP routes of rollouts and channel settings.

URL layout::

    GET    /api/v1/rollouts                   viewer: every rollout
    POST   /api/v1/rollouts                   release-manager: start a rollout
    GET    /api/v1/rollouts/{name}            viewer: status (evaluated now), failures
    POST   /api/v1/rollouts/{name}/{action}   release-manager: pause, resume, cancel
    PUT    /api/v1/groups/{name}/channels     release-manager: opt-out, security delay, window
    PUT    /api/v1/devices/{serial}/channels  release-manager: a device's feature opt-out
    GET    /api/v1/releases/check             viewer: releases for unknown hardware ids

Reading a rollout's status evaluates it, as the periodic task would: a halt or a phase
change is the server's own decision from the devices' reports, not the reader's.
"""

import dataclasses
import datetime as dt
from typing import Annotated, Final, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from otaguard.model.errors import OperatorError
from otaguard.model.names import DEVICE_SERIAL_PATTERN
from otaguard.model.version import MAX_VERSION_LENGTH, VERSION_PATTERN, Version
from otaguard.server._api import StrictRequest
from otaguard.server.audit import role_route
from otaguard.server.auth import OperatorAuth, Role, note_audit
from otaguard.server.channels import (
    MAX_PHASES,
    MAX_SECURITY_DELAY,
    MAX_WINDOW_CHARS,
    WINDOW_PATTERN,
    GroupPolicy,
    Rollout,
    Window,
)
from otaguard.server.rollouts import Rollouts, RolloutStatus
from otaguard.server.tags import GROUP_NAME_PATTERN

__all__ = [
    "GroupChannelsBody",
    "GroupChannelsRequest",
    "NewRolloutRequest",
    "RolloutBody",
    "rollout_router",
]

_NAME: Final = f"^{GROUP_NAME_PATTERN}$"


class NewRolloutRequest(StrictRequest):
    """A rollout to start."""

    name: str | None = Field(default=None, pattern=_NAME, description="default: GROUP-VERSION")
    release: str = Field(
        pattern=VERSION_PATTERN,
        max_length=MAX_VERSION_LENGTH,
        description="version of a served release",
    )
    group: str = Field(pattern=_NAME)
    phases: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        min_length=1,
        max_length=MAX_PHASES,
        description="increasing percentages ending at 100, e.g. 1,10,50,100",
    )
    success_threshold: int = Field(ge=0, le=100, description="% of admitted devices succeeded")
    failure_threshold: int = Field(ge=0, le=100, description="halt above this % failed")
    window: str | None = Field(
        default=None,
        pattern=WINDOW_PATTERN,
        max_length=MAX_WINDOW_CHARS,
        description="Mon-Fri 02:00-05:00",
    )


class FailureBody(BaseModel):
    """An admitted device whose install of the release failed."""

    serial: str
    error: str


class RolloutBody(BaseModel):
    """A rollout and, from its status, the counts of its evaluation."""

    name: str
    release: str
    group: str
    phases: list[int]
    phase: int = Field(description="current phase, from 1")
    percent: int = Field(description="share of the group admitted now")
    state: str = Field(description="active, paused, halted, cancelled or completed")
    reason: str = Field(description="why it halted (failing devices, errors) or changed")
    success_threshold: int
    failure_threshold: int
    window: str | None
    members: int | None = None
    admitted: int | None = None
    succeeded: int | None = None
    failed: list[FailureBody] | None = None

    @classmethod
    def of(cls, r: Rollout, status: RolloutStatus | None = None) -> "RolloutBody":
        """Build the body of a rollout (with its evaluation, when given)."""
        body = cls(
            name=r.name,
            release=str(r.version),
            group=r.group,
            phases=list(r.phases),
            phase=r.phase + 1,
            percent=r.percent,
            state=r.state,
            reason=r.reason,
            success_threshold=r.success_threshold,
            failure_threshold=r.failure_threshold,
            window=r.window.text if r.window else None,
        )
        if status is not None:
            ev = status.evaluation
            body.members = status.members
            body.admitted = ev.admitted
            body.succeeded = ev.succeeded
            body.failed = [FailureBody(serial=s, error=e) for s, e in ev.failed.items()]
        return body


class GroupChannelsRequest(StrictRequest):
    """Channel settings of a group to change (a missing field stays as it is)."""

    no_features: bool | None = Field(default=None, description="opt out of feature releases")
    security_delay_seconds: int | None = Field(
        default=None, ge=0, le=int(MAX_SECURITY_DELAY.total_seconds())
    )
    window: str | None = Field(
        default=None,
        pattern=f"^$|{WINDOW_PATTERN}",
        max_length=MAX_WINDOW_CHARS,
        description="Mon-Fri 02:00-05:00; '' removes it",
    )


class GroupChannelsBody(BaseModel):
    """A group's channel settings."""

    group: str
    no_features: bool
    security_delay_seconds: int
    window: str | None


class DeviceChannelsRequest(StrictRequest):
    """A device's feature opt-out."""

    no_features: bool


class DeviceChannelsBody(BaseModel):
    """A device's feature opt-out after the change."""

    serial: str
    no_features: bool


class OrphanBody(BaseModel):
    """A release naming hardware ids no registered device has."""

    target: str
    version: str
    unknown_hardware_ids: list[str]


def _window(text: str | None) -> Window | None:
    if not text:
        return None
    try:
        return Window.parse(text)
    except ValueError as e:
        raise OperatorError(str(e)) from e


def rollout_router(rollouts: Rollouts | None, auth: OperatorAuth) -> APIRouter:
    """The rollout and channel routes (``rollouts`` ``None``: no director; they say so)."""
    router = APIRouter(tags=["rollouts"])

    def _r() -> Rollouts:
        if rollouts is None:
            raise OperatorError("this server runs no director (start it with --director DIR)")
        return rollouts

    name_param = PathParam(description="rollout name", pattern=_NAME)
    group_param = PathParam(description="group name", pattern=_NAME)
    serial_param = PathParam(description="device serial", pattern=f"^{DEVICE_SERIAL_PATTERN}$")

    @router.get("/api/v1/rollouts", summary="List rollouts", **role_route(auth, Role.VIEWER))
    def list_rollouts() -> list[RolloutBody]:
        """Every rollout by name (not evaluated: see its status)."""
        return [RolloutBody.of(r) for r in _r().store.list()]

    @router.post(
        "/api/v1/rollouts",
        summary="Start a rollout",
        status_code=201,
        **role_route(auth, Role.RELEASE_MANAGER, "rollout.create"),
    )
    def create_rollout(req: NewRolloutRequest, request: Request) -> RolloutBody:
        """Roll a served release out to a group in phases (the last one 100%)."""
        try:
            version = Version.parse(req.release)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        name = req.name or f"{req.group}-{version}"[:64]
        note_audit(
            request,
            target=name,
            detail=f"{version} to {req.group} phases {','.join(map(str, req.phases))} "
            f"success {req.success_threshold}% failure {req.failure_threshold}%"
            + (f" window {req.window}" if req.window else ""),
        )
        try:
            rollout = Rollout(
                name=name,
                version=version,
                group=req.group,
                phases=tuple(req.phases),
                success_threshold=req.success_threshold,
                failure_threshold=req.failure_threshold,
                window=_window(req.window),
            )
        except ValueError as e:
            raise OperatorError(str(e)) from e
        return RolloutBody.of(_r().create(rollout))

    @router.get(
        "/api/v1/rollouts/{name}", summary="A rollout's status", **role_route(auth, Role.VIEWER)
    )
    def rollout_status(name: Annotated[str, name_param]) -> RolloutBody:
        """Evaluated now: phase, counts, and which devices failed with what error."""
        status = _r().status(_r().store.get(name))
        return RolloutBody.of(status.evaluation.rollout, status)

    def _action(action: Literal["pause", "resume", "cancel"]) -> None:
        @router.post(
            f"/api/v1/rollouts/{{name}}/{action}",
            summary=f"{action.capitalize()} a rollout",
            name=f"{action}_rollout",
            **role_route(auth, Role.RELEASE_MANAGER, f"rollout.{action}"),
        )
        def act(name: Annotated[str, name_param], request: Request) -> RolloutBody:
            note_audit(request, target=name)
            return RolloutBody.of(_r().transition(name, action))

        act.__doc__ = {
            "pause": "An active rollout admits nobody new until resumed.",
            "resume": "A paused or halted rollout admits by phase again.",
            "cancel": "The rollout admits nobody new, for good.",
        }[action]

    for action in ("pause", "resume", "cancel"):
        _action(action)

    @router.put(
        "/api/v1/groups/{name}/channels",
        tags=["groups"],
        summary="A group's channel settings",
        **role_route(auth, Role.RELEASE_MANAGER, "group.channels"),
    )
    def set_group_channels(
        name: Annotated[str, group_param], req: GroupChannelsRequest, request: Request
    ) -> GroupChannelsBody:
        """Feature opt-out, security delay (at most 7 days) and maintenance window."""
        note_audit(request, target=name, detail=req.model_dump_json(exclude_none=True))
        _r().inventory.store.group(name)  # UnknownNameError if absent
        old = _r().store.group_policies().get(name, GroupPolicy(name))
        new = dataclasses.replace(
            old,
            no_features=old.no_features if req.no_features is None else req.no_features,
            security_delay=old.security_delay
            if req.security_delay_seconds is None
            else dt.timedelta(seconds=req.security_delay_seconds),
            window=old.window if req.window is None else _window(req.window),
        )
        if new == old and req.model_dump(exclude_none=True) == {}:
            raise OperatorError("nothing to change: give --no-features/--features, "
                                "--security-delay or --window")  # fmt: skip
        _r().store.set_group_policy(new)
        return GroupChannelsBody(
            group=name,
            no_features=new.no_features,
            security_delay_seconds=int(new.security_delay.total_seconds()),
            window=new.window.text if new.window else None,
        )

    @router.put(
        "/api/v1/devices/{serial}/channels",
        tags=["fleet"],
        summary="A device's feature opt-out",
        **role_route(auth, Role.RELEASE_MANAGER, "device.channels"),
    )
    def set_device_channels(
        serial: Annotated[str, serial_param], req: DeviceChannelsRequest, request: Request
    ) -> DeviceChannelsBody:
        """Opt a device out of feature releases (never of security releases), or back in."""
        note_audit(request, target=serial, detail=f"no_features={req.no_features}")
        if _r().inventory.devices.get(serial) is None:
            raise HTTPException(404, f"no device {serial!r} in the registry")
        _r().store.set_device_no_features(serial, req.no_features)
        return DeviceChannelsBody(serial=serial, no_features=req.no_features)

    @router.get(
        "/api/v1/releases/check",
        tags=["rollouts"],
        summary="Releases naming hardware ids no registered device has",
        **role_route(auth, Role.VIEWER),
    )
    def check_releases() -> list[OrphanBody]:
        """A typo in a hardware id must not make a release vanish silently."""
        return [
            OrphanBody(
                target=r.name, version=str(r.info.version), unknown_hardware_ids=list(unknown)
            )
            for r, unknown in _r().orphans()
        ]

    return router
