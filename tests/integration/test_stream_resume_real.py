"""Resume of a streaming install against the real server: SIGKILLed agent processes, and
a TCP proxy on loopback that drops the connection in the middle of the image.

The in-memory tests (``tests/unit/test_stream_resume.py``) cut the power at 50 byte
offsets; these check the same with real processes, TLS, HTTP Range and the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_power_loss import assert_committed_to_new, assert_verified_image_runs, killed, ok

from conftest import World
from otaguard.agent import DeviceConfig, InstallState

MIB = 1024 * 1024
IMAGE = 6 * MIB  # several 1 MiB network reads, so checkpoints fall inside the stream
CHECKPOINT = 256 * 1024


def agent_v(device_dir: Path, action: str) -> subprocess.CompletedProcess[str]:
    """``otaguard -v agent DIR ACTION`` as a real process (info logs on stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    return subprocess.run(
        [sys.executable, "-m", "otaguard", "-v", "agent", str(device_dir), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def small_checkpoints(device_dir: Path, **changes: object) -> None:
    cfg = DeviceConfig.load(device_dir / "config.json")
    changes.setdefault("resume_checkpoint_bytes", CHECKPOINT)
    dataclasses.replace(cfg, **changes).save(device_dir / "config.json")  # type: ignore[arg-type]


def test_sigkilled_agent_resumes_the_stream_where_it_was_fsynced(world: World) -> None:
    world.image("1.1.0", size=IMAGE)
    dev = world.device()
    world.release("1.1.0")
    small_checkpoints(dev.paths.root)
    rng = random.Random(20261122)
    # The last cut falls in the last MiB: killed once every byte was written and
    # checkpointed, the resume fetches nothing (a Range past the end is refused).
    cuts = [rng.randrange(k * 2 * MIB + MIB, (k + 1) * 2 * MIB) for k in range(3)]
    resume_at = 0
    for cut in cuts:
        killed(dev.paths.root, f"stream-at:{cut}")
        state = InstallState.load(dev.paths.install_state)
        # Killed after writing the 1 MiB network read that crossed the cut; checkpoints
        # are fsynced and recorded in a thread of their own, so the last may be pending.
        assert resume_at <= state.written < cut + MIB, (cut, state.written)
        resume_at = state.written
        dev.boot()  # power on (in process: the bootloader verifies what it starts)
        assert assert_verified_image_runs(dev) == "A"
    assert resume_at > 0
    upd = ok(agent_v(dev.paths.root, "update"))
    assert f"slot B holds {resume_at} verified bytes: resuming there" in upd.stderr, upd.stderr
    assert "updated" in upd.stdout
    assert_committed_to_new(dev, world)


class DroppingProxy:
    """Relays TCP to ``upstream`` and cuts the first connection that has carried more than
    ``cut_after`` bytes to the client (TLS passes through untouched)."""

    def __init__(self, upstream: tuple[str, int], *, cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.downstream = 0  # bytes relayed to the client, all connections
        self.drops = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(self.upstream)
            self._start(self._pump, client, server, False)
            self._start(self._pump, server, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        carried = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if not down:
                    continue
                carried += len(data)
                with self._lock:
                    self.downstream += len(data)
                    cut = carried > self.cut_after and self.drops == 0
                    self.drops += cut
                if cut:
                    break
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._listener.close()


@pytest.fixture
def proxy(world: World) -> Iterator[DroppingProxy]:
    host, port = re.fullmatch(r"https://(.+):(\d+)", world.server.base_url).groups()  # type: ignore[union-attr]
    p = DroppingProxy((host, int(port)), cut_after=IMAGE // 2)
    yield p
    p.close()


def test_connection_dropped_mid_image_continues_with_a_range_request(
    world: World, proxy: DroppingProxy
) -> None:
    world.image("1.1.0", size=IMAGE)
    dev = world.device()
    world.release("1.1.0")
    small_checkpoints(dev.paths.root, server_url=f"https://127.0.0.1:{proxy.port}")

    upd = ok(agent_v(dev.paths.root, "update"))

    assert proxy.drops == 1, "the proxy cut the image's connection"
    assert "updated" in upd.stdout
    match = re.search(r"continuing from byte (\d+) \(Range request\)", upd.stderr)
    assert match is not None, upd.stderr
    # the proxy cuts after the read (up to 64 KiB) that crosses half the image's bytes
    assert IMAGE // 2 - 2 * MIB < int(match.group(1)) <= IMAGE // 2 + 65536
    # Resumed, not restarted: the image crossed the proxy about once, not 1.5 times.
    assert proxy.downstream < IMAGE + IMAGE // 4, proxy.downstream
    assert_committed_to_new(dev, world)
