"""The demo's staged rollouts: a 4-phase rollout to completion, then one that halts itself.

A small fleet of its own (hardware id ``sensor-v1``, so the attacks on the gateways are
untouched) in a static group; devices poll in rounds; the server advances phases and
halts on failures by itself (ADR 0011); the operator only creates the rollouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rich.console import Console

from otaguard.agent import Device
from otaguard.model.errors import OtaguardError
from otaguard.repo import ImageRepository
from otaguard.server import RunningServer
from otaguard.server.client import FleetClient
from otaguard.server.rollout_client import RolloutClient, RolloutInfo
from otaguard.sim.ceremony import ceremony_release
from otaguard.sim.fleet import SIM_HEALTH_COMMAND, make_image, wait_served
from otaguard.sim.sbom import make_sbom

__all__ = ["SENSOR_HARDWARE_ID", "RolloutDemo", "staged_rollouts"]

SENSOR_HARDWARE_ID: Final = "sensor-v1"
SENSORS: Final = 8
#: small images: the rollouts are about phases, not throughput
SENSOR_IMAGE_SIZE: Final = 256 * 1024
#: polling rounds before the demo gives up on a rollout (4 phases need about 8)
MAX_ROUNDS: Final = 12


@dataclass(frozen=True)
class RolloutDemo:
    """What the two rollouts showed."""

    completed: bool
    completed_detail: str
    halted: bool
    halted_detail: str


def _sbom(work: Path, version: str) -> Path:
    return make_sbom(work / f"sensor-{version}.cdx.json", name="sensor", version=version)


def _provision(
    work: Path, server: RunningServer, repo: ImageRepository, director_root: Path, image: Path
) -> list[Device]:
    assert server.ca_cert is not None  # noqa: S101 - the demo's server is HTTPS
    devs = []
    with FleetClient(
        server_url=server.base_url, ca_cert=server.ca_cert, token=server.operator_token
    ) as fleet:
        for i in range(1, SENSORS + 1):
            name = f"sensor-{i:02d}"
            dev = Device.provision(
                work / name,
                server_url=server.base_url,
                root_json=repo.metadata_dir / "root.json",
                ca_pem=server.ca_cert,
                hardware_id=SENSOR_HARDWARE_ID,
                serial=name,
                factory_image=image,
                factory_version="1.0.0",
                health_command=SIM_HEALTH_COMMAND,
                director_root=director_root,
            )
            dev.enroll(fleet.add_device(name, SENSOR_HARDWARE_ID).token, key_store=dev.key_store)
            devs.append(dev)
    return devs


def _running(dev: Device) -> str:
    booted = dev.status().booted
    return booted.version if booted is not None else "?"


def _rounds(console: Console, client: RolloutClient, name: str, devs: list[Device]) -> RolloutInfo:
    status = client.rollout(name)
    for k in range(1, MAX_ROUNDS + 1):
        for dev in devs:
            try:
                dev.update()
            except OtaguardError as e:
                console.print(f"  {dev.config.serial}: {e.diagnostics()}")
        status = client.rollout(name)
        versions = [_running(d) for d in devs]
        console.print(
            f"  round {k}: {status.state}, phase {status.phase}/{len(status.phases)} "
            f"({status.percent}%: {status.admitted} admitted, {status.succeeded} succeeded, "
            f"{len(status.failed or ())} failed); running: "
            + ", ".join(f"{versions.count(v)} on {v}" for v in sorted(set(versions)))
        )
        if status.state in ("completed", "halted"):
            break
    return status


def staged_rollouts(
    console: Console,
    work: Path,
    *,
    server: RunningServer,
    repo: ImageRepository,
    director_root: Path,
    passphrase: Callable[[str], bytes],
) -> RolloutDemo:
    """Provision the sensors, roll 2.0.0 out in 4 phases, then roll out a 2.1.0 that
    fails its health check and watch the rollout halt itself. Every sensor release goes
    through the signing ceremony with its SBOM, like the gateways'."""
    work.mkdir(parents=True, exist_ok=True)

    def release(version: str) -> None:
        ceremony_release(
            repo, images[version], version=version, hardware_id=SENSOR_HARDWARE_ID,
            security=False, passphrase=passphrase, request=work / f"{version}.request.json",
            sbom=_sbom(work, version),
        )  # fmt: skip

    images = {
        v: make_image(
            work / f"sensor-{v}.img",
            size=SENSOR_IMAGE_SIZE,
            seed=f"sensor-{v}",
            unhealthy=v == "2.1.0",
        )
        for v in ("1.0.0", "2.0.0", "2.1.0")
    }
    # the factory image is a release too: a device booting an unlisted image is quarantined
    release("1.0.0")
    wait_served(server, repo)
    devs = _provision(work, server, repo, director_root, images["1.0.0"])
    serials = [d.config.serial for d in devs]
    console.print(f"{len(devs)} sensors at 1.0.0 in static group 'sensors'")
    assert server.ca_cert is not None  # noqa: S101
    with RolloutClient(
        server_url=server.base_url, ca_cert=server.ca_cert, token=server.operator_token
    ) as client:
        client.create_group("sensors", where=None)
        client.change_members("sensors", add=serials)
        release("2.0.0")
        wait_served(server, repo)
        console.print(
            "feature release 2.0.0: rollout create --phases 10,25,50,100 "
            "--success-threshold 95 --failure-threshold 5"
        )
        client.create_rollout(
            release="2.0.0",
            group="sensors",
            phases=[10, 25, 50, 100],
            success_threshold=95,
            failure_threshold=5,
            name="sensors-2.0.0",
        )
        first = _rounds(console, client, "sensors-2.0.0", devs)
        on_200 = sum(_running(d) == "2.0.0" for d in devs)
        completed = first.state == "completed" and on_200 == len(devs)

        release("2.1.0")
        wait_served(server, repo)
        console.print(
            "feature release 2.1.0 (fails its health check): rollout create "
            "--phases 10,50,100 --failure-threshold 5"
        )
        client.create_rollout(
            release="2.1.0",
            group="sensors",
            phases=[10, 50, 100],
            success_threshold=95,
            failure_threshold=5,
            name="sensors-2.1.0",
        )
        second = _rounds(console, client, "sensors-2.1.0", devs)
    untouched = sum(_running(d) == "2.0.0" for d in devs)
    console.print(f"  rollout status: {second.state}: {second.reason}")
    halted = second.state == "halted" and second.phase == 1 and untouched == len(devs)
    return RolloutDemo(
        completed=completed,
        completed_detail=f"{on_200}/{len(devs)} on 2.0.0 through phases "
        + ",".join(map(str, first.phases)),
        halted=halted,
        halted_detail=f"halted in phase {second.phase}; {untouched}/{len(devs)} still on 2.0.0 "
        f"(the failed one rolled back)",
    )
