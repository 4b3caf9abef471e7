"""The operator's client of the alerts API (``otaguard alerts list/ack``).

The same HTTP code, errors and strict parsing as :class:`~.ops_client.OpsClient`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from otaguard.model.errors import TransportError
from otaguard.server.ops_client import OpsClient, _opt_str, _str

__all__ = ["AlertClient", "AlertInfo"]


def _time(value: Any) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(_str(value))


@dataclass(frozen=True)
class AlertInfo:
    """An alert as the server shows it."""

    id: int
    time: dt.datetime
    signal: str
    subject: str
    observed: str
    threshold: str
    detail: str
    action: str
    outcome: str
    acked_at: dt.datetime | None
    acked_by: str | None

    @classmethod
    def parse(cls, obj: Any) -> AlertInfo:
        """Read an alert of the server's answer.

        Raises:
            TransportError: the answer is malformed.
        """
        try:
            if isinstance(obj["id"], bool) or not isinstance(obj["id"], int):
                raise TypeError("id")
            text = ("signal", "subject", "observed", "threshold", "detail", "action", "outcome")
            return cls(
                id=obj["id"],
                time=dt.datetime.fromisoformat(_str(obj["time"])),
                acked_at=_time(obj["acked_at"]),
                acked_by=_opt_str(obj["acked_by"]),
                **{k: _str(obj[k]) for k in text},
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's alert answer is malformed") from e


class AlertClient(OpsClient):
    """Alerts over the operator API."""

    def alerts(self, *, include_acked: bool = False, limit: int = 100) -> list[AlertInfo]:
        """Open alerts (or all), newest first."""
        path = f"/api/v1/alerts?limit={int(limit)}" + ("&all=true" if include_acked else "")
        answer = self._call("list alerts", "GET", path)
        if not isinstance(answer, list):
            raise TransportError("the server's alert list is malformed")
        return [AlertInfo.parse(a) for a in answer]

    def ack(self, alert_id: int) -> AlertInfo:
        """Acknowledge one alert."""
        return AlertInfo.parse(
            self._call(f"alert {alert_id}", "POST", f"/api/v1/alerts/{int(alert_id)}/ack")
        )
