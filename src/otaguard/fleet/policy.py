"""Alert policy: which action each signal's alert triggers (record, quarantine, pause).

The default quarantines a device whose credentials or boot cannot be trusted, pauses a
rollout whose release or phase misbehaves, and records the rest for an operator. An
operator may override signals with ``--alert-policy SIGNAL=ACTION,...``; an unknown signal
or action is refused at start, never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from otaguard.fleet.anomaly import SIGNALS
from otaguard.model.errors import ConfigError

__all__ = ["DEFAULT_ACTIONS", "Action", "AlertPolicy", "parse_policy"]


class Action(StrEnum):
    """What an alert does besides being stored and sent to webhooks."""

    RECORD = "record"
    QUARANTINE = "quarantine"
    PAUSE_ROLLOUT = "pause-rollout"


DEFAULT_ACTIONS: Final[Mapping[str, Action]] = MappingProxyType(
    {
        # The device's boot or identity is not what it claims: stop serving it.
        "unpublished-image": Action.QUARANTINE,
        "attestation-mismatch": Action.QUARANTINE,
        "cloned-credentials": Action.QUARANTINE,
        # The device refused an attack: it did its job; the operator looks at the server.
        "attack-flags": Action.RECORD,
        # Silence alone may be a power cut: an operator goes and looks.
        "silent-after-install": Action.RECORD,
        # A release or a phase that hurts devices: admit nobody new until a person decides.
        "cohort-anomaly": Action.PAUSE_ROLLOUT,
        "rollout-phase-failure": Action.PAUSE_ROLLOUT,
    }
)
# Which actions make sense for a signal: a device signal cannot pause "its" rollout, a
# cohort has no single device to quarantine.
_DEVICE_SIGNALS: Final = frozenset(
    {
        "unpublished-image",
        "attestation-mismatch",
        "cloned-credentials",
        "attack-flags",
        "silent-after-install",
    }
)


@dataclass(frozen=True)
class AlertPolicy:
    """The action per signal (every signal has one)."""

    actions: Mapping[str, Action] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))

    def action(self, signal: str) -> Action:
        """The action for ``signal`` (record for a signal the policy does not know)."""
        return self.actions.get(signal, Action.RECORD)


def parse_policy(text: str) -> AlertPolicy:
    """``SIGNAL=ACTION,...`` over the defaults.

    Raises:
        ConfigError: an unknown signal or action, or an action the signal cannot take.
    """
    actions = dict(DEFAULT_ACTIONS)
    for item in filter(None, (p.strip() for p in text.split(","))):
        signal, sep, name = item.partition("=")
        if not sep or signal not in SIGNALS:
            raise ConfigError(
                f"alert policy item {item[:64]!r}: expected SIGNAL=ACTION with SIGNAL one of "
                + ", ".join(SIGNALS)
            )
        try:
            action = Action(name)
        except ValueError as e:
            raise ConfigError(
                f"alert policy: {name[:32]!r} is not one of record, quarantine, pause-rollout"
            ) from e
        device = signal in _DEVICE_SIGNALS
        if (action is Action.QUARANTINE and not device) or (
            action is Action.PAUSE_ROLLOUT and device
        ):
            raise ConfigError(f"alert policy: {signal} cannot {action.value}")
        actions[signal] = action
    return AlertPolicy(actions)
