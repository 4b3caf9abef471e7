"""``otaguard server`` in a process of its own, as an operator runs it: the fleet tests'
simulator and the server then use a core each instead of sharing one process's GIL."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import urllib3

from nginx_support import free_port
from otaguard.server.auth import OPERATOR_TOKEN_FILE

__all__ = ["ProcessServer", "wait_healthy"]

#: a server process answers /healthz within this (it imports the repository first)
START_TIMEOUT_S: Final = 30.0


def wait_healthy(
    port: int, ctx: ssl.SSLContext, *, alive: Callable[[], bool], why: Callable[[], str]
) -> None:
    """Until the server on ``port`` answers ``/healthz`` (asserting, with ``why``, that it
    stays ``alive`` meanwhile), at most :data:`START_TIMEOUT_S`."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert alive(), why()
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    raise AssertionError(f"the server on port {port} did not come up")


class ProcessServer:
    """A server process with a director, rollouts evaluated every 0.2 s, answering on a
    free port once it is healthy; ``extra_args`` go to ``otaguard server`` too."""

    def __init__(
        self,
        tmp: Path,
        *,
        repo: Path,
        director: Path,
        data_dir: Path,
        ca: Path,
        database_url: str | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.ca_cert = ca
        self.operator_token = (data_dir / OPERATOR_TOKEN_FILE).read_text().strip()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
        self.log_path = tmp / "server.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otaguard", "server", "--data", str(data_dir),
             "--repo", str(repo), "--director", str(director), "--port", str(self.port),
             "--rollout-interval", "0.2", *extra_args,
             *(["--database-url", database_url] if database_url else [])],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        wait_healthy(
            self.port, ctx, alive=lambda: self.proc.poll() is None,
            why=lambda: self.log_path.read_text()[-2000:],
        )  # fmt: skip

    def get(self, path: str) -> Any:
        """GET ``path`` with the operator token; the JSON answer (200 asserted)."""
        pool = urllib3.PoolManager(ca_certs=str(self.ca_cert), retries=False)
        resp = pool.request("GET", self.base_url + path,
                            headers={"Authorization": f"Bearer {self.operator_token}"})  # fmt: skip
        assert resp.status == 200, resp.data
        return json.loads(resp.data)

    def stop(self) -> None:
        """Terminate (kill after 20 s) and close the log."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
