"""The whole path over real HTTPS: release, serve, verify, install, commit."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from conftest import HW, PASSPHRASE, World
from otaguard.agent import Device
from otaguard.sim import SIM_HEALTH_COMMAND


def test_device_updates_to_new_release_over_https(world: World) -> None:
    dev = world.device()
    assert dev.update().outcome == "up-to-date"
    rel = world.release("1.1.0", security=True)
    running, sel = dev.check()
    assert running == "1.0.0"
    assert sel.chosen is not None and sel.chosen.path == rel.path

    result = dev.update()

    assert result.outcome == "updated" and result.to_version == "1.1.0"
    st = dev.status()
    assert st.booted is not None and st.booted.slot == "B" and st.booted.version == "1.1.0"
    assert st.bootenv.primary == "B" and st.bootenv.try_slot is None
    assert str(st.floor.version) == "1.1.0" and st.floor.security_counter == 1
    assert world.image("1.1.0").read_bytes() == (dev.paths.slots / "b.img").read_bytes()
    # The next update finds nothing newer.
    assert dev.update().outcome == "up-to-date"


def test_cli_flow_with_real_server_process(world: World, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The README's by-hand flow: a separate `otaguard server` process, CLI everywhere."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "srv2"
    env = {
        "PATH": "/usr/bin:/bin",
        "OTAGUARD_KEY_PASSPHRASE": PASSPHRASE.decode(),
        "HOME": str(tmp_path),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "otaguard",
            "server",
            "--data",
            str(data),
            "--repo",
            str(world.repo.dir),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"https://127.0.0.1:{port}"
        ca = data / "ca" / "ca.pem"
        import time

        deadline = time.monotonic() + 30
        while not ca.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        cli = [sys.executable, "-m", "otaguard"]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*cli, *args], env=env, capture_output=True, text=True, timeout=120, check=False
            )

        init = None
        while time.monotonic() < deadline:
            init = run(
                "device",
                "init",
                str(tmp_path / "d1"),
                "--server",
                url,
                "--root",
                str(world.repo.metadata_dir / "root.json"),
                "--ca",
                str(ca),
                "--hardware-id",
                HW,
                "--factory-image",
                str(world.image("1.0.0")),
                "--factory-version",
                "1.0.0",
                "--health-command",
                shlex.join(SIM_HEALTH_COMMAND),
            )
            if init.returncode == 0:
                break
            time.sleep(0.2)
        assert init is not None and init.returncode == 0, init.stderr
        check = run("agent", str(tmp_path / "d1"), "check")
        assert check.returncode == 0, check.stderr
        assert "no update" in check.stdout

        add = run(
            "release",
            "add",
            str(world.repo.dir),
            str(world.image("1.1.0")),
            "--version",
            "1.1.0",
            "--hardware-id",
            HW,
        )
        assert add.returncode == 0, add.stderr
        # Served without restarting the server process.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            check = run("agent", str(tmp_path / "d1"), "check")
            if "would install" in check.stdout:
                break
            time.sleep(0.3)
        assert "would install" in check.stdout and "1.1.0" in check.stdout

        upd = run("agent", str(tmp_path / "d1"), "update")
        assert upd.returncode == 0, upd.stderr
        assert "updated" in upd.stdout
        status = run("agent", str(tmp_path / "d1"), "status")
        assert status.returncode == 0 and "1.1.0" in status.stdout
        booted = json.loads((tmp_path / "d1" / "run" / "booted.json").read_text())
        assert booted["version"] == "1.1.0"
        assert Device(tmp_path / "d1").status().bootenv.primary == "B"
    finally:
        server.terminate()
        server.wait(timeout=30)
        assert server.stdout is not None
        server.stdout.close()


def test_unhealthy_release_is_rolled_back_and_not_retried(world: World) -> None:
    """A release whose health check fails rolls back once, then is skipped until a newer one."""
    dev = world.device(health_command=["sh", "-c", 'test "$OTAGUARD_VERSION" != 1.1.0'])
    world.release("1.1.0")

    first = dev.update()
    assert first.outcome == "rolled-back"
    st = dev.status()
    assert st.booted is not None and st.booted.slot == "A" and st.booted.version == "1.0.0"
    assert str(st.floor.version) == "1.0.0"

    again = dev.update()
    assert again.outcome == "up-to-date"
    assert any("rolled back on this device before" in why for _, why in again.refused)

    world.release("1.2.0")
    assert dev.update().outcome == "updated"
    assert dev.status().bootenv.primary == "B"
