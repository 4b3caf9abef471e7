"""Drive a staged rollout with the fleet simulator: rounds of polls until it settles.

A round is one poll of every simulated device, at most ``concurrency`` at a time. A device
that installed (or failed to) in its poll checks in again at once, as an agent reports
after rebooting into the new image: the server learns the outcome in the same round, so a
phase's successes can advance it, and its failures halt it, while the round goes on. The
server advances and halts by itself (ADR 0011); the driver only polls and reads the
rollout's status between rounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from otaguard.model.errors import OtaguardError
from otaguard.server.rollout_client import RolloutClient, RolloutInfo
from otaguard.sim.fleetsim import FleetSim, SimDevice

__all__ = ["MAX_ROLLOUT_ROUNDS", "RoundReport", "drive_rollout", "poll_round", "running"]

#: rounds before the driver gives up on a rollout settling: a 4-phase rollout needs about
#: one round per phase (each phase's admitted devices are spread over the whole round)
MAX_ROLLOUT_ROUNDS: Final = 12
#: rollout states after which further rounds change nothing for the rollout
SETTLED: Final = frozenset({"completed", "halted", "cancelled", "paused"})


@dataclass(frozen=True)
class RoundReport:
    """One round: the rollout's status after it, and what each device runs."""

    round: int
    status: RolloutInfo
    running: dict[str, str]


async def _poll(sim: FleetSim, dev: SimDevice, gate: asyncio.Semaphore) -> None:
    if dev.silent:
        return  # gone silent after being told to install (scenario): it polls no more
    async with gate:
        before = dict(dev.last_result)
        try:
            await sim.check_in(dev)
            if dev.last_result != before:  # installed or rolled back: report it at once
                await sim.check_in(dev)
        except OtaguardError as e:
            sim.stats.error(e)  # counted by kind; the fleet goes on


async def poll_round(sim: FleetSim) -> None:
    """Every device polls once (and reports an install at once); errors are counted in
    ``sim.stats``, never raised."""
    gate = asyncio.Semaphore(sim.settings.concurrency)
    await asyncio.gather(*(_poll(sim, d, gate) for d in sim.devices))


def running(sim: FleetSim) -> dict[str, str]:
    """What each simulated device runs now, by serial."""
    return {d.serial: d.installed.version for d in sim.devices}


def drive_rollout(
    sim: FleetSim,
    client: RolloutClient,
    name: str,
    *,
    max_rounds: int = MAX_ROLLOUT_ROUNDS,
    extra_rounds: int = 0,
    on_round: Callable[[RoundReport], None] | None = None,
) -> list[RoundReport]:
    """Poll in rounds until rollout ``name`` completes, halts or is cancelled (or
    ``max_rounds`` pass), then ``extra_rounds`` more (to watch the settled state hold).

    Returns:
        One report per round.

    Raises:
        OtaguardError: the rollout cannot be read (the devices' errors are only counted).
    """
    reports: list[RoundReport] = []
    left = extra_rounds
    for k in range(1, max_rounds + extra_rounds + 1):
        asyncio.run(poll_round(sim))
        report = RoundReport(k, client.rollout(name), running(sim))
        reports.append(report)
        if on_round is not None:
            on_round(report)
        if report.status.state in SETTLED or k >= max_rounds:
            if left == 0:
                break
            left -= 1
    return reports
