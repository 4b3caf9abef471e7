"""Wires fleet monitoring into the application (ADR 0026): the :class:`Monitor`, its
sweep, the webhooks, the MQTT bridge, the metrics and the routes, started and stopped
with the application's lifespan."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fastapi import APIRouter
from sqlalchemy.engine import Engine

from otaguard.crypto.device_ca import DeviceCA
from otaguard.fleet.policy import parse_policy
from otaguard.server.auth import OperatorAuth
from otaguard.server.checkin import CheckinServices
from otaguard.server.device_auth import DeviceGate
from otaguard.server.director import Director
from otaguard.server.metrics import FleetCollector, metrics_registry
from otaguard.server.monitor import Monitor, MonitorSweep
from otaguard.server.monitor_routes import monitor_router
from otaguard.server.mqtt import MqttBridge, MqttSettings, write_server_identity
from otaguard.server.rollouts import Rollouts
from otaguard.server.settings import ServerSettings
from otaguard.server.storage.base import DeviceStore, MetadataStore
from otaguard.server.storage.monitoring import SQLMonitorStore
from otaguard.server.storage.unit import unit_of_work
from otaguard.server.webhooks import WebhookSender

__all__ = ["Monitoring", "build_monitoring"]

logger = logging.getLogger(__name__)


@dataclass
class Monitoring:
    """The running parts of fleet monitoring."""

    monitor: Monitor
    sweep: MonitorSweep
    router: APIRouter
    webhooks: WebhookSender | None = None
    mqtt: MqttBridge | None = None
    started: list[Callable[[], None]] = field(default_factory=list)

    def start(self) -> None:
        """Start the webhooks, the MQTT bridge and the sweep (in that order)."""
        if self.webhooks is not None:
            self.webhooks.start()
            self.started.append(self.webhooks.stop)
        if self.mqtt is not None:
            self.mqtt.start()
            self.started.append(self.mqtt.stop)
        self.sweep.start()
        self.started.append(self.sweep.stop)

    def stop(self) -> None:
        """Stop what :meth:`start` started, last first."""
        while self.started:
            self.started.pop()()


def _certificates(settings: ServerSettings, ca: DeviceCA) -> list[tuple[str, Path]]:
    data = settings.data_dir
    server = settings.tls_cert or data / "tls" / "server.pem"
    return [
        ("server-tls", server),
        ("fleet-ca", data / "ca" / "ca.pem"),
        ("device-ca-root", ca.root_path),
        ("device-ca-issuing", ca.chain_path),
        ("mqtt-server-identity", data / "mqtt" / "server-mqtt.pem"),
    ]


def build_monitoring(
    settings: ServerSettings,
    *,
    engine: Engine,
    devices: DeviceStore,
    metadata: MetadataStore,
    checkins: CheckinServices,
    director: Director | None,
    rollouts: Rollouts | None,
    device_ca: DeviceCA,
    gate: DeviceGate,
    auth: OperatorAuth,
    clock: Callable[[], dt.datetime],
) -> Monitoring:
    """Build monitoring on these stores and hook it into check-ins, director and rollouts.

    Raises:
        ConfigError: the alert policy or the MQTT TLS files are unusable.
    """
    monitor = Monitor(
        store=SQLMonitorStore(engine),
        devices=devices,
        policy=parse_policy(settings.alert_policy),
        clock=clock,
        listed_images=checkins.listed_images,
        rollouts=rollouts,
        unit=partial(unit_of_work, engine),
        poll_interval=settings.device_poll_interval,
        silent_intervals=settings.silent_intervals,
    )
    checkins.monitor = monitor
    if director is not None:
        director.on_instruction = monitor.hint
    if rollouts is not None:
        rollouts.on_admit = monitor.hint
        rollouts.before_advance = monitor.before_advance
    webhooks = None
    if settings.webhook_urls and settings.webhook_secret:
        webhooks = WebhookSender(settings.webhook_urls, secret=settings.webhook_secret)
        monitor.sinks.append(webhooks)
    bridge = None
    if settings.mqtt_host is not None:
        cert, key = write_server_identity(
            device_ca, settings.data_dir / "mqtt", now=dt.datetime.now(dt.UTC)
        )
        bridge = MqttBridge(
            MqttSettings(
                host=settings.mqtt_host,
                port=settings.mqtt_port,
                ca_file=settings.mqtt_ca or settings.data_dir / "ca" / "ca.pem",
                cert_file=cert,
                key_file=key,
            ),
            monitor=monitor,
        )
        monitor.hints.append(bridge)
    registry = metrics_registry(
        FleetCollector(
            monitor=monitor,
            devices=devices,
            metadata=metadata,
            rollouts=rollouts,
            certificates=partial(_certificates, settings, device_ca),
            clock=clock,
        )
    )
    return Monitoring(
        monitor=monitor,
        sweep=MonitorSweep(monitor, interval=settings.monitor_interval),
        router=monitor_router(monitor, gate=gate, auth=auth, registry=registry),
        webhooks=webhooks,
        mqtt=bridge,
    )
