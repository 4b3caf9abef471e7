"""The agent daemon's pure parts: the hint gate's rate limit, the broker URL and the
agent settings that name it (ADR 0026). The daemon against a real broker is
tests/integration/test_agent_mqtt.py."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from otaguard.agent.config import (
    HINT_MIN_INTERVAL_S,
    MQTT_DEFAULT_PORT,
    DeviceConfig,
    parse_mqtt_url,
)
from otaguard.agent.daemon import HintGate
from otaguard.model.errors import ConfigError

CONFIG = DeviceConfig(
    server_url="https://updates.example:8443",
    hardware_id="hw",
    serial="dev1",
    unsafe_no_health_check=True,
)


def test_the_first_hint_wakes_the_wait_at_once() -> None:
    gate = HintGate(min_interval=60)
    threading.Timer(0.1, gate.hint).start()
    start = time.monotonic()
    assert gate.wait(30, threading.Event()) is True
    assert time.monotonic() - start < 2


def test_hints_inside_the_window_wait_for_its_end_and_count_once() -> None:
    gate = HintGate(min_interval=0.6)
    gate.hint()
    start = time.monotonic()
    assert gate.wait(30, threading.Event())  # the first early check-in: at once
    for _ in range(50):  # a flood inside the window
        gate.hint()
    assert gate.wait(30, threading.Event())  # one more, at the window's end
    assert 0.5 <= time.monotonic() - start < 2
    # the flood was answered by that one check-in: nothing pending any more
    assert gate.wait(0.3, threading.Event()) is False
    assert gate.received == 51


def test_a_check_in_cycle_answers_the_hints_before_it() -> None:
    gate = HintGate(min_interval=0.2)
    gate.hint()
    gate.cycle_started()  # the regular poll came first
    assert gate.wait(0.4, threading.Event()) is False


def test_the_regular_poll_is_not_delayed_by_a_pending_hint() -> None:
    gate = HintGate(min_interval=60)
    gate.hint()
    assert gate.wait(10, threading.Event())
    gate.hint()  # inside the 60 s window
    start = time.monotonic()
    assert gate.wait(0.3, threading.Event()) is False  # the poll's own delay ends it
    assert time.monotonic() - start < 1.5


def test_a_stop_request_ends_the_wait() -> None:
    gate = HintGate(min_interval=1)
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    start = time.monotonic()
    assert gate.wait(30, stop) is False
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtts://broker.example", ("broker.example", MQTT_DEFAULT_PORT)),
        ("mqtts://127.0.0.1:18883", ("127.0.0.1", 18883)),
        ("mqtts://[::1]:8884/", ("::1", 8884)),
    ],
)
def test_broker_urls(url: str, expected: tuple[str, int]) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "mqtt://broker.example",  # plain MQTT: no TLS, no device identity
        "https://broker.example",
        "mqtts://broker.example:0",
        "mqtts://broker.example:99999",
        "mqtts://user@broker.example",
        "mqtts://broker.example/otaguard/#",
        "",
    ],
)
def test_other_broker_urls_are_refused_in_one_line(url: str) -> None:
    with pytest.raises(ConfigError, match=r"must be mqtts://HOST\[:PORT\] \(MQTT over TLS\)"):
        dataclasses.replace(CONFIG, mqtt_url=url)


def test_the_hint_rate_limit_has_a_floor() -> None:
    assert CONFIG.hint_min_interval_s == HINT_MIN_INTERVAL_S
    for bad in (0, 0.5, float("nan"), -1):
        with pytest.raises(ConfigError, match="hint_min_interval_s must be at least 1"):
            dataclasses.replace(CONFIG, hint_min_interval_s=bad)
    with pytest.raises(ConfigError, match="hint_min_interval_s must be of type"):
        dataclasses.replace(CONFIG, hint_min_interval_s="30")  # type: ignore[arg-type]
