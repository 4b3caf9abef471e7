"""``otaguard sim``: the fleet simulator (:mod:`otaguard.sim.fleetsim`) from the command line.

Thin: parsing, a live progress line and the summary table. The operator token comes
from ``--token-file`` or the environment, never from argv.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from rich.live import Live
from rich.table import Table

from otaguard.cli._cli import CA_ENV, SERVER_ENV, TOKEN_ENV, _operator_token, _RefuseSecret, out
from otaguard.model.errors import OperatorError

if TYPE_CHECKING:
    # the simulator drives a server: imported by the command, not when parsing (ADR 0029)
    from otaguard.sim.fleetsim import FleetSim, FleetStats, SimSettings

__all__ = ["add_sim_parser", "summary_table"]

#: trust anchors are a few KiB; a bigger file is not one (and is not read whole)
MAX_ROOT_FILE_BYTES = 1024 * 1024


def _read_anchor(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ROOT_FILE_BYTES + 1)
    except OSError as e:
        raise OperatorError(f"cannot read the {what} {path}: {e.strerror}") from e
    if len(data) > MAX_ROOT_FILE_BYTES:
        raise OperatorError(f"the {what} {path} is larger than {MAX_ROOT_FILE_BYTES} bytes")
    return data


def _line(s: FleetStats) -> str:
    errors = sum(s.errors.values())
    return (
        f"{s.checkins} check-ins in {s.elapsed:.1f} s, {s.rate:.0f}/s, "
        f"p50 {s.percentile(50) * 1000:.0f} ms, p99 {s.percentile(99) * 1000:.0f} ms, "
        f"{errors} errors; running " + ", ".join(f"{v}: {n}" for v, n in sorted(s.running.items()))
    )


def summary_table(s: FleetStats) -> Table:
    """The run's summary: devices, throughput, latency, results by version, errors."""
    t = Table(title="fleet simulation", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("devices", f"{s.enrolled} enrolled of {s.devices}")
    t.add_row("check-ins", f"{s.checkins} in {s.elapsed:.1f} s ({s.rate:.1f}/s)")
    t.add_row(
        "latency",
        f"p50 {s.percentile(50) * 1000:.1f} ms, p99 {s.percentile(99) * 1000:.1f} ms "
        "(TLS handshake, nonce, signed manifest, answer)",
    )
    for version in sorted(set(s.running) | set(s.installs) | set(s.failed_installs)):
        t.add_row(
            f"version {version}",
            f"{s.running.get(version, 0)} running, {s.installs.get(version, 0)} installed, "
            f"{s.failed_installs.get(version, 0)} failed (rolled back)",
        )
    if s.silent:
        t.add_row("silent", f"{s.silent} device(s) told to install went silent (scenario)")
    for kind, n in sorted(s.errors.items()):
        t.add_row(f"errors: {kind}", f"{n} (first: {s.error_examples.get(kind, '')})")
    return t


def _sim(a: argparse.Namespace) -> int:
    from otaguard.sim.fleetsim import FleetSim, SimSettings

    if not a.server:
        raise OperatorError(f"no server: pass --server URL or set {SERVER_ENV}")
    if a.ca is None:
        raise OperatorError(f"no server CA certificate: pass --ca FILE or set {CA_ENV}")
    token = _operator_token(a)
    cache = a.identity_cache or Path(tempfile.mkdtemp(prefix="otaguard-sim-"))
    try:
        settings = SimSettings(
            server_url=a.server,
            ca_cert=a.ca,
            trusted_root=_read_anchor(a.root, "trusted root"),
            director_root=_read_anchor(a.director_root, "director root"),
            hardware_id=a.hardware_id,
            devices=a.devices,
            identity_dir=cache,
            serial_prefix=a.serial_prefix,
            fail_rate=a.fail_rate,
            fail_release=a.fail_release,
            initial_version=a.initial_version,
            concurrency=a.concurrency,
            telemetry=a.telemetry or a.crash_release is not None,
            crash_release=a.crash_release,
        )
        if a.until_rollout is not None:
            return _drive(a, settings, token)
        with Live(out.render_str("enrolling…"), console=out, transient=True) as live:
            sim = FleetSim(settings, progress=lambda s: live.update(_line(s)))

            async def both() -> FleetStats:
                await sim.enroll(operator_token=token)
                _scenarios(a, sim)
                live.update(f"{sim.stats.enrolled} devices enrolled; checking in…")
                return await sim.run(cycles=a.cycles, duration=a.duration)

            stats = asyncio.run(both())
    finally:
        if a.identity_cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    out.print(summary_table(stats))
    return 0 if not stats.errors else 1


def _scenarios(a: argparse.Namespace, sim: FleetSim) -> None:
    """``--clone``, ``--tamper`` and ``--go-silent SERIAL`` (ADR 0026), after enrollment."""
    from otaguard.sim.scenarios import clone_device, go_silent, tamper_slot

    known = {d.serial for d in sim.devices}
    for serial in [*(a.clone or ()), *(a.tamper or ()), *(a.go_silent or ())]:
        if serial not in known:
            raise OperatorError(f"no simulated device {serial} (serials are PREFIX-00001 …)")
    for serial in a.clone or ():
        clone_device(sim, serial)
        out.print(f"{serial}: credentials cloned onto a second device", markup=False)
    for serial in a.tamper or ():
        tamper_slot(sim, serial)
        out.print(f"{serial}: running slot tampered with", markup=False)
    for serial in a.go_silent or ():
        go_silent(sim, serial)
        out.print(f"{serial}: goes silent once told to install", markup=False)


def _drive(a: argparse.Namespace, settings: SimSettings, token: str) -> int:
    """``--until-rollout NAME``: poll in rounds until the rollout completes or halts."""
    from otaguard.server.rollout_client import RolloutClient
    from otaguard.sim.fleetsim import FleetSim
    from otaguard.sim.rollout_driver import RoundReport, drive_rollout

    sim = FleetSim(settings)
    asyncio.run(sim.enroll(operator_token=token))
    _scenarios(a, sim)

    def show(r: RoundReport) -> None:
        s = r.status
        versions = ", ".join(f"{n} on {v}" for v, n in sorted(Counter(r.running.values()).items()))
        out.print(
            f"round {r.round}: {s.state}, phase {s.phase}/{len(s.phases)} ({s.percent}%: "
            f"{s.admitted} admitted, {s.succeeded} succeeded, {len(s.failed or ())} failed); "
            f"{versions}",
            markup=False,
        )

    with RolloutClient(server_url=a.server, ca_cert=a.ca, token=token) as client:
        reports = drive_rollout(sim, client, a.until_rollout, on_round=show)
    status = reports[-1].status
    if status.reason:
        out.print(f"rollout {status.name} {status.state}: {status.reason}", markup=False)
    out.print(summary_table(sim.stats))
    settled = status.state in ("completed", "halted", "cancelled", "paused")
    return 0 if settled and not sim.stats.errors else 1


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("a fraction between 0 and 1")
    return value


def add_sim_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``otaguard sim``."""
    p = sub.add_parser(
        "sim",
        help="simulate N devices (one process, real TLS and verification) against a server",
        allow_abbrev=False,
    )
    p.add_argument("--server", default=os.environ.get(SERVER_ENV), metavar="URL")
    env_ca = os.environ.get(CA_ENV)
    p.add_argument(
        "--ca",
        type=Path,
        default=Path(env_ca) if env_ca else None,
        help=f"CA certificate of the server (or ${CA_ENV})",
    )
    p.add_argument("--root", type=Path, required=True, help="the image repository's root.json")
    p.add_argument(
        "--director-root", type=Path, required=True, help="the director repository's root.json"
    )
    p.add_argument("--hardware-id", default="sim-hw", metavar="HW")
    p.add_argument("--devices", type=int, required=True, metavar="N")
    p.add_argument(
        "--fail-rate",
        type=_fraction,
        default=0.0,
        metavar="R",
        help="fraction of devices whose install of --fail-release fails its health check",
    )
    p.add_argument("--fail-release", metavar="VERSION")
    p.add_argument(
        "--initial-version",
        metavar="VERSION",
        help="what the devices run at start (default: the oldest release for HW)",
    )
    p.add_argument(
        "--telemetry",
        action="store_true",
        help="each device sends a telemetry report every cycle (ADR 0026)",
    )
    p.add_argument(
        "--crash-release",
        metavar="VERSION",
        help="devices running VERSION crash-loop (reboot over and over after a "
        "passing health check; implies --telemetry)",
    )
    p.add_argument(
        "--clone",
        action="append",
        metavar="SERIAL",
        help="copy SERIAL's credentials onto a second device (repeatable)",
    )
    p.add_argument("--tamper", action="append", metavar="SERIAL",
                   help="rewrite SERIAL's running slot (repeatable)")  # fmt: skip
    p.add_argument(
        "--go-silent",
        action="append",
        metavar="SERIAL",
        help="SERIAL stops checking in once told to install (repeatable): the server's "
        "silent-after-install signal",
    )
    p.add_argument("--serial-prefix", default="sim", metavar="PREFIX")
    p.add_argument(
        "--identity-cache",
        type=Path,
        metavar="DIR",
        help="keep the devices' keys and certificates here; a rerun skips enrollment "
        "(default: a temporary directory, removed afterwards)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="check-ins at once (default 32)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--cycles", type=int, metavar="K", help="check-ins per device")
    run.add_argument("--duration", type=float, metavar="S", help="run for S seconds")
    run.add_argument(
        "--until-rollout",
        metavar="NAME",
        help="poll in rounds (an install reported at once) until rollout NAME completes "
        "or halts, printing its status after each round",
    )
    p.add_argument("--token-file", type=Path, help=f"operator token file (or ${TOKEN_ENV})")
    p.add_argument("--token", nargs="?", action=_RefuseSecret, help=argparse.SUPPRESS)
    p.set_defaults(func=_sim_defaults)


def _sim_defaults(a: argparse.Namespace) -> int:
    if a.cycles is None and a.duration is None and a.until_rollout is None:
        a.cycles = 1
    if (a.cycles is not None and a.cycles < 1) or (a.duration is not None and a.duration <= 0):
        raise OperatorError("--cycles and --duration must be positive")
    if a.fail_rate and not a.fail_release:
        raise OperatorError("--fail-rate needs --fail-release VERSION")
    return _sim(a)
