"""The device's side of MQTT (ADR 0026): telemetry out, "check in now" hints in.

The device connects to the broker with its own certificate (mutual TLS; the broker takes
the certificate's CN, the serial, as the MQTT username), publishes its reports to
``otaguard/v1/devices/<serial>/telemetry`` and subscribes to ``.../<serial>/hint``. A hint
only shortens the wait until the next poll: the agent still polls with jitter, and never
trusts anything in the hint (it carries no instruction; the check-in that follows is
verified as always).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from otaguard.model.errors import TransportError
from otaguard.model.telemetry import Telemetry, hint_topic, telemetry_topic

__all__ = ["CONNECT_TIMEOUT", "DeviceMqtt"]

logger = logging.getLogger(__name__)

#: seconds to wait for the broker's CONNACK, a SUBACK or a PUBACK
CONNECT_TIMEOUT: Final = 10.0
KEEPALIVE_SECONDS: Final = 60
#: a hint is a tiny JSON object; anything bigger is not read
MAX_HINT_BYTES: Final = 1024


class DeviceMqtt:
    """One device's MQTT connection."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        serial: str,
        on_hint: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ):
        """Connect as ``serial`` with ``tls`` (trusting the server CA, presenting the
        device certificate); ``on_hint`` is called for each hint, ``on_lost`` when an
        established connection drops (from paho's network thread)."""
        self.serial = serial
        self._on_hint = on_hint
        self._on_lost = on_lost
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{serial}", protocol=mqtt.MQTTv311
        )
        self._client.tls_set_context(tls)
        self._client.on_connect = self._connected_cb
        self._client.on_message = self._message
        self._client.on_disconnect = self._disconnected_cb
        self._host, self._port = host, port

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return bool(self._client.is_connected())

    def __enter__(self) -> DeviceMqtt:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect and start the network thread.

        Raises:
            TransportError: the broker was not reached or refused the device.
        """
        try:
            self._client.connect(self._host, self._port, keepalive=KEEPALIVE_SECONDS)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"MQTT broker {self._host}:{self._port}: {e}") from e
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT) or self._refused:
            self.close()
            raise TransportError(f"MQTT broker refused {self.serial}: {self._refused or 'timeout'}")

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _connected_cb(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        else:
            client.subscribe(hint_topic(self.serial), qos=1)
        self._connected.set()

    def _disconnected_cb(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        logger.debug("MQTT disconnected: %s", reason)
        if self._on_lost is not None:
            self._on_lost()

    def _message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != hint_topic(self.serial) or len(msg.payload) > MAX_HINT_BYTES:
            return
        logger.info("check-in hint received")
        if self._on_hint is not None:
            self._on_hint()

    def publish(self, report: Telemetry) -> None:
        """Publish ``report`` on this device's telemetry topic (QoS 1, acknowledged).

        Raises:
            TransportError: not acknowledged by the broker in time.
        """
        self.publish_raw(telemetry_topic(self.serial), report.to_bytes())

    def publish_raw(self, topic: str, payload: bytes) -> None:
        """Publish bytes on ``topic`` and wait for the broker's PUBACK.

        The broker acknowledges a publish its ACL denies too (MQTT 3.1.1 cannot say
        no): it drops it silently.

        Raises:
            TransportError: not acknowledged in time.
        """
        info = self._client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(CONNECT_TIMEOUT)
        except (ValueError, RuntimeError) as e:
            raise TransportError(f"MQTT publish failed: {e}") from e
        if not info.is_published():
            raise TransportError("MQTT publish not acknowledged in time")

    def subscribe(self, topic: str, on_message: Callable[[str, bytes], None]) -> int:
        """Subscribe to another topic (tests of the broker's ACL); the granted QoS
        (128: refused)."""
        granted = threading.Event()
        result: list[int] = []

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
            result.extend(int(c.value) for c in codes)
            granted.set()

        self._client.on_subscribe = on_subscribe
        self._client.message_callback_add(
            topic, lambda _c, _u, msg: on_message(msg.topic, bytes(msg.payload))
        )
        self._client.subscribe(topic, qos=1)
        if not granted.wait(CONNECT_TIMEOUT) or not result:
            raise TransportError(f"MQTT subscription to {topic} not answered")
        return result[0]
