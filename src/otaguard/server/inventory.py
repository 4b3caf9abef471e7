"""The device inventory: tags, groups, and what each device runs.

URL layout::

    GET    /api/v1/devices?group=G&where=F     viewer: devices with tags, groups, last
                                               check-in, running version, last result
    GET    /api/v1/devices/{serial}            viewer: one of them
    POST   /api/v1/devices/{serial}/tags       operator: set and remove tags
    GET    /api/v1/groups                      viewer: groups
    POST   /api/v1/groups                      operator: a static or dynamic group
    GET    /api/v1/groups/{name}               viewer: a group and its members
    POST   /api/v1/groups/{name}/members       operator: add/remove devices (static)
    DELETE /api/v1/groups/{name}               operator: delete a group

Groups: ``all`` (built in, every registered device), static (a list of serials) and
dynamic (a tag filter such as ``site=berlin,line=2``, evaluated when asked, so a device
joins or leaves with its tags). :meth:`Inventory.members` is the one way other server
code (rollouts) asks who is in a group. The running version and last result come from
the check-in history (:mod:`.checkin`): what the device's last signed manifest said.
"""

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from otaguard.model.errors import OperatorError
from otaguard.model.names import DEVICE_SERIAL_PATTERN
from otaguard.server._api import ErrorBody, StrictRequest
from otaguard.server.audit import role_route
from otaguard.server.auth import OperatorAuth, Role, note_audit
from otaguard.server.fleet import DeviceBody
from otaguard.server.storage.base import CheckinRecord, CheckinStore, DeviceRecord, DeviceStore
from otaguard.server.storage.fleet_base import GroupRecord, InventoryStore
from otaguard.server.tags import (
    BUILTIN_GROUP,
    FILTER_PATTERN,
    GROUP_NAME_PATTERN,
    MAX_TAGS_PER_DEVICE,
    TAG_KEY_PATTERN,
    TAG_VALUE_PATTERN,
    TagFilter,
    check_group_name,
    check_tag_key,
    format_filter,
    matches,
    parse_filter,
    parse_tag_assignments,
)

__all__ = [
    "MAX_GROUP_CHANGE",
    "GroupBody",
    "Inventory",
    "InventoryDeviceBody",
    "InventoryEntry",
    "inventory_router",
]

#: serials per membership change: a request is a person's edit, not a bulk import
MAX_GROUP_CHANGE: Final = 1000


@dataclass(frozen=True)
class InventoryEntry:
    """A device as the inventory shows it.

    Attributes:
        device: its registry record (serial, hardware id, status).
        tags: its tags.
        groups: the groups it is in, ``all`` first.
        last_checkin: its latest recorded check-in, or ``None``.
    """

    device: DeviceRecord
    tags: dict[str, str]
    groups: tuple[str, ...]
    last_checkin: CheckinRecord | None


class Inventory:
    """Tags, groups and check-in history, put together."""

    def __init__(self, *, devices: DeviceStore, checkins: CheckinStore, store: InventoryStore):
        """Read from the registry, the check-in history and the inventory store."""
        self.devices = devices
        self.checkins = checkins
        self.store = store

    def members(self, group: str) -> list[str]:
        """Serials of the registered devices in ``group`` (any status), sorted.

        Raises:
            UnknownNameError: no such group.
        """
        return self.store.members(group)

    def entries(
        self, *, group: str | None = None, where: TagFilter | None = None
    ) -> list[InventoryEntry]:
        """Every device (or those in ``group`` and matching ``where``), by serial.

        Raises:
            UnknownNameError: ``group`` does not exist.
        """
        wanted = set(self.store.members(group)) if group is not None else None
        records = [r for r in self.devices.list() if wanted is None or r.serial in wanted]
        return self._describe(records, where=where)

    def entry(self, serial: str) -> InventoryEntry | None:
        """One device, or ``None`` when it is not registered.

        Reads only this device's rows (not every device's tags and memberships, as
        :meth:`entries` does for the whole list).
        """
        rec = self.devices.get(serial)
        view = self.store.device_view(serial) if rec is not None else None
        if rec is None or view is None:
            return None
        history = self.checkins.history(serial, limit=1)
        return InventoryEntry(
            device=rec,
            tags=view.tags,
            groups=view.groups,
            last_checkin=history[0] if history else None,
        )

    def _describe(
        self, records: Iterable[DeviceRecord], *, where: TagFilter | None
    ) -> list[InventoryEntry]:
        tags = self.store.all_tags()
        static = self.store.static_memberships()
        dynamic = [g for g in self.store.groups() if g.where is not None]
        out: list[InventoryEntry] = []
        for rec in records:
            own = tags.get(rec.serial, {})
            if where is not None and not matches(where, own):
                continue
            groups = sorted(
                [*static.get(rec.serial, []), *(g.name for g in dynamic if _in(g, own))]
            )
            history = self.checkins.history(rec.serial, limit=1)
            out.append(
                InventoryEntry(
                    device=rec,
                    tags=own,
                    groups=(BUILTIN_GROUP, *groups),
                    last_checkin=history[0] if history else None,
                )
            )
        return out


def _in(group: GroupRecord, tags: dict[str, str]) -> bool:
    return group.where is not None and matches(group.where, tags)


class InventoryDeviceBody(DeviceBody):
    """A device with its tags, groups and what its last check-in said."""

    tags: dict[str, str]
    groups: list[str] = Field(description="'all' first, then static and dynamic groups")
    last_checkin: dt.datetime | None = Field(description="server time of the last check-in")
    last_outcome: str | None = Field(description="accepted or quarantined")
    running_version: str | None = Field(description="what the device reported it runs")
    last_result: str | None = Field(
        description="the device's last install result, or why the check-in quarantined it"
    )

    @classmethod
    def of_entry(cls, e: InventoryEntry) -> "InventoryDeviceBody":
        """Build the body of an inventory entry."""
        c = e.last_checkin
        return cls(
            **DeviceBody.of(e.device).model_dump(),
            tags=e.tags,
            groups=list(e.groups),
            last_checkin=c.time if c else None,
            last_outcome=c.outcome if c else None,
            running_version=c.running_version if c else None,
            last_result=c.detail if c else None,
        )


class TagsRequest(StrictRequest):
    """Tags to set and tag keys to remove."""

    set: dict[
        Annotated[str, Field(pattern=f"^{TAG_KEY_PATTERN}$")],
        Annotated[str, Field(pattern=f"^{TAG_VALUE_PATTERN}$")],
    ] = Field(default_factory=dict, max_length=MAX_TAGS_PER_DEVICE)
    remove: list[Annotated[str, Field(pattern=f"^{TAG_KEY_PATTERN}$")]] = Field(
        default_factory=list, max_length=MAX_TAGS_PER_DEVICE
    )


class TagsBody(BaseModel):
    """A device's tags after a change."""

    serial: str
    tags: dict[str, str]


class NewGroupRequest(StrictRequest):
    """A group to create: static without ``where``, dynamic with it."""

    name: str = Field(pattern=f"^{GROUP_NAME_PATTERN}$")
    where: str | None = Field(
        default=None, pattern=FILTER_PATTERN, max_length=1024, description="site=berlin,line=2"
    )


class MembersRequest(StrictRequest):
    """Serials to add to and remove from a static group."""

    add: list[Annotated[str, Field(pattern=f"^{DEVICE_SERIAL_PATTERN}$")]] = Field(
        default_factory=list, max_length=MAX_GROUP_CHANGE
    )
    remove: list[Annotated[str, Field(pattern=f"^{DEVICE_SERIAL_PATTERN}$")]] = Field(
        default_factory=list, max_length=MAX_GROUP_CHANGE
    )


class GroupBody(BaseModel):
    """A group and, when asked for one group, its members."""

    name: str
    kind: str = Field(description="builtin, static or dynamic")
    where: str | None
    members: list[str] | None = Field(default=None, description="serials (one group only)")

    @classmethod
    def of(cls, g: GroupRecord, members: list[str] | None = None) -> "GroupBody":
        """Build the body of a group record."""
        kind = "builtin" if g.name == BUILTIN_GROUP else "static" if g.where is None else "dynamic"
        where = format_filter(g.where) if g.where is not None else None
        return cls(name=g.name, kind=kind, where=where, members=members)


def _filter(text: str | None) -> TagFilter | None:
    if text is None:
        return None
    try:
        return parse_filter(text)
    except ValueError as e:
        raise OperatorError(str(e)) from e


def inventory_router(
    inv: Inventory, auth: OperatorAuth, clock: Callable[[], dt.datetime]
) -> tuple[APIRouter, APIRouter]:
    """The inventory routes: devices (under ``/api/v1/devices``) and groups."""
    devices = APIRouter(prefix="/api/v1/devices", tags=["fleet"])
    groups = APIRouter(prefix="/api/v1/groups", tags=["groups"])
    serial_param = PathParam(description="device serial", pattern=f"^{DEVICE_SERIAL_PATTERN}$")
    group_param = PathParam(description="group name", pattern=f"^{GROUP_NAME_PATTERN}$")

    viewer = role_route(auth, Role.VIEWER)

    @devices.get(
        "",
        summary="List devices",
        dependencies=viewer["dependencies"],
        openapi_extra=viewer["openapi_extra"],
        responses={
            **viewer["responses"],
            404: {"model": ErrorBody, "description": "No group of that name"},
        },
    )
    def list_devices(
        group: Annotated[str | None, Query(pattern=f"^{GROUP_NAME_PATTERN}$")] = None,
        where: Annotated[
            str | None, Query(pattern=FILTER_PATTERN, max_length=1024, description="k=v,k=v")
        ] = None,
    ) -> list[InventoryDeviceBody]:
        """Devices by serial, with tags, groups and their last check-in; filtered by
        group membership and a tag filter when given."""
        entries = inv.entries(group=group, where=_filter(where))
        return [InventoryDeviceBody.of_entry(e) for e in entries]

    @devices.get("/{serial}", summary="Show a device", **role_route(auth, Role.VIEWER))
    def show_device(serial: Annotated[str, serial_param]) -> InventoryDeviceBody:
        """One device: status, reason, certificates, tags, groups, last check-in."""
        entry = inv.entry(serial)
        if entry is None:
            raise HTTPException(404, f"no device {serial!r} in the registry")
        return InventoryDeviceBody.of_entry(entry)

    @devices.post(
        "/{serial}/tags", summary="Tag a device", **role_route(auth, Role.OPERATOR, "device.tag")
    )
    def tag_device(
        serial: Annotated[str, serial_param], req: TagsRequest, request: Request
    ) -> TagsBody:
        """Set tags (``set``, replacing a key's value) and remove keys (``remove``)."""
        changes = [*(f"{k}={v}" for k, v in req.set.items()), *(f"-{k}" for k in req.remove)]
        note_audit(request, detail=" ".join(changes))
        try:
            new = parse_tag_assignments(f"{k}={v}" for k, v in req.set.items()) if req.set else {}
            for key in req.remove:
                check_tag_key(key)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        return TagsBody(
            serial=serial, tags=inv.store.change_tags(serial, set_tags=new, remove=req.remove)
        )

    @groups.get("", summary="List groups", **role_route(auth, Role.VIEWER))
    def list_groups() -> list[GroupBody]:
        """Every group, ``all`` first."""
        return [GroupBody.of(g) for g in inv.store.groups()]

    @groups.post(
        "",
        summary="Create a group",
        status_code=201,
        **role_route(auth, Role.OPERATOR, "group.create"),
    )
    def create_group(req: NewGroupRequest, request: Request) -> GroupBody:
        """A static group (no ``where``) or a dynamic one (``where`` = a tag filter)."""
        note_audit(request, target=req.name, detail=f"where {req.where}" if req.where else "static")
        try:
            check_group_name(req.name)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        where = _filter(req.where)
        return GroupBody.of(inv.store.create_group(req.name, where=where, now=clock()))

    @groups.get("/{name}", summary="Show a group", **role_route(auth, Role.VIEWER))
    def show_group(name: Annotated[str, group_param]) -> GroupBody:
        """A group and its members (serials)."""
        return GroupBody.of(inv.store.group(name), inv.members(name))

    @groups.post(
        "/{name}/members",
        summary="Change a static group's members",
        **role_route(auth, Role.OPERATOR, "group.members"),
    )
    def change_members(
        name: Annotated[str, group_param], req: MembersRequest, request: Request
    ) -> GroupBody:
        """Add (registered) devices to a static group and remove devices from it."""
        note_audit(
            request,
            detail=" ".join([*(f"+{s}" for s in req.add), *(f"-{s}" for s in req.remove)]),
        )
        if req.add or req.remove:  # nothing to change: the group as it is
            inv.store.change_members(name, add=req.add, remove=req.remove)
        return GroupBody.of(inv.store.group(name), inv.members(name))

    @groups.delete(
        "/{name}", summary="Delete a group", **role_route(auth, Role.OPERATOR, "group.delete")
    )
    def delete_group(name: Annotated[str, group_param]) -> GroupBody:
        """Delete a static or dynamic group (the devices stay registered)."""
        group = inv.store.group(name)
        inv.store.delete_group(name)
        return GroupBody.of(group)

    return devices, groups
