"""Fleet simulator scenarios for monitoring (ADR 0026): telemetry, crash loops, cloned
credentials and tampered slots.

Each simulated device keeps a :class:`BootSession` (random boot id, boot count, report
sequence) and reports schema ``otaguard.telemetry/1`` over its mutual-TLS connection.
The scenarios change what a device does, never what the server sees by other means:

* a crash-looping release (``SimSettings.crash_release``): a device running it reboots
  :data:`CRASH_BOOTS` times between polls, its install health check having passed;
* :func:`clone_device`: a second device holding one device's key and certificate (its
  files copied), booting its own session;
* :func:`tamper_slot`: a device whose running slot was rewritten, so its measured boot is
  not the image it claims to run;
* :func:`go_silent`: a device that, once its check-in tells it to install something,
  never installs it and never checks in again (bricked by the update, or cut off): the
  server's ``silent-after-install`` signal fires after N poll intervals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from otaguard.model.errors import TransportError
from otaguard.model.telemetry import LastInstall, Telemetry

if TYPE_CHECKING:
    from otaguard.sim._http import AsyncConnection
    from otaguard.sim.fleetsim import FleetSim, SimDevice

__all__ = [
    "CRASH_BOOTS",
    "BootSession",
    "clone_device",
    "go_silent",
    "send_telemetry",
    "tamper_slot",
]

#: reboots per poll of a device running a crash-looping release
CRASH_BOOTS: Final = 3
TELEMETRY_PATH: Final = "/api/v1/device/telemetry"
_ANSWER_BYTES: Final = 4096
_JSON: Final = {"Content-Type": "application/json"}


@dataclass
class BootSession:
    """A simulated device's boot session and its counters."""

    boot_id: str = field(default_factory=lambda: secrets.token_hex(16))
    boot_count: int = 1
    seq: int = 0
    rollbacks: int = 0
    booted_at: float = field(default_factory=time.monotonic)

    def reboot(self, *, rollback: bool = False) -> None:
        """A new boot (two with a rollback: the new image, then the old one again)."""
        self.boot_id = secrets.token_hex(16)
        self.boot_count += 2 if rollback else 1
        self.rollbacks += 1 if rollback else 0
        self.seq = 0
        self.booted_at = time.monotonic()

    def crash(self) -> None:
        """:data:`CRASH_BOOTS` reboots since the last poll."""
        for _ in range(CRASH_BOOTS):
            self.reboot()


def report_of(dev: SimDevice) -> Telemetry:
    """The device's next report (its sequence raised)."""
    s = dev.session
    s.seq += 1
    result = dev.last_result
    outcome = result.get("outcome", "none")
    return Telemetry(
        serial=dev.serial,
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        boot_id=s.boot_id,
        seq=s.seq,
        uptime_s=int(time.monotonic() - s.booted_at),
        boot_count=s.boot_count,
        rollbacks=s.rollbacks,
        free_storage_bytes=64 << 20,
        agent_errors=0,
        running_version=dev.installed.version,
        last_install=LastInstall(
            result=outcome if outcome in ("updated", "rolled-back", "failed") else "none",
            version=result.get("version", ""),
            duration_s=1.0,
        ),
        attestation="none",
        refused_attacks=len(dev.attack_flags),
    )


async def send_telemetry(conn: AsyncConnection, dev: SimDevice) -> None:
    """POST the device's next report on ``conn`` (its mutual-TLS connection).

    Raises:
        TransportError: the server did not accept it (the reason in the message).
    """
    body = report_of(dev).to_bytes()
    status, data = await conn.request(
        "POST", TELEMETRY_PATH, body=body, headers=_JSON, max_body=_ANSWER_BYTES
    )
    if status != 200:
        try:
            reason = str(json.loads(data).get("error", ""))
        except (ValueError, AttributeError):
            reason = ""
        raise TransportError(f"telemetry refused ({status}): {reason[:200]}")


def clone_device(sim: FleetSim, serial: str) -> SimDevice:
    """Copy ``serial``'s credentials and state to a second device, powered on.

    The clone has the same key, certificate and slots; it boots its own session (the
    copied boot count plus one) and joins the fleet's rounds.
    """
    original = next(d for d in sim.devices if d.serial == serial)
    session = BootSession(boot_count=original.session.boot_count + 1)
    twin = dataclasses.replace(
        original,
        session=session,
        last_result=dict(original.last_result),
        rejected=set(original.rejected),
        attack_flags=set(original.attack_flags),
    )
    sim.devices.append(twin)
    return twin


def tamper_slot(sim: FleetSim, serial: str) -> str:
    """Rewrite ``serial``'s running slot (and its recorded digest, fooling the
    bootloader): its next measured boot is an image nobody published. Returns it."""
    dev = next(d for d in sim.devices if d.serial == serial)
    dev.boot_sha256 = hashlib.sha256(b"implant " + serial.encode()).hexdigest()
    dev.session.reboot()
    return dev.boot_sha256


def go_silent(sim: FleetSim, serial: str) -> SimDevice:
    """Make ``serial`` go silent as soon as a check-in tells it to install an image: it
    installs nothing and checks in no more. Returns the device."""
    dev = next(d for d in sim.devices if d.serial == serial)
    dev.goes_silent = True
    return dev
