"""What every attack test checks afterwards, and the device they start from."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import World
from otaguard.agent import Device, Phase
from otaguard.sim.attacks import CompromisedServer

__all__ = ["assert_untouched", "updated"]


def assert_untouched(dev: Device, version: str = "1.1.0") -> None:
    """``dev`` still runs a verified ``version`` from its primary slot, nothing in progress."""
    st = dev.status()
    assert st.booted is not None and st.booted.version == version
    assert st.bootenv.try_slot is None
    primary = st.bootenv.slots[st.bootenv.primary]
    assert primary is not None and primary.version == version
    assert dev.backend.digest(st.bootenv.primary, primary.length) == primary.sha256
    assert str(st.floor.version) == version
    assert st.install.phase is Phase.IDLE


@pytest.fixture
def updated(world: World) -> Iterator[tuple[World, Device, CompromisedServer]]:
    """A device updated to 1.1.0 (security, counter 1) and an attacker holding the server."""
    dev = world.device()
    world.release("1.1.0", security=True)
    assert dev.update().outcome == "updated"
    attacker = CompromisedServer(world.server.data_dir)
    yield world, dev, attacker
    attacker.close()
