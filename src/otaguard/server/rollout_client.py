"""The operator's client of the rollout and channel APIs (``otaguard rollout``,
``group set``, ``fleet set``, ``release check``).

The same HTTP code, errors and strict parsing as :class:`~.ops_client.OpsClient`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from otaguard.model.errors import TransportError, UnknownDeviceError
from otaguard.server.ops_client import OpsClient, _opt_str, _str

__all__ = ["GroupChannels", "OrphanRelease", "RolloutClient", "RolloutInfo"]


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return int(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


@dataclass(frozen=True)
class RolloutInfo:
    """A rollout as the server shows it (counts only from ``status``)."""

    name: str
    release: str
    group: str
    phases: tuple[int, ...]
    phase: int
    percent: int
    state: str
    reason: str
    success_threshold: int
    failure_threshold: int
    window: str | None
    members: int | None
    admitted: int | None
    succeeded: int | None
    failed: tuple[tuple[str, str], ...] | None

    @classmethod
    def parse(cls, obj: Any) -> RolloutInfo:
        """Read a rollout of the server's answer.

        Raises:
            TransportError: the answer is malformed.
        """
        try:
            failed = obj.get("failed")
            if failed is not None and not isinstance(failed, list):
                raise TypeError("failed")
            if not isinstance(obj["phases"], list):
                raise TypeError("phases")
            return cls(
                name=_str(obj["name"]),
                release=_str(obj["release"]),
                group=_str(obj["group"]),
                phases=tuple(_int(p) for p in obj["phases"]),
                phase=_int(obj["phase"]),
                percent=_int(obj["percent"]),
                state=_str(obj["state"]),
                reason=_str(obj["reason"]),
                success_threshold=_int(obj["success_threshold"]),
                failure_threshold=_int(obj["failure_threshold"]),
                window=_opt_str(obj["window"]),
                members=_opt_int(obj.get("members")),
                admitted=_opt_int(obj.get("admitted")),
                succeeded=_opt_int(obj.get("succeeded")),
                failed=tuple((_str(f["serial"]), _str(f["error"])) for f in failed)
                if failed is not None
                else None,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's rollout answer is malformed") from e


@dataclass(frozen=True)
class GroupChannels:
    """A group's channel settings."""

    group: str
    no_features: bool
    security_delay_seconds: int
    window: str | None


@dataclass(frozen=True)
class OrphanRelease:
    """A release naming hardware ids no registered device has."""

    target: str
    version: str
    unknown_hardware_ids: tuple[str, ...]


class RolloutClient(OpsClient):
    """Rollouts, channel settings and the release check, over the operator API."""

    def rollouts(self) -> list[RolloutInfo]:
        """Every rollout."""
        answer = self._call("list rollouts", "GET", "/api/v1/rollouts")
        if not isinstance(answer, list):
            raise TransportError("the server's rollout list is malformed")
        return [RolloutInfo.parse(r) for r in answer]

    def rollout(self, name: str) -> RolloutInfo:
        """One rollout's status (evaluated by the server now)."""
        path = f"/api/v1/rollouts/{quote(name, safe='')}"
        return RolloutInfo.parse(self._call(f"rollout {name}", "GET", path))

    def create_rollout(
        self,
        *,
        release: str,
        group: str,
        phases: Sequence[int],
        success_threshold: int,
        failure_threshold: int,
        window: str | None = None,
        name: str | None = None,
    ) -> RolloutInfo:
        """Start a rollout."""
        body = {
            "name": name,
            "release": release,
            "group": group,
            "phases": list(phases),
            "success_threshold": success_threshold,
            "failure_threshold": failure_threshold,
            "window": window,
        }
        return RolloutInfo.parse(self._call("create rollout", "POST", "/api/v1/rollouts", body))

    def rollout_action(self, name: str, action: str) -> RolloutInfo:
        """``pause``, ``resume`` or ``cancel`` a rollout."""
        path = f"/api/v1/rollouts/{quote(name, safe='')}/{quote(action, safe='')}"
        return RolloutInfo.parse(self._call(f"{action} rollout {name}", "POST", path, {}))

    def set_group_channels(
        self,
        name: str,
        *,
        no_features: bool | None = None,
        security_delay_seconds: int | None = None,
        window: str | None = None,
    ) -> GroupChannels:
        """Change a group's channel settings (``window=''`` removes its window)."""
        path = f"/api/v1/groups/{quote(name, safe='')}/channels"
        body = {
            "no_features": no_features,
            "security_delay_seconds": security_delay_seconds,
            "window": window,
        }
        obj = self._call(f"set group {name}", "PUT", path, body)
        try:
            return GroupChannels(
                group=_str(obj["group"]),
                no_features=bool(obj["no_features"]),
                security_delay_seconds=_int(obj["security_delay_seconds"]),
                window=_opt_str(obj["window"]),
            )
        except (AttributeError, KeyError, TypeError) as e:
            raise TransportError("the server's group settings answer is malformed") from e

    def set_device_channels(self, serial: str, *, no_features: bool) -> bool:
        """Opt a device out of feature releases (or back in); returns the setting."""
        path = f"/api/v1/devices/{quote(serial, safe='')}/channels"
        obj = self._call(
            f"set {serial}", "PUT", path, {"no_features": no_features}, not_found=UnknownDeviceError
        )
        try:
            return bool(obj["no_features"])
        except (KeyError, TypeError) as e:
            raise TransportError("the server's device settings answer is malformed") from e

    def release_check(self) -> list[OrphanRelease]:
        """Releases naming hardware ids no registered device has."""
        answer = self._call("check releases", "GET", "/api/v1/releases/check")
        if not isinstance(answer, list):
            raise TransportError("the server's release check is malformed")
        try:
            return [
                OrphanRelease(
                    _str(o["target"]),
                    _str(o["version"]),
                    tuple(_str(h) for h in o["unknown_hardware_ids"]),
                )
                for o in answer
            ]
        except (KeyError, TypeError) as e:
            raise TransportError("the server's release check is malformed") from e
