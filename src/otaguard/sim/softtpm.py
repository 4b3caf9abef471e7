"""Software TPMs for tests and the demo: swtpm, and tpm2-abrmd on a private D-Bus bus.

``swtpm socket --tpm2`` serves TPM commands on port P and its control channel on P+1;
``--flags not-need-init,startup-clear`` makes it ready without a TPM2_Startup from us.
Its NV state lives in the state directory, so stopping it and starting it again on the
same directory is a TPM power cycle: what was written to NV must still be there.

A raw swtpm connection serves one client at a time, and the tpm2 OpenSSL provider keeps
its connection open for the life of the process; tpm2-pytss (NV counters, signing) needs
one too. :class:`TpmBroker` puts tpm2-abrmd, the TPM access broker and resource manager,
in front of a swtpm, on a private D-Bus session bus (:class:`SessionBus`) that it starts;
clients then use the TCTI ``tabrmd:bus_name=...,bus_type=session`` with
``DBUS_SESSION_BUS_ADDRESS`` naming that bus. As root, abrmd needs ``--allow-root``.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import IO, Final

__all__ = [
    "SessionBus",
    "SoftTpmPool",
    "Swtpm",
    "TpmBroker",
    "softtpm_missing",
]

HOST: Final = "127.0.0.1"
#: swtpm is up in a few milliseconds; a loaded CI machine gets far more.
START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 5.0
#: a port pair can be taken between choosing and binding it: try a few pairs
START_ATTEMPTS: Final = 5
#: swtpm control channel: CMD_GET_CAPABILITY (4-byte command, 4-byte result + 4 bytes)
_CMD_GET_CAPABILITY: Final = 1


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


def softtpm_missing() -> list[str]:
    """What is missing to run a software TPM behind a broker (Debian packages), if anything."""
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        return ["tpm2-pytss (pip install 'otaguard[tpm]')"]
    missing = [
        f"{cmd} ({pkg})"
        for cmd, pkg in (
            ("swtpm", "swtpm"),
            ("tpm2-abrmd", "tpm2-abrmd"),
            ("dbus-daemon", "dbus-daemon"),
            ("dbus-send", "dbus-bin"),
        )
        if shutil.which(cmd) is None and not Path("/usr/sbin", cmd).exists()
    ]
    if not Path("/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so").exists() and not any(
        Path(p).glob("ossl-modules/tpm2.so") for p in ("/usr/lib", "/usr/lib64")
    ):
        missing.append("the tpm2 OpenSSL provider (tpm2-openssl)")
    if not any(Path(p).glob("libtss2-tcti-tabrmd.so*") for p in _LIB_DIRS):
        missing.append("the tabrmd TCTI (libtss2-tcti-tabrmd0)")
    return missing


_LIB_DIRS: Final = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")


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
        if self.port is None:
            raise RuntimeError("swtpm was never started")
        return f"swtpm:host={HOST},port={self.port}"

    def start(self) -> None:
        """Start swtpm (on the same ports as before, if it ran before) and wait for it."""
        if self.proc is not None:
            raise RuntimeError("swtpm is already running")
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
                    _sbin("swtpm"),
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


#: D-Bus and abrmd start in well under a second; a loaded CI machine gets far more
BROKER_START_TIMEOUT_S: Final = 20.0
#: the environment variable a D-Bus client finds its session bus by
BUS_ENV: Final = "DBUS_SESSION_BUS_ADDRESS"


def _sbin(name: str) -> str:
    """``name`` on PATH, or in /usr/sbin (tpm2-abrmd lives there; not on a user's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed")
    return found


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SessionBus:
    """A private D-Bus session bus (``dbus-daemon --session --nofork``), for brokers."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> None:
        """Start the bus; :attr:`address` is what ``DBUS_SESSION_BUS_ADDRESS`` must say."""
        proc = subprocess.Popen(
            [_sbin("dbus-daemon"), "--session", "--nofork", "--nopidfile", "--print-address=1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        if proc.stdout is None:
            raise RuntimeError("dbus-daemon has no stdout")
        line = proc.stdout.readline().decode().strip()
        proc.stdout.close()
        if not line:
            _stop(proc)
            raise RuntimeError("dbus-daemon did not print its address")
        self.proc, self.address = proc, line

    def stop(self) -> None:
        """Stop the bus (brokers on it first)."""
        proc, self.proc = self.proc, None
        _stop(proc)


class TpmBroker:
    """tpm2-abrmd in front of one swtpm, on a :class:`SessionBus`.

    Clients (tpm2-pytss, the tpm2 OpenSSL provider) use :attr:`tcti` and need
    ``DBUS_SESSION_BUS_ADDRESS`` set to the bus's address in their environment.
    """

    def __init__(self, tpm: Swtpm, bus: SessionBus, log: Path) -> None:
        self.tpm, self.bus, self.log = tpm, bus, log
        if tpm.port is None:
            raise RuntimeError("start the swtpm first")
        #: a D-Bus well-known name is unique per bus; elements must not start with a digit
        self.bus_name = f"com.otaguard.swtpm.p{tpm.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        """The TCTI through the broker (set ``DBUS_SESSION_BUS_ADDRESS`` to the bus too)."""
        return f"tabrmd:bus_name={self.bus_name},bus_type=session"

    def start(self) -> None:
        """Start abrmd and wait until it owns its bus name and answers."""
        cmd = [
            _sbin("tpm2-abrmd"),
            "--session",
            f"--dbus-name={self.bus_name}",
            f"--tcti={self.tpm.tcti}",
            "--flush-all",
        ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        env = dict(os.environ, **{BUS_ENV: self.bus.address})
        log: IO[bytes]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not self._owns_name(env):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tpm2-abrmd exited with {self.proc.returncode} ({self.log})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tpm2-abrmd did not come up ({self.log})")
            time.sleep(0.05)

    def _owns_name(self, env: dict[str, str]) -> bool:
        done = subprocess.run(
            [
                _sbin("dbus-send"),
                "--session",
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                f"string:{self.bus_name}",
            ],
            env=env,
            capture_output=True,
            check=False,
        )
        return b"boolean true" in done.stdout

    def stop(self) -> None:
        """Stop abrmd (the swtpm keeps running)."""
        proc, self.proc = self.proc, None
        _stop(proc)


class SoftTpmPool:
    """``count`` software TPMs, each behind its own abrmd, on one private bus (demo).

    Each device gets a TPM of its own: the NV counter indices are the same on every
    device, so devices sharing a TPM would share their anti-rollback floor.
    ``DBUS_SESSION_BUS_ADDRESS`` is set in this process (children inherit it) until
    :meth:`close`.
    """

    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self.bus = SessionBus()
        self.tpms: list[Swtpm] = []
        self.brokers: list[TpmBroker] = []
        self._env_before: str | None = None

    @property
    def tctis(self) -> list[str]:
        """One TCTI (through abrmd) per TPM."""
        return [b.tcti for b in self.brokers]

    def start(self) -> None:
        """Start the bus, the swtpms and their brokers (all stopped again on failure)."""
        try:
            self.bus.start()
            self._env_before = os.environ.get(BUS_ENV)
            os.environ[BUS_ENV] = self.bus.address
            for i in range(self.count):
                tpm = Swtpm(self.directory / f"tpm-{i}")
                tpm.start()
                self.tpms.append(tpm)
                broker = TpmBroker(tpm, self.bus, self.directory / f"abrmd-{i}.log")
                broker.start()
                self.brokers.append(broker)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop brokers, TPMs and the bus; restore the environment."""
        for broker in self.brokers:
            broker.stop()
        for tpm in self.tpms:
            tpm.stop()
        self.bus.stop()
        if self._env_before is None:
            os.environ.pop(BUS_ENV, None)
        else:
            os.environ[BUS_ENV] = self._env_before
