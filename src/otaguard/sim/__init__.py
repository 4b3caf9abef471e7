"""Fleet simulator and attack scenarios used by the demo, tests and benchmarks."""

from otaguard.sim.attacks import AttackOutcome, CompromisedServer
from otaguard.sim.fleet import Fleet, make_image, wait_served

__all__ = ["AttackOutcome", "CompromisedServer", "Fleet", "make_image", "wait_served"]
