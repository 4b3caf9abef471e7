"""Fleet logic without I/O: anomaly detection and the alert policy (ADR 0026)."""

from otaguard.fleet.anomaly import SIGNALS, Finding
from otaguard.fleet.policy import Action, AlertPolicy, parse_policy

__all__ = ["SIGNALS", "Action", "AlertPolicy", "Finding", "parse_policy"]
