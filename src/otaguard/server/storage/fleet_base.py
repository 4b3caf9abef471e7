"""Storage interfaces of operator accounts, the audit log and the device inventory.

Beside :mod:`.base` (metadata, blobs, registry, check-ins); the adapters are
:mod:`.operators` and :mod:`.inventory`. Routes speak only to these interfaces.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from otaguard.model.errors import DeviceExistsError, UnknownDeviceError
from otaguard.server.audit_chain import AuditEntry
from otaguard.server.tags import TagFilter

__all__ = [
    "AuditStore",
    "DeviceView",
    "GroupRecord",
    "InventoryStore",
    "NameExistsError",
    "NewAuditEntry",
    "OperatorRecord",
    "OperatorStore",
    "UnknownNameError",
]


class UnknownNameError(UnknownDeviceError):
    """No group or operator of that name (HTTP 404, exit 2, like an unknown device)."""

    @property
    def kind(self) -> str:
        return "not found"


class NameExistsError(DeviceExistsError):
    """The group or operator name is taken (HTTP 409, exit 2)."""

    @property
    def kind(self) -> str:
        return "name taken"


@dataclass(frozen=True)
class OperatorRecord:
    """An operator token's account (the token itself is stored only as its SHA-256).

    Attributes:
        name: who the token is; what the audit log records.
        role: ``viewer``, ``operator``, ``release-manager`` or ``admin``.
        created_at: when the token was made.
        created_by: the operator who made it (``local`` for the data-directory command).
        revoked_at: when it was revoked, or ``None`` while it works.
    """

    name: str
    role: str
    created_at: dt.datetime
    created_by: str
    revoked_at: dt.datetime | None


class OperatorStore(ABC):
    """Operator accounts: name, role and token hash."""

    @abstractmethod
    def add(
        self, name: str, *, role: str, token_hash: str, created_by: str, now: dt.datetime
    ) -> OperatorRecord:
        """Create an account.

        Raises:
            NameExistsError: the name is taken (revoked names stay taken).
        """

    @abstractmethod
    def by_token_hash(self, token_hash: str) -> OperatorRecord | None:
        """The account whose token hashes to ``token_hash``, revoked or not."""

    @abstractmethod
    def list(self) -> list[OperatorRecord]:
        """Every account, by name."""

    @abstractmethod
    def revoke(self, name: str, *, now: dt.datetime) -> OperatorRecord:
        """Revoke the account's token for good.

        Raises:
            UnknownNameError: no such operator.
            OperatorError: it is already revoked.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class NewAuditEntry:
    """What a caller records; the store numbers, times and chains it."""

    actor: str
    role: str
    action: str
    target: str
    result: str
    request_id: str
    detail: str = ""


class AuditStore(ABC):
    """The append-only audit log: entries are added, never changed or removed."""

    @abstractmethod
    def append(self, entry: NewAuditEntry, *, now: dt.datetime) -> AuditEntry:
        """Append an entry chained to the newest one (safe across server processes)."""

    @abstractmethod
    def entries(
        self, *, after_seq: int = 0, since: dt.datetime | None = None, limit: int
    ) -> list[AuditEntry]:
        """Entries with ``seq > after_seq`` (and ``time >= since``), oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class GroupRecord:
    """A device group.

    Attributes:
        name: the group's name.
        where: the tag filter of a dynamic group; ``None`` for a static group.
        created_at: when it was created (``None`` for the built-in ``all``).
    """

    name: str
    where: TagFilter | None
    created_at: dt.datetime | None


@dataclass(frozen=True)
class DeviceView:
    """One device's tags and the groups it is in.

    Attributes:
        tags: its tags.
        groups: ``all`` first, then its static and dynamic groups by name.
        no_features: the device itself opted out of feature releases (``otaguard device
            set --no-features``; a group's opt-out is the group's channel setting).
    """

    tags: dict[str, str]
    groups: tuple[str, ...]
    no_features: bool = False


class InventoryStore(ABC):
    """Device tags and groups (static, dynamic by tag filter, and the built-in ``all``)."""

    @abstractmethod
    def change_tags(
        self, serial: str, *, set_tags: Mapping[str, str], remove: Sequence[str]
    ) -> dict[str, str]:
        """Set and remove tags of a device; returns its tags.

        Raises:
            UnknownDeviceError: no such device.
            OperatorError: the device would have more than the tag limit.
        """

    @abstractmethod
    def all_tags(self) -> dict[str, dict[str, str]]:
        """Every device's tags, by serial (devices without tags are absent)."""

    @abstractmethod
    def create_group(self, name: str, *, where: TagFilter | None, now: dt.datetime) -> GroupRecord:
        """Create a static (``where=None``) or dynamic group.

        Raises:
            NameExistsError: the name is taken (``all`` always is).
        """

    @abstractmethod
    def delete_group(self, name: str) -> None:
        """Delete a group (its static memberships go with it).

        Raises:
            UnknownNameError: no such group. OperatorError: ``all``.
        """

    @abstractmethod
    def groups(self) -> list[GroupRecord]:
        """Every group, ``all`` first, then by name."""

    @abstractmethod
    def group(self, name: str) -> GroupRecord:
        """One group. Raises :class:`UnknownNameError` when there is none."""

    @abstractmethod
    def change_members(self, name: str, *, add: Sequence[str], remove: Sequence[str]) -> None:
        """Add devices to and remove them from a static group.

        Raises:
            UnknownNameError: no such group. UnknownDeviceError: an added serial is not
                registered.
            OperatorError: the group is dynamic or ``all``.
        """

    @abstractmethod
    def static_memberships(self) -> dict[str, list[str]]:
        """Static group names by serial."""

    @abstractmethod
    def device_view(self, serial: str) -> DeviceView | None:
        """One device's tags and groups (``all`` first), or ``None`` when it is not
        registered; its cost does not grow with the fleet (a check-in asks it)."""

    @abstractmethod
    def members(self, name: str) -> list[str]:
        """Serials of the registered devices in the group, sorted, any status.

        Raises:
            UnknownNameError: no such group.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections."""
