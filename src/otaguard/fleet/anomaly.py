"""Explainable anomaly detection: pure functions from observations to findings.

Every :class:`Finding` names its signal, the subject (a device, a cohort, a rollout), the
observed value and the threshold it crossed, so an operator can check the arithmetic.
Nothing here does I/O; :mod:`otaguard.server.monitor` feeds these functions from the
stores and applies the policy (:mod:`otaguard.fleet.policy`) to what they find.

The signals (ADR 0026):

* ``unpublished-image``: a measured boot whose sha256 no published target lists;
* ``attestation-mismatch``: the boot measurement contradicts the target the device says it
  runs, or its TPM quote is missing or invalid;
* ``attack-flags``: the device's signed manifest reports refused attacks;
* ``cloned-credentials``: two boot sessions interleave under one certificate
  (:func:`boot_session_conflict`);
* ``silent-after-install``: told to install, then no check-in for N poll intervals;
* ``cohort-anomaly``: a (hardware id, release) cohort's boot, rollback or error rate per
  report departs from the other releases' devices on that hardware (median and MAD);
* ``rollout-phase-failure``: a rollout phase's failure rate departs from its earlier phases.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "COHORT_MAD_FACTOR",
    "COHORT_MIN_DEVICES",
    "COHORT_MIN_EXCESS",
    "PHASE_MIN_MARGIN",
    "PHASE_MIN_REPORTS",
    "PHASE_SIGMAS",
    "SIGNALS",
    "BootSession",
    "CohortDevice",
    "Finding",
    "PhaseCounts",
    "boot_session_conflict",
    "cohort_findings",
    "phase_failure_finding",
    "robust_threshold",
    "silent_finding",
]

SIGNALS: Final = (
    "unpublished-image",
    "attestation-mismatch",
    "attack-flags",
    "cloned-credentials",
    "silent-after-install",
    "cohort-anomaly",
    "rollout-phase-failure",
)

#: fewer devices than this in a cohort (or in its baseline) say nothing about a release:
#: one unlucky device must not pause a rollout
COHORT_MIN_DEVICES: Final = 5
#: how many scaled MADs above the baseline median is anomalous: 5 keeps a healthy fleet's
#: spread (a normal distribution's 5 sigma) well inside
COHORT_MAD_FACTOR: Final = 5.0
#: healthy devices mostly report 0 boots, rollbacks and errors per report, so the MAD is
#: often 0: the threshold is at least this far above the baseline median (half an event
#: per report for the cohort's median device)
COHORT_MIN_EXCESS: Final = 0.5
#: 1.4826 * MAD estimates the standard deviation of normal data
_MAD_SCALE: Final = 1.4826
#: a phase's failure rate is compared only once this many of its devices reported
PHASE_MIN_REPORTS: Final = 10
#: binomial standard errors above the earlier phases' rate that count as a departure
PHASE_SIGMAS: Final = 3.0
#: and at least this many percentage points (as a fraction): small fleets' noise
PHASE_MIN_MARGIN: Final = 0.05


@dataclass(frozen=True)
class Finding:
    """One anomaly, explained: what was observed against which threshold."""

    signal: str
    #: ``device:SERIAL``, ``cohort:HW@VERSION`` or ``rollout:NAME``
    subject: str
    observed: str
    threshold: str
    detail: str
    serial: str | None = None
    rollout: str | None = None
    #: the release a cohort finding is about (its rollouts may be paused)
    version: str | None = None
    hardware_id: str | None = None


@dataclass(frozen=True)
class BootSession:
    """What one telemetry report says about the boot that sent it."""

    boot_id: str
    boot_count: int
    seq: int


def boot_session_conflict(last: BootSession | None, new: BootSession) -> str | None:
    """Why ``new`` cannot come from the same device as ``last`` (``None``: it can).

    One device has one boot session at a time. A new ``boot_id`` is a reboot only if the
    boot count went up; within one ``boot_id`` the report sequence goes up. Two devices
    holding one certificate each boot their own session, so their reports interleave and
    one of the two rules breaks at the latest on the second device's second report: a
    reboot whose boot count does not advance, or a sequence number going back. A repeated
    ``seq`` in the same boot is a duplicate delivery (a retried POST), not a conflict.
    """
    if last is None:
        return None
    if new.boot_id == last.boot_id:
        if new.seq < last.seq:
            return (
                f"boot {new.boot_id[:8]} reported seq {new.seq} after seq {last.seq}: "
                "two senders in one boot session"
            )
        return None
    if new.boot_count <= last.boot_count:
        return (
            f"boot {new.boot_id[:8]} (boot count {new.boot_count}) follows boot "
            f"{last.boot_id[:8]} (boot count {last.boot_count}) without the count advancing: "
            "two devices boot under one certificate"
        )
    return None


def silent_finding(
    *, serial: str, silent_for: float, poll_interval: float, intervals: int, image: str
) -> Finding | None:
    """A device told to install ``image`` and silent for more than ``intervals`` polls."""
    limit = poll_interval * intervals
    if silent_for <= limit:
        return None
    return Finding(
        signal="silent-after-install",
        subject=f"device:{serial}",
        observed=f"silent {silent_for:.0f} s",
        threshold=f"{limit:.0f} s ({intervals} poll intervals of {poll_interval:.0f} s)",
        detail=f"device {serial} was told to install {image} and has not checked in since",
        serial=serial,
    )


def robust_threshold(baseline: Sequence[float]) -> tuple[float, float, float]:
    """(median, MAD, threshold) of ``baseline``: median + max(k * 1.4826 * MAD, floor)."""
    med = statistics.median(baseline)
    mad = statistics.median(abs(x - med) for x in baseline)
    return med, mad, med + max(COHORT_MAD_FACTOR * _MAD_SCALE * mad, COHORT_MIN_EXCESS)


@dataclass(frozen=True)
class CohortDevice:
    """One device's events per report since it started running its release."""

    serial: str
    hardware_id: str
    version: str
    reports: int
    boots: int
    rollbacks: int
    errors: int


_RATES: Final = (("boot", "boots"), ("rollback", "rollbacks"), ("error", "errors"))


def cohort_findings(devices: Sequence[CohortDevice]) -> list[Finding]:
    """Cohorts (hardware id x release) whose median rate departs from their baseline.

    A cohort's baseline is every device on the same hardware running another release.
    For each rate (boots, rollbacks, agent errors per report since the release started)
    the cohort's median device is compared with :func:`robust_threshold` of the
    baseline. Cohorts or baselines smaller than :data:`COHORT_MIN_DEVICES` are skipped:
    without a comparison there is no departure to explain.
    """
    by_cohort: dict[tuple[str, str], list[CohortDevice]] = {}
    for d in devices:
        if d.reports > 0:
            by_cohort.setdefault((d.hardware_id, d.version), []).append(d)
    findings: list[Finding] = []
    for (hw, version), members in sorted(by_cohort.items()):
        baseline_devices = [
            d for (h, v), ms in by_cohort.items() if h == hw and v != version for d in ms
        ]
        if len(members) < COHORT_MIN_DEVICES or len(baseline_devices) < COHORT_MIN_DEVICES:
            continue
        for label, attr in _RATES:
            values = [getattr(d, attr) / d.reports for d in members]
            base = [getattr(d, attr) / d.reports for d in baseline_devices]
            med, mad, limit = robust_threshold(base)
            observed = statistics.median(values)
            if observed > limit:
                findings.append(
                    Finding(
                        signal="cohort-anomaly",
                        subject=f"cohort:{hw}@{version}",
                        observed=f"median {label} rate {observed:.2f}/report "
                        f"over {len(members)} devices",
                        threshold=f"{limit:.2f}/report (baseline median {med:.2f}, "
                        f"MAD {mad:.2f}, {len(base)} devices on other releases)",
                        detail=f"release {version} on {hw}: {label}s per report depart "
                        "from the other releases on this hardware",
                        version=version,
                        hardware_id=hw,
                    )
                )
                break  # one finding per cohort: the first rate that departs explains it
    return findings


@dataclass(frozen=True)
class PhaseCounts:
    """Reported outcomes of the devices a rollout phase admitted (not earlier phases')."""

    succeeded: int
    failed: int

    @property
    def reported(self) -> int:
        """Devices of the phase that reported either outcome."""
        return self.succeeded + self.failed


def phase_failure_finding(rollout: str, phases: Mapping[int, PhaseCounts]) -> Finding | None:
    """The latest phase's failure rate against the earlier phases' pooled rate.

    Departs when the latest phase (index ``max(phases)``, at least the second) has at
    least :data:`PHASE_MIN_REPORTS` reports and its rate exceeds the earlier rate ``p``
    by more than ``max(PHASE_SIGMAS * sqrt(p(1-p)/n), PHASE_MIN_MARGIN)``: the binomial
    noise of ``n`` reports, with a floor for small fleets.
    """
    if not phases:
        return None
    current = max(phases)
    earlier = [c for i, c in phases.items() if i < current]
    now = phases[current]
    before_reported = sum(c.reported for c in earlier)
    if current == 0 or before_reported == 0 or now.reported < PHASE_MIN_REPORTS:
        return None
    p = sum(c.failed for c in earlier) / before_reported
    rate = now.failed / now.reported
    margin = max(PHASE_SIGMAS * math.sqrt(p * (1 - p) / now.reported), PHASE_MIN_MARGIN)
    if rate <= p + margin:
        return None
    return Finding(
        signal="rollout-phase-failure",
        subject=f"rollout:{rollout}",
        observed=f"phase {current + 1} failure rate {rate:.1%} ({now.failed}/{now.reported})",
        threshold=f"{p + margin:.1%} (earlier phases {p:.1%} over {before_reported} "
        f"reports + margin {margin:.1%})",
        detail=f"rollout {rollout}: phase {current + 1} fails more than phases 1-{current}",
        rollout=rollout,
    )
