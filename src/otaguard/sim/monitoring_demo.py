"""The demo's fleet monitoring (ADR 0026): alerts that fire by themselves.

A simulated fleet of its own (hardware id ``meter-v1``, :mod:`otaguard.sim.fleetsim`:
real mutual TLS, signed manifests and director verification, in this process) reports
telemetry with every poll. On the demo's server:

1. a feature release 2.0.0 whose devices crash-loop once they run it (their health check
   passes: only telemetry shows the reboots) goes out in a 3-phase rollout; before the
   rollout admits the next phase, the monitor compares the release's cohort with the
   devices on other releases and pauses it (``cohort-anomaly``): no operator involved,
   and unlike the sensors' halt in step 5b no device reported a failure;
2. one meter's credentials are cloned onto a second device (``cloned-credentials``) and
   another meter's running slot is tampered with (``unpublished-image``): each device is
   quarantined by the alert's policy.

Each alert is printed with its signal, observed value, threshold and action, read back
through the operator API (what ``otaguard alerts list`` shows).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rich.console import Console

from otaguard.model.errors import OtaguardError
from otaguard.repo import ImageRepository
from otaguard.server import RunningServer
from otaguard.server.alert_client import AlertClient, AlertInfo
from otaguard.server.client import FleetClient
from otaguard.server.rollout_client import RolloutClient, RolloutInfo
from otaguard.sim.ceremony import ceremony_release
from otaguard.sim.fleet import make_image, wait_served
from otaguard.sim.fleetsim import FleetSim, SimDevice, SimSettings
from otaguard.sim.rollout_driver import poll_round, running
from otaguard.sim.sbom import make_sbom
from otaguard.sim.scenarios import clone_device, tamper_slot

__all__ = ["METER_HARDWARE_ID", "MonitoringDemo", "monitoring_demo", "print_alerts", "summary_rows"]

METER_HARDWARE_ID: Final = "meter-v1"
#: enough for the cohort signal (at least 5 devices on the new release in the first
#: phase, 5 on others as the baseline), few enough to stay a few seconds of the demo
METERS: Final = 24
PHASES: Final = (25, 50, 100)
CRASHING: Final = "2.0.0"
#: polling rounds before the demo gives up on the rollout pausing (one suffices)
MAX_ROUNDS: Final = 6
METER_IMAGE_SIZE: Final = 64 * 1024


@dataclass
class MonitoringDemo:
    """What the monitoring step showed; each check is its own line in the summary."""

    paused: bool = False
    paused_detail: str = ""
    cloned: bool = False
    cloned_detail: str = ""
    tampered: bool = False
    tampered_detail: str = ""
    alerts: list[AlertInfo] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """All three alerts fired and acted."""
        return self.paused and self.cloned and self.tampered

    @property
    def pass_line(self) -> str:
        """This step's part of the demo's final PASS/FAIL line."""
        return (
            f"crash-looping rollout {'paused by its alert' if self.paused else 'NOT PAUSED'}, "
            f"{self.cloned + self.tampered}/2 monitoring quarantines (cloned credential, "
            "tampered slot)"
        )


def summary_rows(demo: MonitoringDemo) -> list[tuple[str, str, str]]:
    """The demo summary's rows for this step: (check, result, detail)."""

    def mark(ok: bool, good: str) -> str:
        return f"[green]{good}[/green]" if ok else "[red]FAIL[/red]"

    return [
        ("crash-looping release (monitor)", mark(demo.paused, "paused"), demo.paused_detail),
        ("cloned credential (monitor)", mark(demo.cloned, "quarantined"), demo.cloned_detail),
        ("tampered slot (monitor)", mark(demo.tampered, "quarantined"), demo.tampered_detail),
    ]


def print_alerts(console: Console, alerts: list[AlertInfo]) -> None:
    """Alerts as an operator sees them: signal and subject, observed value, threshold,
    action and its outcome (one field a line: readable at any terminal width)."""
    for a in alerts:
        console.print(f"  [bold red]ALERT[/bold red] {a.signal} {a.subject}", highlight=False)
        for label, value in (
            ("observed", a.observed),
            ("threshold", a.threshold),
            ("action", f"{a.action} → {a.outcome}"),
        ):
            console.print(f"        {label:<9}  {value}", markup=False, highlight=False)


def _release(
    repo: ImageRepository, work: Path, version: str, passphrase: Callable[[str], bytes]
) -> None:
    image = make_image(work / f"meter-{version}.img", size=METER_IMAGE_SIZE,
                       seed=f"meter-{version}")  # fmt: skip
    ceremony_release(
        repo, image, version=version, hardware_id=METER_HARDWARE_ID, security=False,
        passphrase=passphrase, request=work / f"meter-{version}.request.json",
        sbom=make_sbom(work / f"meter-{version}.cdx.json", name="meter", version=version),
    )  # fmt: skip


async def _poll_some(sim: FleetSim, devices: list[SimDevice]) -> None:
    """One poll of each of ``devices``, one after the other; errors are only counted (a
    quarantined device's refusal is the point)."""
    for dev in devices:
        try:
            await sim.check_in(dev)
        except OtaguardError as e:
            sim.stats.error(e)


def _crash_loop(
    console: Console, sim: FleetSim, client: RolloutClient, name: str
) -> tuple[RolloutInfo, int]:
    """Poll round by round until the rollout settles; (its status, rounds)."""
    status = client.rollout(name)
    for k in range(1, MAX_ROUNDS + 1):
        asyncio.run(poll_round(sim))
        status = client.rollout(name)  # reading the status evaluates it (as the CLI does)
        on = sum(v == CRASHING for v in running(sim).values())
        console.print(
            f"  round {k}: {status.state}, phase {status.phase}/{len(status.phases)} "
            f"({status.percent}%: {status.admitted} admitted, {status.succeeded} reported "
            f"the install a success); {on} meters run {CRASHING} and reboot over and over",
            markup=False,
        )
        if status.state != "active":
            return status, k
    return status, MAX_ROUNDS


def monitoring_demo(
    console: Console,
    work: Path,
    *,
    server: RunningServer,
    repo: ImageRepository,
    director_root: Path,
    passphrase: Callable[[str], bytes],
) -> MonitoringDemo:
    """Run the monitoring scenarios on the demo's server (see the module docstring)."""
    assert server.ca_cert is not None  # noqa: S101 - the demo's server is HTTPS
    work.mkdir(parents=True, exist_ok=True)
    result = MonitoringDemo()
    _release(repo, work, "1.0.0", passphrase)
    wait_served(server, repo)
    sim = FleetSim(
        SimSettings(
            server_url=server.base_url,
            ca_cert=server.ca_cert,
            trusted_root=(repo.metadata_dir / "root.json").read_bytes(),
            director_root=director_root.read_bytes(),
            hardware_id=METER_HARDWARE_ID,
            devices=METERS,
            identity_dir=work / "identities",
            serial_prefix="meter",
            telemetry=True,
            crash_release=CRASHING,
        )
    )
    asyncio.run(sim.enroll(operator_token=server.operator_token))
    serials = [d.serial for d in sim.devices]
    console.print(
        f"{len(serials)} simulated meters (fleet simulator: mutual TLS, signed manifests, "
        "director verification) at 1.0.0 in static group 'meters', telemetry with each poll"
    )
    asyncio.run(poll_round(sim))  # every meter's first report: the baseline's start
    ca, token = server.ca_cert, server.operator_token
    with (
        RolloutClient(server_url=server.base_url, ca_cert=ca, token=token) as client,
        AlertClient(server_url=server.base_url, ca_cert=ca, token=token) as alerts,
        FleetClient(server_url=server.base_url, ca_cert=ca, token=token) as fleet,
    ):
        client.create_group("meters", where=None)
        client.change_members("meters", add=serials)
        _release(repo, work, CRASHING, passphrase)
        wait_served(server, repo)
        console.print(
            f"feature release {CRASHING} (passes its health check, then crash-loops): rollout "
            f"create --phases {','.join(map(str, PHASES))}; nobody watches it"
        )
        name = f"meters-{CRASHING}"
        client.create_rollout(release=CRASHING, group="meters", phases=list(PHASES),
                              success_threshold=95, failure_threshold=5, name=name)  # fmt: skip
        status, rounds = _crash_loop(console, sim, client, name)
        on_bad = {s for s, v in running(sim).items() if v == CRASHING}
        result.paused = (
            status.state == "paused"
            and status.phase == 1
            and "cohort-anomaly" in status.reason
            and 0 < len(on_bad) == status.admitted
        )
        result.paused_detail = (
            f"{status.state} in phase {status.phase} after {rounds} round(s): "
            f"{len(on_bad)}/{len(serials)} meters got {CRASHING}"
        )
        console.print(f"  rollout status: {status.state}: {status.reason}", markup=False)

        healthy = [s for s in serials if s not in on_bad]
        victim, tampered = healthy[0], healthy[1]
        clone_device(sim, victim)
        tamper_slot(sim, tampered)
        console.print(
            f"{victim}'s key and certificate copied onto a second device (it boots its own "
            f"session); {tampered}'s running slot rewritten with an image nobody published"
        )
        asyncio.run(poll_round(sim))  # the tampered slot's measured boot; the clone boots
        # The original and its clone report again: their sessions interleave.
        asyncio.run(_poll_some(sim, [d for d in sim.devices if d.serial == victim]))
        result.alerts = [
            a
            for a in alerts.alerts(limit=1000)
            if a.subject.startswith(("device:meter-", f"cohort:{METER_HARDWARE_ID}@"))
        ]
        by_signal = {a.signal: a for a in result.alerts}
        for signal, serial, attr in (
            ("cloned-credentials", victim, "cloned"),
            ("unpublished-image", tampered, "tampered"),
        ):
            alert = by_signal.get(signal)
            quarantined = fleet.show(serial).status == "quarantined"
            ok = (
                alert is not None
                and alert.subject == f"device:{serial}"
                and alert.action == "quarantine"
                and quarantined
            )
            setattr(result, attr, ok)
            setattr(result, f"{attr}_detail",
                    f"{serial} {'quarantined' if quarantined else 'NOT quarantined'}, alert "
                    f"{signal if alert is not None else 'MISSING'}")  # fmt: skip
        cohort = by_signal.get("cohort-anomaly")
        result.paused = result.paused and cohort is not None and cohort.outcome == f"paused {name}"
    console.print("alerts raised (what otaguard alerts list shows):")
    print_alerts(console, sorted(result.alerts, key=lambda a: a.id))
    return result
