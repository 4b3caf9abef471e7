"""Anti-rollback floor: the lowest version and security counter the device may run.

The interface is what a TPM NV counter offers (read, raise, never lower). This module
holds the development backend, a fsynced file; the TPM backend plugs in behind
:class:`MonotonicStore`.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from pathlib import Path

from otaguard._fs import atomic_write_json
from otaguard.model.errors import ConfigError, DowngradeError
from otaguard.model.version import Version

__all__ = ["FileMonotonicStore", "Floor", "MonotonicStore"]


@dataclass(frozen=True)
class Floor:
    """The anti-rollback floor."""

    version: Version
    security_counter: int

    def check(self, version: Version, security_counter: int) -> None:
        """Raise :class:`DowngradeError` if the candidate is below the floor."""
        if version < self.version:
            raise DowngradeError(f"version {version} is below the installed {self.version}")
        if security_counter < self.security_counter:
            raise DowngradeError(
                f"security counter {security_counter} is below the installed "
                f"{self.security_counter}"
            )


class MonotonicStore(abc.ABC):
    """Storage that can only move forward."""

    @abc.abstractmethod
    def read(self) -> Floor:
        """Return the current floor."""

    @abc.abstractmethod
    def _write(self, floor: Floor) -> None:
        """Persist ``floor`` durably."""

    def raise_to(self, version: Version, security_counter: int) -> None:
        """Move the floor up to ``version``/``security_counter``; never down.

        Raises:
            DowngradeError: either value is below the current floor.
        """
        current = self.read()
        current.check(version, security_counter)
        if (version, security_counter) != (current.version, current.security_counter):
            self._write(Floor(version, security_counter))


class FileMonotonicStore(MonotonicStore):
    """Development backend: a JSON file written atomically with fsync."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, path: Path, floor: Floor) -> FileMonotonicStore:
        """Create the store at provisioning time."""
        store = cls(path)
        store._write(floor)
        return store

    def read(self) -> Floor:
        """Return the current floor.

        Raises:
            ConfigError: the store is missing or corrupt; the device must not guess.
        """
        try:
            raw = json.loads(self.path.read_bytes())
            return Floor(Version.parse(raw["version"]), int(raw["security_counter"]))
        except FileNotFoundError as e:
            raise ConfigError(f"anti-rollback store {self.path} is missing") from e
        except OSError as e:
            raise ConfigError(f"cannot read anti-rollback store {self.path}: {e.strerror}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"anti-rollback store {self.path} is corrupt") from e

    def _write(self, floor: Floor) -> None:
        atomic_write_json(
            self.path,
            {"version": str(floor.version), "security_counter": floor.security_counter},
        )
