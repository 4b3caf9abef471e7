"""MQTT over mutual TLS against a real Mosquitto running the shipped config (ADR 0026):
telemetry reaches the server, a device cannot publish to or read another device's
topics, a new instruction sends the device a "check in now" hint."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3

from conftest import World, start_world
from mqtt_support import Broker
from otaguard.agent import Device
from otaguard.agent.mqtt import DeviceMqtt
from otaguard.model.telemetry import hint_topic, telemetry_topic
from otaguard.server import init_data_dir
from otaguard.server.client import FleetClient


@dataclass
class MqttWorld:
    world: World
    broker: Broker

    def connect(self, dev: Device, on_hint: Callable[[], None] | None = None) -> DeviceMqtt:
        return DeviceMqtt(host="127.0.0.1", port=self.broker.port, tls=dev.mqtt_tls(),
                          serial=dev.config.serial, on_hint=on_hint)  # fmt: skip

    def telemetry(self, serial: str) -> list[dict[str, Any]]:
        http = urllib3.PoolManager(ca_certs=str(self.world.server.ca_cert), retries=False)
        resp = http.request(
            "GET", f"{self.world.server.base_url}/api/v1/devices/{serial}/telemetry?limit=100",
            headers={"Authorization": f"Bearer {self.world.server.operator_token}"},
        )  # fmt: skip
        assert resp.status == 200, resp.data
        return list(json.loads(resp.data))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def mqtt_world(tmp_path: Path) -> Iterator[MqttWorld]:
    # The broker's files come from the server's data directory (its TLS CA, the device
    # CA), so it is prepared first; the server then connects to the running broker.
    paths = init_data_dir(tmp_path / "server")
    broker = Broker(tmp_path, data_dir=paths.data_dir)
    try:
        world = start_world(tmp_path, director=True, mqtt_host="127.0.0.1",
                            mqtt_port=broker.port)  # fmt: skip
        try:
            world.release("1.0.0")
            bridge = world.server.app.state.monitoring.mqtt
            assert bridge is not None and bridge.connected.wait(10), broker.log.read_text()
            yield MqttWorld(world, broker)
        finally:
            world.server.stop()
    finally:
        broker.stop()


def test_telemetry_over_mqtt_reaches_the_server(mqtt_world: MqttWorld) -> None:
    dev = mqtt_world.world.device("mq1")
    with mqtt_world.connect(dev) as conn:
        report = dev.telemetry()
        conn.publish(report)
        wait_for("the report", lambda: len(mqtt_world.telemetry("mq1")) == 1)
    (stored,) = mqtt_world.telemetry("mq1")
    assert stored["transport"] == "mqtt"
    assert stored["report"]["boot_id"] == report.boot_id and stored["report"]["seq"] == report.seq


def test_a_device_cannot_publish_to_or_read_another_devices_topics(
    mqtt_world: MqttWorld,
) -> None:
    alice = mqtt_world.world.device("alice")
    bob = mqtt_world.world.device("bob")
    snooped: list[str] = []
    bob_hints = threading.Event()
    with mqtt_world.connect(alice) as a, mqtt_world.connect(bob, bob_hints.set) as b:
        # Reading: Mosquitto 2.0 grants a subscription and applies the ACL to each
        # message it would deliver; alice subscribes to everything of bob's ...
        for topic in (hint_topic("bob"), telemetry_topic("bob"), "otaguard/v1/devices/+/hint",
                      "otaguard/v1/devices/#", "#"):  # fmt: skip
            a.subscribe(topic, lambda t, _p: snooped.append(t))
        # ... and nothing reaches her: bob's telemetry, bob's hint (which bob gets).
        b.publish(bob.telemetry())
        with FleetClient(server_url=mqtt_world.world.server.base_url,
                         ca_cert=mqtt_world.world.server.ca_cert,
                         token=mqtt_world.world.server.operator_token) as fleet:  # fmt: skip
            fleet.assign("bob", version="1.0.0")
        assert bob_hints.wait(10)
        wait_for("bob's report", lambda: len(mqtt_world.telemetry("bob")) == 1)
        # Writing: alice publishes a report in bob's name on bob's topic. The broker
        # acknowledges and drops it (MQTT 3.1.1 cannot refuse a publish).
        forged = bob.telemetry()
        a.publish_raw(telemetry_topic("bob"), forged.to_bytes())
        # And a hint to bob, as if she were the server: bob must not get it.
        bob_hints.clear()
        a.publish_raw(hint_topic("bob"), b'{"hint": "check-in"}')
        # A report of her own on her own topic, published after both, arrives: so the
        # forged ones would have arrived by then had the broker passed them.
        a.publish(alice.telemetry())
        wait_for("alice's report", lambda: len(mqtt_world.telemetry("alice")) == 1)
        time.sleep(0.5)
        assert not bob_hints.is_set()
    assert snooped == []
    stored = mqtt_world.telemetry("bob")
    assert [r["report"]["seq"] for r in stored] == [forged.seq - 1]  # only bob's own
    log = mqtt_world.broker.log.read_text()
    assert "Denied PUBLISH from dev-alice" in log


def test_a_new_instruction_sends_the_device_a_check_in_hint(mqtt_world: MqttWorld) -> None:
    dev = mqtt_world.world.device("hinted")
    got = threading.Event()
    with mqtt_world.connect(dev, got.set):
        time.sleep(0.3)  # the SUBACK of its hint topic
        assert not got.is_set()
        with FleetClient(server_url=mqtt_world.world.server.base_url,
                         ca_cert=mqtt_world.world.server.ca_cert,
                         token=mqtt_world.world.server.operator_token) as fleet:  # fmt: skip
            fleet.assign("hinted", version="1.0.0")
        assert got.wait(10), "no hint within 10 s of the assignment"
