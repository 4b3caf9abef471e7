"""A task the server runs every few seconds in a daemon thread (repository sync, re-signing)."""

from __future__ import annotations

import abc
import threading
from typing import Final

__all__ = ["PeriodicTask"]

# Joining the thread on shutdown must not hang the server's exit.
STOP_TIMEOUT_SECONDS: Final = 10.0


class PeriodicTask(abc.ABC):
    """Runs :meth:`_tick` once at :meth:`start`, then every ``interval`` seconds."""

    def __init__(self, *, interval: float, name: str):
        if not interval > 0:
            raise ValueError(f"{name} interval must be positive")
        self.interval = interval
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def _tick(self) -> None:
        """One round; must not raise (it runs at a thread boundary)."""

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def start(self) -> None:
        """Run one round now, then one every :attr:`interval` seconds until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        self._tick()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread to finish (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            self._thread = None
