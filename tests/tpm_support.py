"""A private software TPM (swtpm) for tests: free loopback ports, restartable, always reaped.

``swtpm socket --tpm2`` serves TPM commands on port P and its control channel on P+1;
``--flags not-need-init,startup-clear`` makes it ready without a TPM2_Startup from us.
Its NV state lives in the state directory, so stopping it and starting it again on the
same directory is a TPM power cycle: what was written to NV must still be there.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest

__all__ = ["Swtpm", "require_tpm_tools", "running_swtpm"]

HOST: Final = "127.0.0.1"
#: swtpm is up in a few milliseconds; a loaded CI machine gets far more.
START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 5.0
#: a port pair can be taken between choosing and binding it: try a few pairs
START_ATTEMPTS: Final = 5
#: swtpm control channel: CMD_GET_CAPABILITY (4-byte command, 4-byte result + 4 bytes)
_CMD_GET_CAPABILITY: Final = 1


def require_tpm_tools() -> None:
    """Skip (outside CI) or fail (in CI) when swtpm or tpm2-pytss is missing.

    CI (``CI=true``) must run what it claims to run: a missing tool fails there.
    """
    missing = []
    if shutil.which("swtpm") is None:
        missing.append("swtpm (apt-get install swtpm swtpm-tools, or make sysdeps)")
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        missing.append("tpm2-pytss (pip install -e '.[tpm]', needs libtss2-dev)")
    if not missing:
        return
    reason = "TPM tests need " + " and ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port_pair() -> int:
    """A port P with P and P+1 free on the loopback interface, just now."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + 1))
            except OSError:
                continue
        return port


class Swtpm:
    """One swtpm process on a state directory; :meth:`stop` then :meth:`start` = power cycle."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = state_dir.parent / f"{state_dir.name}.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        #: seconds the last start took until the control channel answered
        self.last_start_s = 0.0

    @property
    def tcti(self) -> str:
        """The TCTI string tpm2-pytss uses to reach this TPM."""
        assert self.port is not None, "swtpm was never started"
        return f"swtpm:host={HOST},port={self.port}"

    def start(self) -> None:
        """Start swtpm (on the same ports as before, if it ran before) and wait for it."""
        assert self.proc is None, "swtpm is already running"
        if self.port is not None:
            # A restart keeps the ports: a device's config names the TCTI.
            self._start_on(self.port)
            return
        for _ in range(START_ATTEMPTS):
            port = _free_port_pair()
            try:
                self._start_on(port)
            except _PortTakenError:
                continue
            return
        raise RuntimeError(f"swtpm did not start after {START_ATTEMPTS} port pairs ({self.log})")

    def _start_on(self, port: int) -> None:
        started = time.monotonic()
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--server",
                    f"type=tcp,port={port},bindaddr={HOST}",
                    "--ctrl",
                    f"type=tcp,port={port + 1},bindaddr={HOST}",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--flags",
                    "not-need-init,startup-clear",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = started + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                # Typically "Address already in use": another process took a port.
                raise _PortTakenError(f"swtpm exited with {proc.returncode}")
            if self._answers(port):
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"swtpm did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.01)
        self.proc, self.port = proc, port
        self.last_start_s = time.monotonic() - started

    @staticmethod
    def _answers(port: int) -> bool:
        """True when swtpm's control channel answers CMD_GET_CAPABILITY."""
        try:
            with socket.create_connection((HOST, port + 1), timeout=1.0) as s:
                s.sendall(struct.pack(">I", _CMD_GET_CAPABILITY))
                return len(s.recv(8)) >= 4
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL); the state directory stays."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """A TPM power cycle: stop, then start on the same state directory and ports."""
        self.stop()
        self.start()


class _PortTakenError(RuntimeError):
    """swtpm exited at start, most likely because its ports were taken meanwhile."""


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
