"""Prometheus metrics of the server and its fleet, read from the stores at each scrape.

A collector of our own (no global registry, nothing at import time) on a registry per
application; ``GET /metrics`` returns its text exposition. Who may read it (ADR 0026): an
operator token of role viewer or above, as for every other read of the fleet — the
metrics name versions, rollouts and alert counts, which tell an attacker which devices
are behind. Prometheus sends the token with ``authorization: {credentials_file: ...}``.

Counters (``_total``) count what this process saw since it started (check-ins, telemetry,
refusals); gauges are read from the database, so every process reports the same fleet.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cryptography import x509
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from otaguard.model.errors import OtaguardError
from otaguard.server.monitor import Monitor
from otaguard.server.rollouts import Rollouts
from otaguard.server.storage.base import DeviceStore, MetadataRecord, MetadataStore

__all__ = ["FleetCollector", "metrics_registry", "render"]

logger = logging.getLogger(__name__)

_ROLES = ("root", "targets", "snapshot")


class FleetCollector(Collector):
    """Server and fleet gauges, collected from the stores at scrape time."""

    def __init__(
        self,
        *,
        monitor: Monitor,
        devices: DeviceStore,
        metadata: MetadataStore,
        rollouts: Rollouts | None,
        certificates: Callable[[], Sequence[tuple[str, Path]]],
        clock: Callable[[], dt.datetime],
    ):
        """Read these stores; ``certificates`` names the PEM files whose expiry to report."""
        self.monitor = monitor
        self.devices = devices
        self.metadata = metadata
        self.rollouts = rollouts
        self.certificates = certificates
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        """One family per metric (see the module docstring)."""
        now = self.clock()
        counts = self.monitor.counts
        checkins = CounterMetricFamily(
            "otaguard_checkins", "Check-ins this process handled, by outcome", labels=["outcome"]
        )
        for outcome in ("accepted", "quarantined", "refused"):
            checkins.add_metric([outcome], counts["checkins", outcome])
        yield checkins
        telemetry = CounterMetricFamily(
            "otaguard_telemetry_reports",
            "Telemetry reports this process received, by transport (refused: malformed or "
            "from a device not enrolled)",
            labels=["transport"],
        )
        for transport in ("https", "mqtt", "refused"):
            telemetry.add_metric([transport], counts["telemetry", transport])
        yield telemetry
        failures = CounterMetricFamily(
            "otaguard_verification_failures",
            "Device reports that failed verification: refused check-ins (signature, nonce, "
            "serial) and measured boots contradicting the image repository",
            labels=["kind"],
        )
        for kind in ("checkin", "measured-boot"):
            failures.add_metric([kind], counts["verification_failures", kind])
        yield failures
        yield from self._fleet()
        yield from self._rollouts()
        alerts = GaugeMetricFamily(
            "otaguard_alerts", "Stored alerts by signal and state", labels=["signal", "state"]
        )
        for (signal, acked), n in sorted(self.monitor.store.alert_counts().items()):
            alerts.add_metric([signal, "acked" if acked else "open"], n)
        yield alerts
        yield from self._expiries(now)

    def _fleet(self) -> Iterable[Metric]:
        by_status = {k.value: n for k, n in self.devices.status_counts().items()}
        devices = GaugeMetricFamily(
            "otaguard_devices", "Devices in the registry by status", labels=["status"]
        )
        for status, n in sorted(by_status.items()):
            devices.add_metric([status], n)
        yield devices
        running = self.monitor.store.running_counts()
        versions = GaugeMetricFamily(
            "otaguard_devices_running",
            "Devices by hardware id and the version their last check-in reported",
            labels=["hardware_id", "version"],
        )
        for (hw, version), n in sorted(running.items()):
            versions.add_metric([hw, version], n)
        yield versions

    def _rollouts(self) -> Iterable[Metric]:
        states = GaugeMetricFamily("otaguard_rollouts", "Rollouts by state", labels=["state"])
        phase = GaugeMetricFamily(
            "otaguard_rollout_phase", "An active rollout's phase (1-based)", labels=["rollout"]
        )
        if self.rollouts is not None:
            listed = self.rollouts.store.list()
            for state, n in sorted(Counter(r.state for r in listed).items()):
                states.add_metric([state], n)
            for r in listed:
                if r.state == "active":
                    phase.add_metric([r.name], r.phase + 1)
        yield states
        yield phase

    def _expiries(self, now: dt.datetime) -> Iterable[Metric]:
        metadata = GaugeMetricFamily(
            "otaguard_metadata_expiry_seconds",
            "Seconds until the newest served metadata of each role expires",
            labels=["role"],
        )
        records: dict[str, MetadataRecord | None] = {r: self._newest(r) for r in _ROLES}
        records["timestamp"] = self.metadata.current_timestamp()
        for role, rec in records.items():
            if rec is None:
                continue
            try:
                expires = dt.datetime.fromisoformat(
                    json.loads(rec.data)["signed"]["expires"].replace("Z", "+00:00")
                )
            except (ValueError, KeyError, TypeError):
                continue
            metadata.add_metric([role], (expires - now).total_seconds())
        yield metadata
        certs = GaugeMetricFamily(
            "otaguard_certificate_expiry_seconds",
            "Seconds until each of the server's certificates expires",
            labels=["certificate"],
        )
        for name, path in self.certificates():
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            certs.add_metric([name], (cert.not_valid_after_utc - now).total_seconds())
        yield certs

    def _newest(self, role: str) -> MetadataRecord | None:
        version = self.metadata.newest_version(role)
        if version is None:
            return None
        return self.metadata.get_record(f"{version}.{role}.json")


def metrics_registry(collector: FleetCollector) -> CollectorRegistry:
    """A registry of its own holding ``collector`` (never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry``.

    Raises:
        OtaguardError: a store failed while collecting (the scrape fails, visibly).
    """
    try:
        return generate_latest(registry)
    except OtaguardError:
        logger.error("metrics collection failed")  # noqa: TRY400 - no traceback for a store error
        raise
