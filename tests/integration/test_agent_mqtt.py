"""The agent daemon over MQTT (ADR 0026), against a real Mosquitto running the shipped
config and a real server: ``otaguard agent DIR run`` in its own process, configured by an
agent.toml naming the broker.

* a hint makes the running daemon check in at once instead of after its (hour-long) poll
  interval, and install its new assignment; a certificate renewal reconnects it with
  the new certificate, and hints still arrive;
* a flood of hints leads to at most one early check-in per ``hint_min_interval``;
* with the broker down the daemon still polls and reports over HTTPS, and moves its
  reports to MQTT once the broker is back;
* a quarantined device still connects and publishes on its own topic; the server
  ignores its reports and sends it no hints.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import World, start_world
from mqtt_support import Broker
from otaguard.agent import Device
from otaguard.agent.identity import renew_if_due
from otaguard.agent.mqtt import DeviceMqtt
from otaguard.server import init_data_dir
from otaguard.server.client import FleetClient
from otaguard.server.mqtt import MqttBridge

#: the daemon's poll interval in the hint tests: only a hint can make it check in again
LONG_POLL = "1h"
#: at most one early check-in per this many seconds in these tests (default 30)
HINT_INTERVAL = 2.0


@dataclass
class Setup:
    world: World
    broker: Broker
    tmp: Path

    @property
    def bridge(self) -> MqttBridge:
        bridge = self.world.server.app.state.monitoring.mqtt
        assert bridge is not None
        return bridge

    def fleet(self) -> FleetClient:
        s = self.world.server
        assert s.ca_cert is not None
        return FleetClient(server_url=s.base_url, ca_cert=s.ca_cert, token=s.operator_token)

    def checkins(self, serial: str) -> int:
        with self.fleet() as f:
            return len(f.checkins(serial).checkins)

    def telemetry(self, serial: str) -> list[str]:
        """The transports of the device's stored reports, oldest first."""
        rows = self.world.server.app.state.monitoring.monitor.store.telemetry(serial, limit=100)
        return [transport for _, transport, _ in reversed(rows)]

    def connects(self, serial: str) -> int:
        """Connections the broker accepted from the device (its log)."""
        log = self.broker.log.read_text(errors="replace")
        return sum(
            1
            for line in log.splitlines()
            if "New client connected" in line and f"dev-{serial}" in line
        )

    def subscribed(self, serial: str) -> int:
        log = self.broker.log.read_text(errors="replace")
        return log.count(f"Received SUBSCRIBE from dev-{serial}")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    paths = init_data_dir(tmp_path / "server")
    s = Setup(None, Broker(tmp_path, data_dir=paths.data_dir), tmp_path)  # type: ignore[arg-type]
    try:
        s.world = start_world(tmp_path, director=True, mqtt_host="127.0.0.1",
                              mqtt_port=s.broker.port)  # fmt: skip
        try:
            s.world.release("1.0.0")
            assert s.bridge.connected.wait(10), s.broker.log.read_text()
            yield s
        finally:
            s.world.server.stop()
    finally:
        s.broker.stop()  # the one running now (a test may restart it)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> float:
    """Seconds it took ``check`` to hold."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


class Daemon:
    """``otaguard agent DIR run`` in its own process, its output in a file."""

    def __init__(self, tmp: Path, dev: Device, *, port: int, interval: str, jitter: float = 0.0):
        conf = tmp / f"agent-{dev.config.serial}.toml"
        conf.write_text(
            f'device_dir = "{dev.paths.root}"\npoll_interval = "{interval}"\n'
            f'poll_jitter = {jitter}\nmqtt_url = "mqtts://127.0.0.1:{port}"\n'
            f"hint_min_interval = {HINT_INTERVAL}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
        self.log = tmp / f"agent-{dev.config.serial}.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otaguard", "-v", "agent", "--config", str(conf), "run"],
            env=env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def _running_version(setup: Setup, serial: str) -> str:
    with setup.fleet() as f:
        history = f.checkins(serial).checkins
    return history[0].running_version if history else ""


def test_a_hint_makes_the_daemon_check_in_at_once_and_a_renewal_reconnects_it(
    setup: Setup, daemons: list[Daemon]
) -> None:
    dev = setup.world.device("hinted")
    serial = dev.config.serial
    daemons.append(d := Daemon(setup.tmp, dev, port=setup.broker.port, interval=LONG_POLL))
    wait_for("the first check-in", lambda: setup.checkins(serial) == 1)
    wait_for("the daemon's subscription", lambda: setup.subscribed(serial) == 1)
    wait_for("a report over MQTT", lambda: "mqtt" in setup.telemetry(serial))
    assert "MQTT mqtts://127.0.0.1" in d.text()

    # A new assignment: the server hints, the daemon checks in and installs at once
    # (its next poll is an hour away).
    setup.world.release("1.1.0")
    with setup.fleet() as f:
        f.assign(serial, version="1.1.0")
    took = wait_for("the hinted check-in", lambda: setup.checkins(serial) >= 2, timeout=10)
    assert took < 5, f"the hinted check-in took {took:.1f} s"
    wait_for("1.1.0 installed", lambda: Device(dev.paths.root).status().booted.version == "1.1.0")
    assert "checking in early" in d.text()

    # The certificate is renewed (as the daemon would when a third of its life is left):
    # the daemon reconnects to the broker with the new one, and hints arrive on it.
    before = dev.paths.device_cert.read_bytes()
    renew_if_due(dev.paths, dev.config, key_store=dev.key_store,
                 now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=20))  # fmt: skip
    assert dev.paths.device_cert.read_bytes() != before
    wait_for("the reconnection", lambda: setup.subscribed(serial) == 2)
    assert setup.connects(serial) == 2
    assert "reconnecting to MQTT with it" in d.text()
    time.sleep(HINT_INTERVAL)  # the last early check-in's window
    count = setup.checkins(serial)
    with setup.fleet() as f:
        f.assign(serial, version=None)  # back to the default policy: a hint
    took = wait_for("a hinted check-in after the renewal",
                    lambda: setup.checkins(serial) > count, timeout=10)  # fmt: skip
    assert took < 5


def test_a_hint_flood_leads_to_at_most_one_early_check_in_per_interval(
    setup: Setup, daemons: list[Daemon]
) -> None:
    dev = setup.world.device("flooded")
    serial = dev.config.serial
    daemons.append(Daemon(setup.tmp, dev, port=setup.broker.port, interval=LONG_POLL))
    wait_for("the first check-in", lambda: setup.checkins(serial) == 1)
    wait_for("the daemon's subscription", lambda: setup.subscribed(serial) == 1)
    time.sleep(0.3)  # the SUBACK
    flood_s = 5.0
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < flood_s:  # the server's own hint path, 40 a second
        setup.bridge.hint(serial)
        sent += 1
        time.sleep(0.025)
    # Early check-ins at the flood's start and then one per HINT_INTERVAL, the last one
    # for hints inside the final window; then nothing more (the next poll is in an hour).
    time.sleep(HINT_INTERVAL + 2.0)
    early = setup.checkins(serial) - 1
    bound = math.ceil(flood_s / HINT_INTERVAL) + 1
    assert 2 <= early <= bound, f"{early} early check-ins for {sent} hints (bound {bound})"
    time.sleep(HINT_INTERVAL + 1.0)
    assert setup.checkins(serial) - 1 == early  # quiet once the flood stopped


def test_with_the_broker_down_the_daemon_polls_and_reports_over_https(
    setup: Setup, daemons: list[Daemon]
) -> None:
    port = setup.broker.port
    setup.broker.stop()
    dev = setup.world.device("offline")
    serial = dev.config.serial
    daemons.append(d := Daemon(setup.tmp, dev, port=port, interval="1s"))
    wait_for("three polls", lambda: setup.checkins(serial) >= 3)
    wait_for("two reports", lambda: len(setup.telemetry(serial)) >= 2)
    assert set(setup.telemetry(serial)) == {"https"}
    assert "MQTT broker 127.0.0.1" in d.text() and "unavailable" in d.text()
    # The broker comes back on its port: the daemon reconnects (backoff) and its reports
    # move to MQTT.
    setup.broker = Broker(setup.tmp / "again", data_dir=setup.world.server.data_dir, port=port)
    assert setup.bridge.connected.wait(30)
    wait_for("a report over MQTT", lambda: "mqtt" in setup.telemetry(serial), timeout=45)
    start = time.monotonic()
    d.stop()  # SIGTERM: the MQTT link does not hold the daemon up
    assert time.monotonic() - start < 8
    assert d.proc.returncode == 0 and "stopped" in d.text()


def test_a_quarantined_device_can_still_publish_but_is_ignored_and_not_hinted(
    setup: Setup,
) -> None:
    dev = setup.world.device("quarantined")
    serial = dev.config.serial
    hints = threading.Event()
    monitor = setup.world.server.app.state.monitoring.monitor
    with DeviceMqtt(host="127.0.0.1", port=setup.broker.port, tls=dev.mqtt_tls(),
                    serial=serial, on_hint=hints.set) as conn:  # fmt: skip
        conn.publish(dev.telemetry())
        wait_for("the report", lambda: setup.telemetry(serial) == ["mqtt"])
        with setup.fleet() as f:
            f.quarantine(serial, "test: behaves oddly")
            refused = monitor.counts["telemetry", "refused"]
            # The broker does not read the registry: the connection stays, and a publish
            # on its own topic is accepted by the broker ...
            assert conn.connected
            conn.publish(dev.telemetry())
            # ... and dropped by the server (counted, not stored).
            wait_for("the refusal", lambda: monitor.counts["telemetry", "refused"] > refused)
            assert setup.telemetry(serial) == ["mqtt"]
            # A new instruction sends it no hint (an enrolled device gets one: below).
            f.assign(serial, version="1.0.0")
            other = setup.world.device("enrolled")
            other_hints = threading.Event()
            with DeviceMqtt(host="127.0.0.1", port=setup.broker.port, tls=other.mqtt_tls(),
                            serial=other.config.serial, on_hint=other_hints.set):  # fmt: skip
                time.sleep(0.3)  # the SUBACK
                f.assign(other.config.serial, version="1.0.0")
                assert other_hints.wait(10)
            assert not hints.is_set()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mqtt-url", "mqtt://127.0.0.1:1883"], "must be mqtts://HOST[:PORT]"),
        (["--mqtt-url", "mqtts://127.0.0.1:1", "--mqtt-ca", "/nonexistent/ca.pem"],
         "cannot read the MQTT CA certificate /nonexistent/ca.pem"),
    ],
)  # fmt: skip
def test_a_bad_broker_setting_is_one_line(
    world: World, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import error_lines
    from otaguard.cli._cli import main

    dev = world.device("cli")
    assert main(["agent", str(dev.paths.root), "run", *args]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line
