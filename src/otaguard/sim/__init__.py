"""Fleet simulator and attack scenarios used by the demo, tests and benchmarks."""

from otaguard.sim.attacks import AttackOutcome, CompromisedServer
from otaguard.sim.fleet import SIM_HEALTH_COMMAND, Fleet, make_image, wait_served

__all__ = [
    "SIM_HEALTH_COMMAND",
    "AttackOutcome",
    "CompromisedServer",
    "Fleet",
    "make_image",
    "wait_served",
]
