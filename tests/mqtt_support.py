"""A real Mosquitto for the tests, running the shipped ``deploy/mosquitto`` config.

Only the file paths and the listener (a free loopback port) are substituted, plus
``user`` (Mosquitto started as root drops to the user ``mosquitto``, which could not read
the test's private directory). Under ``CI=true`` a missing mosquitto fails the test
instead of skipping it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nginx_support import free_port
from otaguard.server.mqtt import write_broker_files

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
MOSQUITTO = "/usr/sbin/mosquitto"


def require_mosquitto() -> str:
    """Mosquitto's path; skip (outside CI) or fail (in CI) when it is missing."""
    found = shutil.which("mosquitto") or (MOSQUITTO if Path(MOSQUITTO).exists() else None)
    if found is not None:
        return found
    reason = "mosquitto is not installed (apt-get install mosquitto)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class Broker:
    """Mosquitto on 127.0.0.1:<port> with the shipped config and ACL."""

    def __init__(self, tmp: Path, *, data_dir: Path, port: int | None = None):
        """Start it on ``port`` (default: a free one; a given one: a restart)."""
        binary = require_mosquitto()
        self.dir = tmp / "mosquitto"
        write_broker_files(data_dir, host="127.0.0.1", out=self.dir)
        shutil.copy(DEPLOY / "acl", self.dir / "acl")
        self.port = port or free_port()
        conf = (DEPLOY / "otaguard.conf").read_text()
        assert "listener 8883\n" in conf and "/etc/mosquitto/otaguard/" in conf
        conf = conf.replace("listener 8883\n", f"listener {self.port} 127.0.0.1\n")
        conf = conf.replace("/etc/mosquitto/otaguard/", f"{self.dir}/")
        conf += f"user {getpass.getuser()}\nlog_type all\n"
        (self.dir / "mosquitto.conf").write_text(conf)
        self.log = self.dir / "mosquitto.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.dir / "mosquitto.conf")],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        self.stop()
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        """Stop the broker (the process this object started)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
