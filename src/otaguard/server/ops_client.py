"""The operator's client of the inventory, group, operator-token and audit APIs.

Used by ``otaguard fleet list/show/tag/untag``, ``otaguard group``, ``otaguard operator``
and ``otaguard audit``. Same HTTP code as :class:`~otaguard.server.client.FleetClient`:
TLS verified against the server CA, bearer token, timeouts, bounded answers, one-line
errors by fault. Answers are parsed strictly into dataclasses; a malformed answer is a
:class:`TransportError`, never a ``KeyError``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlencode

from otaguard.model.errors import (
    AccessDeniedError,
    OperatorError,
    TransportError,
    UnknownDeviceError,
)
from otaguard.server.audit_chain import AuditEntry
from otaguard.server.client import MAX_FLEET_RESPONSE_BYTES, OperatorApiClient
from otaguard.server.storage.fleet_base import NameExistsError, UnknownNameError

__all__ = [
    "GroupInfo",
    "InventoryDevice",
    "NewOperator",
    "OperatorInfo",
    "OpsClient",
]

logger = logging.getLogger(__name__)

#: entries asked per page of the audit log (the server's own cap)
AUDIT_PAGE: Final = 1000


# The server's error line starts with its error kind; the client's error adds its own.
_PREFIX: Final = re.compile(r"^(unknown device|not found|name taken|device exists|error): ")


def _time(value: Any) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value is not None else None


def _opt_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError("expected a string or null")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


@dataclass(frozen=True)
class InventoryDevice:
    """A device as ``GET /api/v1/devices`` shows it."""

    serial: str
    hardware_id: str
    status: str
    reason: str
    tags: dict[str, str]
    groups: tuple[str, ...]
    last_checkin: dt.datetime | None
    last_outcome: str | None
    running_version: str | None
    last_result: str | None

    @classmethod
    def parse(cls, obj: Any) -> InventoryDevice:
        """Read one device of the server's answer.

        Raises:
            TransportError: the answer is malformed.
        """
        try:
            tags = obj["tags"]
            if not isinstance(tags, dict) or not isinstance(obj["groups"], list):
                raise TypeError("tags or groups")
            return cls(
                serial=_str(obj["serial"]),
                hardware_id=_str(obj["hardware_id"]),
                status=_str(obj["status"]),
                reason=_str(obj["reason"]),
                tags={_str(k): _str(v) for k, v in tags.items()},
                groups=tuple(_str(g) for g in obj["groups"]),
                last_checkin=_time(obj["last_checkin"]),
                last_outcome=_opt_str(obj["last_outcome"]),
                running_version=_opt_str(obj["running_version"]),
                last_result=_opt_str(obj["last_result"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's inventory answer is malformed") from e


@dataclass(frozen=True)
class GroupInfo:
    """A group; ``members`` only when one group was asked for."""

    name: str
    kind: str
    where: str | None
    members: tuple[str, ...] | None

    @classmethod
    def parse(cls, obj: Any) -> GroupInfo:
        """Read a group of the server's answer.

        Raises:
            TransportError: the answer is malformed.
        """
        try:
            members = obj.get("members")
            if members is not None and not isinstance(members, list):
                raise TypeError("members")
            return cls(
                name=_str(obj["name"]),
                kind=_str(obj["kind"]),
                where=_opt_str(obj["where"]),
                members=tuple(_str(m) for m in members) if members is not None else None,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's group answer is malformed") from e


@dataclass(frozen=True)
class OperatorInfo:
    """An operator token's account (never the token)."""

    name: str
    role: str
    created_at: dt.datetime
    created_by: str
    revoked_at: dt.datetime | None

    @classmethod
    def parse(cls, obj: Any) -> OperatorInfo:
        """Read an operator of the server's answer.

        Raises:
            TransportError: the answer is malformed.
        """
        try:
            return cls(
                name=_str(obj["name"]),
                role=_str(obj["role"]),
                created_at=dt.datetime.fromisoformat(obj["created_at"]),
                created_by=_str(obj["created_by"]),
                revoked_at=_time(obj["revoked_at"]),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's operator answer is malformed") from e


@dataclass(frozen=True)
class NewOperator:
    """A new operator account and its token (shown once)."""

    operator: OperatorInfo
    token: str

    def __repr__(self) -> str:
        # The token is a secret: keep it out of logs and tracebacks.
        return f"NewOperator(operator={self.operator!r}, token=<hidden>)"


_AUDIT_TEXT: Final = (
    "actor", "role", "action", "target", "result", "request_id", "detail", "prev", "hash"
)  # fmt: skip


def _entry(obj: Any) -> AuditEntry:
    try:
        if not isinstance(obj["seq"], int):
            raise TypeError("seq")
        return AuditEntry(
            seq=obj["seq"],
            time=dt.datetime.fromisoformat(obj["time"]),
            **{k: _str(obj[k]) for k in _AUDIT_TEXT},
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise TransportError("the server's audit answer is malformed") from e


class OpsClient(OperatorApiClient):
    """Inventory, groups, operator tokens and the audit log, over the operator API."""

    def _call(
        self,
        what: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        not_found: type[UnknownDeviceError] = UnknownNameError,
    ) -> Any:
        headers = {"Content-Type": "application/json"} if body is not None else None
        status, _, data = self._client.request(
            method,
            path,
            body=json.dumps(body).encode() if body is not None else None,
            headers=headers,
            limit=MAX_FLEET_RESPONSE_BYTES,
        )
        reason = _PREFIX.sub("", self._client.reason(data), count=1)
        if status == 404:
            raise not_found(f"{what}: {reason}")
        if status == 409:
            raise NameExistsError(f"{what}: {reason}")
        if status == 403:
            raise AccessDeniedError(f"{what}: {reason}")
        if status == 422:
            raise OperatorError(f"{what}: server refused the request: {reason}")
        self._client.check(what, status, data)
        try:
            return json.loads(data)
        except ValueError as e:
            raise TransportError(f"{what}: the server's answer is not JSON") from e

    # -- inventory -----------------------------------------------------------------------
    def devices(
        self, *, group: str | None = None, where: str | None = None
    ) -> list[InventoryDevice]:
        """Devices with tags, groups and last check-in, optionally filtered."""
        query = {k: v for k, v in (("group", group), ("where", where)) if v is not None}
        path = "/api/v1/devices" + (f"?{urlencode(query)}" if query else "")
        answer = self._call("list devices", "GET", path)
        if not isinstance(answer, list):
            raise TransportError("the server's device list is malformed")
        return [InventoryDevice.parse(d) for d in answer]

    def device(self, serial: str) -> InventoryDevice:
        """One device. Raises :class:`UnknownDeviceError` if not registered."""
        path = f"/api/v1/devices/{quote(serial, safe='')}"
        return InventoryDevice.parse(
            self._call(f"show {serial}", "GET", path, not_found=UnknownDeviceError)
        )

    def change_tags(
        self, serial: str, *, set_tags: Mapping[str, str], remove: Sequence[str]
    ) -> dict[str, str]:
        """Set and remove a device's tags; returns its tags."""
        path = f"/api/v1/devices/{quote(serial, safe='')}/tags"
        body = {"set": dict(set_tags), "remove": list(remove)}
        answer = self._call(f"tag {serial}", "POST", path, body, not_found=UnknownDeviceError)
        try:
            return {str(k): str(v) for k, v in answer["tags"].items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise TransportError("the server's tag answer is malformed") from e

    # -- groups ----------------------------------------------------------------------------
    def groups(self) -> list[GroupInfo]:
        """Every group, ``all`` first."""
        answer = self._call("list groups", "GET", "/api/v1/groups")
        if not isinstance(answer, list):
            raise TransportError("the server's group list is malformed")
        return [GroupInfo.parse(g) for g in answer]

    def group(self, name: str) -> GroupInfo:
        """One group and its members."""
        path = f"/api/v1/groups/{quote(name, safe='')}"
        return GroupInfo.parse(self._call(f"show group {name}", "GET", path))

    def create_group(self, name: str, *, where: str | None) -> GroupInfo:
        """A static group (``where=None``) or a dynamic one."""
        body = {"name": name, "where": where}
        return GroupInfo.parse(self._call(f"create group {name}", "POST", "/api/v1/groups", body))

    def change_members(
        self, name: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> GroupInfo:
        """Add devices to or remove them from a static group."""
        path = f"/api/v1/groups/{quote(name, safe='')}/members"
        body = {"add": list(add), "remove": list(remove)}
        return GroupInfo.parse(self._call(f"change group {name}", "POST", path, body))

    def delete_group(self, name: str) -> GroupInfo:
        """Delete a group."""
        path = f"/api/v1/groups/{quote(name, safe='')}"
        return GroupInfo.parse(self._call(f"delete group {name}", "DELETE", path))

    # -- operator tokens -------------------------------------------------------------------
    def add_operator(self, name: str, role: str) -> NewOperator:
        """Make a named operator token (admin); the token is in the answer only."""
        answer = self._call(
            f"add operator {name}", "POST", "/api/v1/operators", {"name": name, "role": role}
        )
        try:
            return NewOperator(OperatorInfo.parse(answer["operator"]), str(answer["token"]))
        except (KeyError, TypeError) as e:
            raise TransportError("the server's new-operator answer is malformed") from e

    def operators(self) -> list[OperatorInfo]:
        """Every named operator token's account (admin)."""
        answer = self._call("list operators", "GET", "/api/v1/operators")
        if not isinstance(answer, list):
            raise TransportError("the server's operator list is malformed")
        return [OperatorInfo.parse(o) for o in answer]

    def revoke_operator(self, name: str) -> OperatorInfo:
        """Revoke a named operator token (admin)."""
        path = f"/api/v1/operators/{quote(name, safe='')}/revoke"
        return OperatorInfo.parse(self._call(f"revoke operator {name}", "POST", path))

    # -- audit -----------------------------------------------------------------------------
    def audit(self, *, since: dt.datetime | None = None) -> Iterator[AuditEntry]:
        """Every audit entry (at or after ``since``), oldest first, a page at a time."""
        after = 0
        while True:
            query: dict[str, str | int] = {"after": after, "limit": AUDIT_PAGE}
            if since is not None:
                query["since"] = since.astimezone(dt.UTC).isoformat()
            answer = self._call("read the audit log", "GET", f"/api/v1/audit?{urlencode(query)}")
            if not isinstance(answer, list):
                raise TransportError("the server's audit answer is malformed")
            page = [_entry(e) for e in answer]
            yield from page
            if len(page) < AUDIT_PAGE:
                return
            if page[-1].seq <= after:
                raise TransportError("the server's audit pages do not advance")
            after = page[-1].seq
