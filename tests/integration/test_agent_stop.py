"""``agent run`` stops within seconds of SIGTERM, whatever it is waiting on.

The reported hole: a server trickling its response held ``agent update`` for minutes, and
``agent run`` ignored SIGTERM meanwhile, holding the device lock.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import World
from otaguard.model import Unsafe

# Generous for a loaded 2-core machine; the hole was minutes.
STOP_WITHIN_S = 8.0


@pytest.fixture
def trickling_server() -> Iterator[tuple[int, threading.Event]]:
    """Accepts connections and answers one header byte every second, forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    connected = threading.Event()
    done = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            connected.set()
            with conn:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n":
                    if done.wait(1.0):
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], connected
    finally:
        done.set()
        thread.join(5)
        listener.close()


def _run_agent(device_dir: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "otaguard", "agent", str(device_dir), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[float, str, str]:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"agent run ignored SIGTERM: {err}")
    return time.monotonic() - start, out, err


def test_sigterm_stops_agent_run_while_a_server_trickles(
    world: World, trickling_server: tuple[int, threading.Event]
) -> None:
    port, connected = trickling_server
    dev = world.device("trickled", insecure_http=True, health_command=Unsafe.NO_HEALTH_CHECK)
    dev.config = type(dev.config)(
        **{**dev.config.__dict__, "server_url": f"http://127.0.0.1:{port}"}
    )
    dev.config.save(dev.paths.config)
    proc = _run_agent(dev.paths.root)
    try:
        assert connected.wait(30), "the agent never connected"
        time.sleep(1.5)  # it is now blocked inside a trickled response
        elapsed, out, err = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert elapsed < STOP_WITHIN_S, (elapsed, err)
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert "Traceback" not in err


def test_sigterm_stops_agent_run_between_polls(world: World) -> None:
    dev = world.device("idle")
    proc = _run_agent(dev.paths.root)
    try:
        deadline = time.monotonic() + 30
        # The first poll has verified fresh metadata once the timestamp is cached.
        while not (dev.paths.metadata / "timestamp.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no first poll"
            time.sleep(0.2)
        time.sleep(1.0)  # the first poll is done; it waits ~300 s for the next one
        elapsed, out, _ = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert elapsed < STOP_WITHIN_S and proc.returncode == 0
    assert "stopped" in out
