"""The director end to end: real server, real mutual TLS, devices with a director root.

Uptane full verification on the device: it installs only what the director instructs at
its check-in *and* the image repository lists identically; a compromised director (its
real online key, used by an attacker who took the server) cannot make it install
anything else, and the device reports the attempt at its next check-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import World, start_world


@pytest.fixture
def dworld(tmp_path: Path) -> Iterator[World]:
    """A world whose server runs a director; 1.0.0 published."""
    w = start_world(tmp_path, director=True)
    try:
        w.release("1.0.0")
        yield w
    finally:
        w.server.stop()


def test_update_driven_by_the_director(dworld: World) -> None:
    dev = dworld.device("d1")
    dworld.release("1.1.0")
    result = dev.update()
    assert result.outcome == "updated", result
    assert result.to_version == "1.1.0"
