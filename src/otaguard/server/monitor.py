"""Fleet monitoring: telemetry in, anomalies out, the policy's actions applied (ADR 0026).

:class:`Monitor` is fed by the check-in route (each accepted or quarantining check-in,
each refusal), by the telemetry route and the MQTT bridge (each report), and by
:class:`MonitorSweep`, a periodic task that looks for what only shows over time (silence
after an install, a cohort's rates, a rollout phase's failures). The detection itself is
pure (:mod:`otaguard.fleet.anomaly`); this module reads the stores, stores each alert
once per open subject, applies its action (quarantine through the device registry, pause
through the rollout store: the same writes an operator's request makes) and hands the
alert to the webhooks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Final, Protocol

from otaguard.fleet.anomaly import (
    BootSession,
    CohortDevice,
    Finding,
    PhaseCounts,
    boot_session_conflict,
    cohort_findings,
    phase_failure_finding,
    silent_finding,
)
from otaguard.fleet.policy import Action, AlertPolicy
from otaguard.model.errors import AccessDeniedError, OtaguardError
from otaguard.model.manifest import DeviceManifest
from otaguard.model.telemetry import Telemetry, TelemetryError, parse_telemetry
from otaguard.server._periodic import PeriodicTask
from otaguard.server.attestation import ListedImage
from otaguard.server.channels import Rollout, admitted
from otaguard.server.rollouts import Rollouts
from otaguard.server.storage.base import DeviceState, DeviceStore
from otaguard.server.storage.fleet_base import UnknownNameError
from otaguard.server.storage.monitoring import (
    TELEMETRY_RETENTION,
    AlertRecord,
    DeviceHealth,
    HealthNote,
    MonitorStore,
)

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_SILENT_INTERVALS",
    "AlertSink",
    "HintSink",
    "Monitor",
    "MonitorSweep",
    "instructed_image",
]

logger = logging.getLogger(__name__)

#: how often a device polls by default (the agent's check interval); the silence signal
#: counts in these
DEFAULT_POLL_INTERVAL: Final = 3600.0
#: polls a device may miss after an install before it counts as silent: one missed poll
#: is a slow reboot or a brief outage, three is a device that did not come back
DEFAULT_SILENT_INTERVALS: Final = 3
#: old telemetry is purged at most this often: a purge is a write transaction, and on
#: SQLite every write waits for the one file lock the check-ins need too
TELEMETRY_PURGE_INTERVAL: Final = dt.timedelta(minutes=10)
#: hints to up to this many devices look each one up in the registry; more (a rollout
#: phase) read the registry once
_HINT_LOOKUPS: Final = 32
_ENROLLED: Final = DeviceState.ENROLLED
#: the director's answer is a few KiB; a bigger one is not parsed for its target name
_MAX_ANSWER_BYTES: Final = 1 << 20


class AlertSink(Protocol):
    """Where a new alert goes besides the database (the webhooks)."""

    def send(self, alert: AlertRecord) -> None:
        """Queue ``alert`` for delivery; never blocks on the network."""


class HintSink(Protocol):
    """Where "check in now" hints go (the MQTT bridge)."""

    def hint(self, serial: str) -> None:
        """Tell ``serial`` to check in soon; best effort, never blocks."""


def instructed_image(answer: bytes, *, running: str | None) -> str | None:
    """The image the director's signed answer names, unless the device already runs it."""
    if len(answer) > _MAX_ANSWER_BYTES:
        return None
    try:
        targets = json.loads(answer)["signed"]["targets"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(targets, dict) or not targets:
        return None
    name = str(next(iter(targets)))
    return None if name == running else name


def _cohort(health: Iterable[DeviceHealth]) -> list[CohortDevice]:
    return [
        CohortDevice(
            serial=h.serial,
            hardware_id=h.hardware_id,
            version=h.release_version,
            reports=h.release_reports,
            boots=h.release_boots,
            rollbacks=h.release_rollbacks,
            errors=h.release_errors,
        )
        for h in health
        if h.release_version is not None
    ]


class Monitor:
    """Receives check-ins and telemetry, raises alerts, applies the policy's actions."""

    def __init__(
        self,
        *,
        store: MonitorStore,
        devices: DeviceStore,
        policy: AlertPolicy,
        clock: Callable[[], dt.datetime],
        listed_images: Callable[[str], list[ListedImage]],
        rollouts: Rollouts | None = None,
        unit: Callable[[], AbstractContextManager[object]] = nullcontext,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        silent_intervals: int = DEFAULT_SILENT_INTERVALS,
    ):
        """Use these stores; ``rollouts`` is ``None`` without a director (nothing to pause)."""
        self.store = store
        self.devices = devices
        self.policy = policy
        self.clock = clock
        self.listed_images = listed_images
        self.rollouts = rollouts
        self.unit = unit
        self.poll_interval = poll_interval
        self.silent_intervals = silent_intervals
        self.sinks: list[AlertSink] = []
        self.hints: list[HintSink] = []
        # Per-process counters for /metrics (a Prometheus counter is per process anyway).
        self.counts: Counter[tuple[str, str]] = Counter()
        # One telemetry report at a time per process: the boot-session check reads the
        # last session and writes the new one (two processes may still race: ADR 0026).
        self._telemetry_lock = threading.Lock()
        self._last_purge: dt.datetime | None = None

    # -- inputs ----------------------------------------------------------------------------
    def checkin_refused(self, reason: str) -> None:
        """A check-in was refused (bad signature, replayed or foreign nonce, ...)."""
        self.counts["checkins", "refused"] += 1
        self.counts["verification_failures", "checkin"] += 1
        logger.debug("check-in refusal counted: %s", reason)

    @staticmethod
    def checkin_note(
        *, serial: str, hardware_id: str, manifest: DeviceManifest, now: dt.datetime
    ) -> HealthNote:
        """The health row a check-in writes with its record (what the device runs; what it
        is told to install comes after, :meth:`note_instructed`). The check-in store
        writes it in the check-in's one statement (ADR 0036); on SQLite a second write
        transaction per check-in contended for the file's lock (503s at 500 devices)."""
        installed = manifest.installed
        return HealthNote(
            serial=serial,
            hardware_id=hardware_id,
            running_version=installed.version if installed else "recovery",
            instructed_image=None,
            now=now,
        )

    def note_checkin(self, note: HealthNote) -> None:
        """Write ``note`` (a check-in the store did not write it with: a quarantine)."""
        self.store.note_checkin(note)

    def note_instructed(
        self, *, serial: str, hardware_id: str, manifest: DeviceManifest, answer: bytes
    ) -> None:
        """The director's signed ``answer`` to an accepted check-in: when it names an image
        to install, note it on the health row (the silence sweep watches the device);
        otherwise the row the check-in wrote says it already (nothing written)."""
        installed = manifest.installed
        image = instructed_image(answer, running=installed.name if installed else None)
        if image is None:
            return
        note = self.checkin_note(
            serial=serial, hardware_id=hardware_id, manifest=manifest, now=self.clock()
        )
        self.store.note_checkin(dataclasses.replace(note, instructed_image=image))

    def after_checkin(
        self,
        *,
        serial: str,
        hardware_id: str,
        manifest: DeviceManifest,
        problem: str | None,
        answer: bytes | None,
    ) -> None:
        """A check-in was recorded and committed: raise its signals (which may quarantine
        the device or call webhooks: never inside the check-in's transaction).

        ``problem`` is why it was quarantined (measured boot or quote).
        """
        self.counts["checkins", "accepted" if problem is None else "quarantined"] += 1
        if problem is not None:
            self.counts["verification_failures", "measured-boot"] += 1
            self.raise_finding(self._boot_finding(serial, hardware_id, manifest, problem))
        if manifest.attack_flags:
            flags = ",".join(manifest.attack_flags)
            self.raise_finding(
                Finding(
                    signal="attack-flags",
                    subject=f"device:{serial}",
                    observed=f"flags {flags}",
                    threshold="no attack flag in a signed manifest",
                    detail=f"device {serial} refused: {flags}",
                    serial=serial,
                )
            )

    def _boot_finding(
        self, serial: str, hardware_id: str, manifest: DeviceManifest, problem: str
    ) -> Finding:
        boot = manifest.boot.sha256
        listed = {i.sha256 for i in self.listed_images(hardware_id)}
        if manifest.boot.slot is not None and boot not in listed:
            return Finding(
                signal="unpublished-image",
                subject=f"device:{serial}",
                observed=f"boot sha256 {boot}",
                threshold=f"one of the {len(listed)} image sha256s published for {hardware_id}",
                detail=problem,
                serial=serial,
            )
        return Finding(
            signal="attestation-mismatch",
            subject=f"device:{serial}",
            observed=problem,
            threshold="a valid quote whose measurement is the claimed target's sha256",
            detail=problem,
            serial=serial,
        )

    def telemetry(self, *, serial: str, body: bytes, transport: str) -> Telemetry:
        """Parse, check and store one report that ``transport`` says ``serial`` sent.

        Raises:
            TelemetryError: the report is malformed or names another device.
            AccessDeniedError: the device is not enrolled (unknown, quarantined, revoked).
        """
        try:
            report = parse_telemetry(body, serial=serial)
        except TelemetryError:
            self.counts["telemetry", "refused"] += 1
            raise
        record = self.devices.get(serial)
        if record is None or record.status is not DeviceState.ENROLLED:
            self.counts["telemetry", "refused"] += 1
            state = "unknown" if record is None else record.status.value
            raise AccessDeniedError(f"telemetry from {serial} refused: the device is {state}")
        now = self.clock()
        with self._telemetry_lock, self.unit():
            last = self.store.health(serial)
            conflict = None
            if last is not None and last.boot_id is not None:
                conflict = boot_session_conflict(
                    BootSession(last.boot_id, last.boot_count or 0, last.seq or 0),
                    BootSession(report.boot_id, report.boot_count, report.seq),
                )
            self.store.record_telemetry(
                report,
                hardware_id=record.hardware_id,
                body=body,
                transport=transport,
                now=now,
            )
        self.counts["telemetry", transport] += 1
        if conflict is not None:
            self.raise_finding(
                Finding(
                    signal="cloned-credentials",
                    subject=f"device:{serial}",
                    observed=conflict,
                    threshold="one boot session at a time: a new boot id only with a higher "
                    "boot count, a rising seq within a boot",
                    detail=f"device {serial}'s certificate is used by two devices",
                    serial=serial,
                )
            )
        return report

    # -- sweeps ----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Look for silence, cohort and rollout-phase anomalies; purge old telemetry."""
        now = self.clock()
        limit = dt.timedelta(seconds=self.poll_interval * self.silent_intervals)
        for h in self.store.silent_instructed(seen_before=now - limit):
            if h.instructed_image and h.last_seen is not None:
                found = silent_finding(
                    serial=h.serial,
                    silent_for=(now - h.last_seen).total_seconds(),
                    poll_interval=self.poll_interval,
                    intervals=self.silent_intervals,
                    image=h.instructed_image,
                )
                if found is not None:
                    self.raise_finding(found)
        for found in cohort_findings(_cohort(self.store.reporting())):
            self.raise_finding(found)
        if self.rollouts is not None:
            for rollout in self.rollouts.store.list():
                if rollout.state == "active" and rollout.phase > 0:
                    phase = phase_failure_finding(rollout.name, self._phase_counts(rollout))
                    if phase is not None:
                        self.raise_finding(phase)
        if self._last_purge is None or now - self._last_purge >= TELEMETRY_PURGE_INTERVAL:
            self.store.purge_telemetry(before=now - TELEMETRY_RETENTION)
            self._last_purge = now

    def before_advance(self, rollout: Rollout) -> None:
        """Before ``rollout`` admits more devices: its release's cohorts and its phases.

        Runs the cohort and phase checks of the sweep for this rollout only, at the
        moment it matters (a phase that looks good by install reports alone may be
        crash-looping by telemetry); a finding pauses the rollout per the policy.
        """
        version = str(rollout.version)
        for found in cohort_findings(_cohort(self.store.reporting())):
            if found.version == version:
                self.raise_finding(found)
        phase = phase_failure_finding(rollout.name, self._phase_counts(rollout))
        if phase is not None:
            self.raise_finding(phase)

    def _phase_counts(self, rollout: Rollout) -> dict[int, PhaseCounts]:
        if self.rollouts is None:
            return {}
        members = self.rollouts.inventory.members(rollout.group)
        outcomes = self.rollouts.outcomes(rollout)
        counts: dict[int, PhaseCounts] = {}
        before: frozenset[str] = frozenset()
        for k in range(rollout.phase + 1):
            now_in = admitted(dataclasses.replace(rollout, phase=k), members)
            new = now_in - before
            before = now_in
            results = [outcomes[s][0] for s in new if s in outcomes]
            counts[k] = PhaseCounts(results.count("success"), results.count("failure"))
        return counts

    # -- alerts and actions ----------------------------------------------------------------
    def raise_finding(self, finding: Finding) -> AlertRecord | None:
        """Store ``finding`` as an alert (once per open subject), act on it, send it on."""
        key = f"{finding.signal}:{finding.subject}"
        if self.store.is_open(key):
            return None
        action = self.policy.action(finding.signal)
        outcome = self._act(action, finding)
        stored = self.store.add_alert(
            AlertRecord(
                id=0,
                time=self.clock(),
                signal=finding.signal,
                subject=finding.subject,
                serial=finding.serial,
                rollout=finding.rollout,
                observed=finding.observed,
                threshold=finding.threshold,
                detail=finding.detail,
                action=action.value,
                outcome=outcome,
            ),
            dedup_key=key,
        )
        if stored is None:
            return None
        logger.error(
            "ALERT %s %s: observed %s, threshold %s; %s",
            stored.signal,
            stored.subject,
            stored.observed,
            stored.threshold,
            outcome,
        )
        for sink in self.sinks:
            sink.send(stored)
        return stored

    def _act(self, action: Action, finding: Finding) -> str:
        try:
            if action is Action.QUARANTINE and finding.serial is not None:
                current = self.devices.get(finding.serial)
                if current is not None and current.status is not DeviceState.ENROLLED:
                    # Quarantined at check-in already (its reason kept), or revoked.
                    return f"{finding.serial} already {current.status.value}"
                self.devices.set_status(
                    finding.serial,
                    DeviceState.QUARANTINED,
                    reason=f"{finding.signal}: {finding.observed}"[:500],
                    now=self.clock(),
                )
                return f"quarantined {finding.serial}"
            if action is Action.PAUSE_ROLLOUT:
                paused = self._pause(finding)
                return f"paused {', '.join(paused)}" if paused else "no active rollout to pause"
        except OtaguardError as e:
            # The alert is stored whatever happened to its action; the outcome says so.
            logger.error(  # noqa: TRY400 - the one line says it all
                "alert action %s failed: %s", action.value, e.diagnostics()
            )
            return f"{action.value} failed: {e.diagnostics()}"
        return "recorded"

    def _pause(self, finding: Finding) -> list[str]:
        if self.rollouts is None:
            return []
        paused = []
        for r in self.rollouts.store.list():
            if r.state != "active":
                continue
            if finding.rollout is not None and r.name != finding.rollout:
                continue
            if finding.version is not None and str(r.version) != finding.version:
                continue
            new = dataclasses.replace(
                r, state="paused", reason=f"paused by alert {finding.signal}: {finding.observed}"
            )
            if self.rollouts.store.change(new, expect_state="active", now=self.clock()):
                paused.append(r.name)
        return paused

    def ack(self, alert_id: int, *, by: str) -> AlertRecord:
        """Acknowledge an alert: a new occurrence of its anomaly alerts again.

        Raises:
            OperatorError: no such alert.
        """
        if alert_id < 1:
            raise UnknownNameError(f"no alert {alert_id}")
        return self.store.ack(alert_id, by=by, now=self.clock())

    def hint(self, serials: Iterable[str]) -> None:
        """Tell these devices to check in now (a hint: they still poll).

        Only enrolled devices are hinted: a quarantined or revoked device keeps its MQTT
        connection until its certificate expires (the broker does not read the registry),
        and gets nothing on it from the server (ADR 0026).
        """
        if not self.hints:
            return
        wanted = list(serials)
        if len(wanted) <= _HINT_LOOKUPS:
            records = [self.devices.get(s) for s in wanted]
            enrolled = {r.serial for r in records if r is not None and r.status is _ENROLLED}
        else:  # a rollout phase: one read of the registry instead of one per device
            enrolled = {r.serial for r in self.devices.list() if r.status is _ENROLLED}
        for serial in wanted:
            if serial not in enrolled:
                logger.info("no hint to %s: not enrolled", serial)
                continue
            for sink in self.hints:
                sink.hint(serial)


class MonitorSweep(PeriodicTask):
    """Runs :meth:`Monitor.sweep` every ``interval`` seconds."""

    def __init__(self, monitor: Monitor, *, interval: float):
        """Sweep ``monitor`` every ``interval`` seconds."""
        super().__init__(interval=interval, name="monitor-sweep")
        self.monitor = monitor

    def _tick(self) -> None:
        try:
            self.monitor.sweep()
        except OtaguardError as e:
            # A thread boundary: a failed sweep is logged and the next one tries again.
            logger.error("monitor sweep failed: %s", e.diagnostics())  # noqa: TRY400
