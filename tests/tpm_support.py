"""Software TPMs for tests: swtpm (and tpm2-abrmd in front of it), always reaped.

The launchers live in :mod:`otaguard.sim.softtpm` (the demo uses them too); this adds
pytest's side: CI (``CI=true``) must run what it claims to run, so a missing tool fails
there and skips elsewhere.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from otaguard.sim.softtpm import SessionBus, Swtpm, TpmBroker, softtpm_missing

__all__ = [
    "SessionBus",
    "Swtpm",
    "TpmBroker",
    "require_tpm_broker_tools",
    "require_tpm_tools",
    "running_swtpm",
]


def _missing_or_fail(missing: list[str]) -> None:
    if not missing:
        return
    reason = "TPM tests need " + " and ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_tpm_tools() -> None:
    """Skip (outside CI) or fail (in CI) when swtpm or tpm2-pytss is missing."""
    missing = []
    if shutil.which("swtpm") is None:
        missing.append("swtpm (apt-get install swtpm swtpm-tools, or make sysdeps)")
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        missing.append("tpm2-pytss (pip install -e '.[tpm]', needs libtss2-dev)")
    _missing_or_fail(missing)


def require_tpm_broker_tools() -> None:
    """As :func:`require_tpm_tools`, plus tpm2-abrmd, D-Bus and the tpm2 OpenSSL provider."""
    require_tpm_tools()
    _missing_or_fail(softtpm_missing())


@contextmanager
def running_swtpm(state_dir: Path) -> Iterator[Swtpm]:
    """A started :class:`Swtpm`, stopped whatever happens."""
    require_tpm_tools()
    tpm = Swtpm(state_dir)
    try:
        tpm.start()
        yield tpm
    finally:
        tpm.stop()
