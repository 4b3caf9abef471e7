"""The agent daemon (``otaguard agent DIR run``): poll, update, report, and listen for hints.

Each cycle checks in and updates (:meth:`Device.update`), then sends one telemetry report,
then waits the poll interval with jitter. With a broker configured (``mqtt_url``, ADR
0026) the daemon keeps one MQTT connection beside it (:class:`MqttLink`):

* the device certificate is the MQTT identity; the connection is re-established with
  backoff when the broker is down or drops it, and again whenever the certificate file
  changes (a renewal), so the broker always sees the current certificate;
* each report is published over MQTT, and sent over HTTPS when MQTT is unavailable;
* a "check in now" hint cuts the current wait short (:class:`HintGate`), at most once per
  ``hint_min_interval_s`` (default :data:`~otaguard.agent.config.HINT_MIN_INTERVAL_S`),
  so a flood of hints cannot make the device hammer the server. A hint carries nothing
  the device reads: its payload is ignored, and the check-in it causes is verified like
  any other (the device still polls on its own schedule whatever the broker does).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from otaguard.agent.mqtt import DeviceMqtt
from otaguard.agent.telemetry import note_error
from otaguard.model.errors import OtaguardError, StopRequestedError, TransportError
from otaguard.model.telemetry import Telemetry

if TYPE_CHECKING:
    from otaguard.agent.device import Device

__all__ = [
    "IDENTITY_CHECK_S",
    "RECONNECT_MAX_S",
    "RECONNECT_MIN_S",
    "HintGate",
    "MqttLink",
    "run_daemon",
]

logger = logging.getLogger(__name__)

#: first pause before reconnecting to the broker; doubled after each failure
RECONNECT_MIN_S: Final = 1.0
#: longest pause between reconnection attempts: a broker back after an outage is used
#: within a minute, and a fleet of devices does not knock on a dead broker every second
RECONNECT_MAX_S: Final = 60.0
#: how often the link looks at the certificate file for a renewal (one stat call)
IDENTITY_CHECK_S: Final = 2.0
#: how long stopping waits for the connection thread (SIGTERM stops within seconds)
_JOIN_S: Final = 2.0
#: how often a wait looks at the stop request (SIGTERM stops the daemon within this)
_STOP_POLL_S: Final = 0.25


class HintGate:
    """Turns "check in now" hints into early check-ins, at most one per ``min_interval``.

    Thread-safe: :meth:`hint` is called from the MQTT network thread, :meth:`wait` and
    :meth:`cycle_started` from the daemon's loop. A hint inside the window is not lost:
    it is kept, and the early check-in happens when the window ends (unless the regular
    poll comes first).
    """

    def __init__(self, *, min_interval: float, clock: Callable[[], float] = time.monotonic):
        """At most one early check-in per ``min_interval`` seconds of ``clock``."""
        self.min_interval = min_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._pending = False
        self._last_early: float | None = None
        #: hints received (for logs and tests)
        self.received = 0

    def hint(self) -> None:
        """A hint arrived (its content is never read)."""
        with self._cond:
            self.received += 1
            self._pending = True
            self._cond.notify_all()

    def cycle_started(self) -> None:
        """A check-in cycle starts: the hints received so far are answered by it."""
        with self._cond:
            self._pending = False

    def wait(self, delay: float, stop: threading.Event) -> bool:
        """Wait ``delay`` seconds, or less when a hint allows an early check-in.

        Returns:
            True when a hint ended the wait, False when the delay passed or ``stop`` was set.
        """
        deadline = self._clock() + delay
        with self._cond:
            while not stop.is_set():
                now = self._clock()
                wake_at = deadline
                if self._pending:
                    ready_at = (
                        now if self._last_early is None else self._last_early + self.min_interval
                    )
                    if ready_at <= now:
                        self._pending = False
                        self._last_early = now
                        return True
                    wake_at = min(deadline, ready_at)
                if now >= deadline:
                    return False
                self._cond.wait(min(wake_at - now, _STOP_POLL_S))
        return False


def _identity_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the certificate file is replaced (renewal writes a new file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class MqttLink:
    """Keeps one :class:`DeviceMqtt` connection up in a background thread.

    Reconnects with exponential backoff (:data:`RECONNECT_MIN_S` to
    :data:`RECONNECT_MAX_S`, with jitter) while the broker is unreachable or refuses the
    device, and reconnects with a fresh TLS context whenever ``identity`` (the device
    certificate file) changes.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        serial: str,
        tls: Callable[[], ssl.SSLContext],
        identity: Path,
        on_hint: Callable[[], None],
    ):
        """Connect to ``host:port`` as ``serial``; ``tls`` builds the context (CA and
        device certificate) at each connection; ``on_hint`` is called for each hint."""
        self.host, self.port, self.serial = host, port, serial
        self._tls = tls
        self._identity = identity
        self._on_hint = on_hint
        self._stopped = threading.Event()
        self._lost = threading.Event()
        self._conn: DeviceMqtt | None = None
        self._thread: threading.Thread | None = None
        #: connections established so far (tests, logs)
        self.connections = 0

    @property
    def connected(self) -> bool:
        """True while a connection to the broker is up."""
        conn = self._conn
        return conn is not None and conn.connected

    def start(self) -> None:
        """Start connecting in the background (never blocks on the broker)."""
        self._thread = threading.Thread(target=self._supervise, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Disconnect and end the background thread."""
        self._stopped.set()
        self._lost.set()
        if self._thread is not None:
            # A connection attempt in progress may block up to its own timeout; the thread
            # is a daemon thread, so a stopping agent does not wait for it.
            self._thread.join(timeout=_JOIN_S)

    def publish(self, report: Telemetry) -> bool:
        """Publish ``report`` (QoS 1, acknowledged); False when MQTT is unavailable."""
        conn = self._conn
        if conn is None or not conn.connected:
            return False
        try:
            conn.publish(report)
        except TransportError as e:
            logger.warning("telemetry not published over MQTT: %s", e.diagnostics())
            return False
        return True

    def _pause(self, delay: float) -> None:
        # Jitter: devices that lost one broker together do not all come back together.
        self._stopped.wait(delay * random.uniform(0.5, 1.0))  # noqa: S311 - not security

    def _supervise(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stopped.is_set():
            stamp = _identity_stamp(self._identity)
            self._lost.clear()
            try:
                conn = DeviceMqtt(host=self.host, port=self.port, tls=self._tls(),
                                  serial=self.serial, on_hint=self._on_hint,
                                  on_lost=self._lost.set)  # fmt: skip
                conn.connect()
            except (OtaguardError, ssl.SSLError, OSError) as e:
                # A thread boundary: the broker or the identity is not usable now; HTTPS
                # carries the telemetry meanwhile.
                why = e.diagnostics() if isinstance(e, OtaguardError) else str(e)
                # The first failure of an outage is a warning; the retries are not news.
                log = logger.warning if delay == RECONNECT_MIN_S else logger.debug
                log("MQTT broker %s:%d unavailable (%s); telemetry over HTTPS, retrying in "
                    "about %.0f s", self.host, self.port, why, delay)  # fmt: skip
                self._pause(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_MIN_S
            self.connections += 1
            self._conn = conn
            logger.info("MQTT connected to %s:%d as %s", self.host, self.port, self.serial)
            renewed = False
            while not self._stopped.is_set():
                if self._lost.wait(IDENTITY_CHECK_S):
                    break
                if _identity_stamp(self._identity) != stamp:
                    renewed = True
                    break
            self._conn = None
            conn.close()
            if self._stopped.is_set():
                break
            if renewed:
                logger.info("device certificate renewed: reconnecting to MQTT with it")
                continue
            logger.warning("MQTT connection to %s:%d lost; reconnecting", self.host, self.port)
            self._pause(delay)


def _send_telemetry(dev: Device, link: MqttLink | None) -> None:
    """One report: over MQTT when connected, else over HTTPS (the device API)."""
    report = dev.telemetry()
    if link is not None and link.publish(report):
        return
    dev.send_telemetry(report)


OnResult = Callable[[Any], None]
OnError = Callable[[OtaguardError], None]


def _cycle(
    dev: Device, link: MqttLink | None, on_result: OnResult | None, on_error: OnError | None
) -> bool:
    """One check-in and update, then one report; False when the daemon is stopping."""
    failed = False
    try:
        result = dev.update()
        if result.outcome == "rolled-back":
            note_error(dev.paths, rollback=True)
        if on_result:
            on_result(result)
    except StopRequestedError:
        return False
    except OtaguardError as e:
        if dev.stop_requested.is_set():
            return False
        failed = True
        if on_error:
            on_error(e)
        logger.warning("update failed: %s", e.diagnostics())
        note_error(dev.paths)
    try:
        _send_telemetry(dev, link)  # with each check-in cycle (ADR 0026)
    except OtaguardError as e:
        if on_error:
            on_error(e)
        logger.warning("telemetry not sent: %s", e.diagnostics())
        if not failed:  # one error per cycle in the count
            note_error(dev.paths)
    return True


def run_daemon(
    dev: Device,
    *,
    on_result: OnResult | None = None,
    on_error: OnError | None = None,
) -> None:
    """Poll, update and report until ``dev.request_stop()``; errors are reported, not fatal.

    See the module docstring for MQTT (telemetry, hints, reconnection).
    """
    gate = HintGate(min_interval=dev.config.hint_min_interval_s)
    link = dev.mqtt_link(on_hint=gate.hint)
    if link is not None:
        link.start()
    try:
        while not dev.stop_requested.is_set():
            gate.cycle_started()
            if not _cycle(dev, link, on_result, on_error):
                break
            if gate.wait(dev.poll_delay(), dev.stop_requested):
                logger.info("checking in early: the server hinted a new instruction")
    finally:
        if link is not None:
            link.stop()
