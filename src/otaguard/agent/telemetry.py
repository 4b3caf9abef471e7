"""The agent's health telemetry (schema ``otaguard.telemetry/1``, ADR 0026).

The counters live in ``telemetry-state.json`` in the device directory, written
atomically (temp, fsync, rename): each boot draws a fresh random ``boot_id`` and raises
``boot_count``; each report raises ``seq``. The server tells one device from two devices
sharing its credentials by these (a clone boots its own session, and the two sessions
interleave: :func:`otaguard.fleet.anomaly.boot_session_conflict`).

:func:`build_report` reads the device's state into a report; :func:`send_report` POSTs
it over the device's mutual-TLS connection; :mod:`otaguard.agent.mqtt` publishes the
same bytes over MQTT.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from otaguard._fs import atomic_write_bytes
from otaguard.agent.attack_flags import read_flags
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.fetcher import Fetcher
from otaguard.agent.install import InstallState
from otaguard.model.errors import DeviceStorageError, TransportError
from otaguard.model.telemetry import INSTALL_RESULTS, LastInstall, Telemetry

__all__ = [
    "TELEMETRY_PATH",
    "TelemetryState",
    "build_report",
    "note_boot",
    "note_error",
    "send_report",
]

logger = logging.getLogger(__name__)

TELEMETRY_PATH: Final = "/api/v1/device/telemetry"
STATE_FILE: Final = "telemetry-state.json"
#: the server's answer to a report is ~60 bytes
MAX_ANSWER_BYTES: Final = 4096


@dataclass
class TelemetryState:
    """Counters kept across reports and boots."""

    boot_id: str
    boot_count: int
    seq: int
    booted_at: float
    rollbacks: int = 0
    agent_errors: int = 0


def _path(paths: DevicePaths) -> Path:
    return paths.root / STATE_FILE


def _load(paths: DevicePaths) -> TelemetryState:
    try:
        raw = json.loads(_path(paths).read_bytes())
        return TelemetryState(**raw)
    except FileNotFoundError:
        return TelemetryState(secrets.token_hex(16), 0, 0, time.time())
    except (OSError, ValueError, TypeError) as e:
        # A damaged counter file must not stop updates: start a new session (the server
        # may then see a conflict and alert, which is the right outcome for a device
        # whose state was altered).
        logger.warning("telemetry state unreadable (%s); starting a new session", e)
        return TelemetryState(secrets.token_hex(16), 0, 0, time.time())


def _save(paths: DevicePaths, state: TelemetryState) -> None:
    try:
        atomic_write_bytes(_path(paths), json.dumps(asdict(state)).encode())
    except OSError as e:
        raise DeviceStorageError(f"cannot write {STATE_FILE}: {e.strerror}") from e


def note_boot(paths: DevicePaths) -> TelemetryState:
    """A power-on: a new random boot id, one more boot."""
    state = _load(paths)
    state = TelemetryState(
        boot_id=secrets.token_hex(16),
        boot_count=state.boot_count + 1,
        seq=0,
        booted_at=time.time(),
        rollbacks=state.rollbacks,
        agent_errors=state.agent_errors,
    )
    _save(paths, state)
    return state


def note_error(paths: DevicePaths, *, rollback: bool = False) -> None:
    """An agent error (``rollback``: an install that rolled back)."""
    state = _load(paths)
    if rollback:
        state.rollbacks += 1
    else:
        state.agent_errors += 1
    _save(paths, state)


def _last_install(paths: DevicePaths) -> LastInstall:
    result = InstallState.load(paths.install_state).last_result or {}
    outcome = str(result.get("outcome", "none"))
    duration = result.get("duration_s", 0.0)
    return LastInstall(
        result=outcome if outcome in INSTALL_RESULTS else "failed",
        version=str(result.get("version", ""))[:64],
        duration_s=float(duration) if isinstance(duration, int | float) else 0.0,
    )


def build_report(paths: DevicePaths, config: DeviceConfig, *, running_version: str) -> Telemetry:
    """The next report (its ``seq`` one above the last, persisted before it is sent)."""
    state = _load(paths)
    state.seq += 1
    _save(paths, state)
    return Telemetry(
        serial=config.serial,
        time=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        boot_id=state.boot_id,
        seq=state.seq,
        uptime_s=max(0, int(time.time() - state.booted_at)),
        boot_count=state.boot_count,
        rollbacks=state.rollbacks,
        free_storage_bytes=shutil.disk_usage(paths.root).free,
        agent_errors=state.agent_errors,
        running_version=running_version[:64],
        last_install=_last_install(paths),
        attestation="ok" if config.tpm is not None else "none",
        refused_attacks=len(read_flags(paths)),
    )


def send_report(fetcher: Fetcher, *, server_url: str, report: Telemetry) -> None:
    """POST ``report`` to the server (mutual TLS through ``fetcher``).

    Raises:
        TransportError: the request failed or the server refused the report.
    """
    from tuf.api import exceptions

    try:
        status, body = fetcher.post(
            server_url.rstrip("/") + TELEMETRY_PATH,
            report.to_bytes(),
            content_type="application/json",
            max_length=MAX_ANSWER_BYTES,
        )
    except exceptions.DownloadError as e:
        raise TransportError(f"telemetry not sent: {e}") from e
    if status != 200:
        raise TransportError(
            f"telemetry refused ({status}): {body[:200].decode('utf-8', 'replace')}"
        )
