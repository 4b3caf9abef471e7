"""The server's side of MQTT: telemetry in, "check in now" hints out (ADR 0026).

The broker (Mosquitto, ``deploy/mosquitto/``) authenticates every client by mutual TLS
against the device CA and uses the certificate's CN as the username; its ACL lets a
device (CN = serial) publish only to ``otaguard/v1/devices/<serial>/telemetry`` and read
only ``.../<serial>/hint``. The server connects with a service identity from the same CA
(CN ``otaguard:server``, never a device serial), reads every device's telemetry topic and
writes every hint topic.

The topic is the device's identity here (the broker checked it); the report is parsed
and bounded like an HTTPS one and refused when it names another device, or when the
registry no longer has the device enrolled (the broker does not know the registry: a
quarantined device's certificate keeps connecting until it expires, and its reports are
dropped here).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from otaguard._fs import atomic_write_bytes
from otaguard.crypto.ca import write_unattended_key
from otaguard.crypto.device_ca import DeviceCA
from otaguard.model.errors import ConfigError, OtaguardError
from otaguard.model.telemetry import (
    MAX_TELEMETRY_BYTES,
    TOPIC_PREFIX,
    hint_topic,
    serial_of_topic,
)
from otaguard.server.monitor import Monitor

__all__ = [
    "CONNECT_TIMEOUT",
    "SERVER_MQTT_NAME",
    "MqttBridge",
    "MqttSettings",
    "write_broker_files",
    "write_server_identity",
]

logger = logging.getLogger(__name__)

#: the server's MQTT username (CN of its service certificate)
SERVER_MQTT_NAME: Final = "otaguard:server"
#: the service certificate is issued at each start; a month outlives any restart cycle
SERVICE_CERT_LIFETIME: Final = dt.timedelta(days=30)
#: seconds to wait for the broker at start before going on without it (it reconnects)
CONNECT_TIMEOUT: Final = 10.0
#: MQTT keepalive: a dead broker connection is noticed within ~1.5x this
KEEPALIVE_SECONDS: Final = 30


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and who the server is to it."""

    host: str
    port: int
    #: CA file the broker's certificate must chain to (the server's TLS CA by default)
    ca_file: Path
    cert_file: Path
    key_file: Path


def write_server_identity(ca: DeviceCA, directory: Path, *, now: dt.datetime) -> tuple[Path, Path]:
    """Issue the server's MQTT service certificate into ``directory``: (cert, key).

    Raises:
        ConfigError: the directory cannot be written.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_service(
        key.public_key(), name=SERVER_MQTT_NAME, now=now, lifetime=SERVICE_CERT_LIFETIME
    )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = directory / "server-mqtt.key", directory / "server-mqtt.pem"
        write_unattended_key(key_path, key)
        atomic_write_bytes(
            cert_path,
            cert.public_bytes(serialization.Encoding.PEM)
            + ca.issuing.public_bytes(serialization.Encoding.PEM),
        )
    except OSError as e:
        raise ConfigError(f"cannot write the MQTT identity in {directory}: {e.strerror}") from e
    return cert_path, key_path


def _tls_context(s: MqttSettings) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(s.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(s.cert_file), str(s.key_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"MQTT TLS settings unusable: {e}") from e
    return ctx


class MqttBridge:
    """Subscribes to every device's telemetry; publishes hints (a :class:`HintSink`)."""

    def __init__(self, settings: MqttSettings, *, monitor: Monitor):
        """Connect to the broker in ``settings``; reports go to ``monitor``."""
        self.settings = settings
        self.monitor = monitor
        self.connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="otaguard-server",
            protocol=mqtt.MQTTv311,
        )
        self._client.tls_set_context(_tls_context(settings))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def start(self) -> None:
        """Connect (waiting up to :data:`CONNECT_TIMEOUT`) and run the network thread.

        An unreachable broker is logged, not fatal: paho keeps reconnecting, and devices
        poll over HTTPS regardless (MQTT is a hint and a second telemetry path).
        """
        self._client.connect_async(
            self.settings.host, self.settings.port, keepalive=KEEPALIVE_SECONDS
        )
        self._client.loop_start()
        if not self.connected.wait(CONNECT_TIMEOUT):
            logger.error(
                "MQTT broker %s:%d not reached in %.0f s; retrying in the background",
                self.settings.host,
                self.settings.port,
                CONNECT_TIMEOUT,
            )

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            logger.error("MQTT broker refused the server: %s", reason)
            return
        client.subscribe(f"{TOPIC_PREFIX}+/telemetry", qos=1)
        self.connected.set()
        logger.info("MQTT connected to %s:%d", self.settings.host, self.settings.port)

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self.connected.clear()
        logger.warning("MQTT disconnected: %s", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        serial = serial_of_topic(msg.topic)
        if serial is None:
            logger.warning("MQTT message on an unexpected topic dropped")
            return
        if len(msg.payload) > MAX_TELEMETRY_BYTES:
            self.monitor.counts["telemetry", "refused"] += 1
            logger.warning("MQTT telemetry of %s refused: larger than %d bytes", serial,
                           MAX_TELEMETRY_BYTES)  # fmt: skip
            return
        try:
            self.monitor.telemetry(serial=serial, body=bytes(msg.payload), transport="mqtt")
        except OtaguardError as e:
            # paho's network thread: one bad report is logged, the next one is read.
            logger.warning("MQTT telemetry of %s refused: %s", serial, e.diagnostics())

    def hint(self, serial: str) -> None:
        """Publish a "check in now" hint to ``serial`` (QoS 1, not retained)."""
        payload = json.dumps({"hint": "check-in", "serial": serial}).encode()
        info = self._client.publish(hint_topic(serial), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            logger.warning("MQTT hint to %s not sent: %s", serial, mqtt.error_string(info.rc))


def write_broker_files(data_dir: Path, *, host: str, out: Path) -> list[Path]:
    """The broker's certificate (from the server's TLS CA) and the device CA chain.

    Writes ``broker.pem``, ``broker.key`` and ``device-ca.pem`` into ``out``
    (``deploy/mosquitto/otaguard.conf`` names them).

    Raises:
        ConfigError: the data directory has no CAs, or ``out`` cannot be written.
    """
    from otaguard.crypto.ca import CertificateAuthority
    from otaguard.crypto.device_ca import DEVICE_CA_DIR

    if not (data_dir / "ca").is_dir() or not (data_dir / DEVICE_CA_DIR).is_dir():
        raise ConfigError(f"{data_dir} has no CAs yet: run otaguard server init --data {data_dir}")
    ca = CertificateAuthority.load_or_create(data_dir / "ca")
    device_ca = DeviceCA.load_or_create(data_dir / DEVICE_CA_DIR)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        creds = ca.server_credentials(out, [host])
        cert, key = out / "broker.pem", out / "broker.key"
        creds.cert_path.replace(cert)
        creds.key_path.replace(key)
        chain = out / "device-ca.pem"
        atomic_write_bytes(chain, device_ca.chain_path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot write the broker files in {out}: {e.strerror}") from e
    return [cert, key, chain]
