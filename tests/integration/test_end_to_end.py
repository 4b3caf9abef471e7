"""The whole path over real HTTPS: release, serve, verify, install, commit."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from conftest import HW, World
from otaguard.agent import Device
from otaguard.cli import passphrase_env_var
from otaguard.sim import SIM_HEALTH_COMMAND
from sbom_support import sbom_beside


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_flow_with_real_server_process(world: World, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The README's by-hand flow: server and offline machine apart, CLI everywhere.

    The server process never sees a passphrase; the offline steps get one per key.
    """
    import time

    port = _free_port()
    data, repo, keys = tmp_path / "srv2", tmp_path / "repo2", tmp_path / "offline-keys"
    server_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    key_names = ("root-ed25519", "root-ml-dsa-65", "targets-ed25519", "targets-ml-dsa-65")
    offline_env = {
        **server_env,
        **{passphrase_env_var(name): f"passphrase of {name}" for name in key_names},
    }
    cli = [sys.executable, "-m", "otaguard"]

    def run(*args: str, env: dict[str, str] = offline_env) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    # On the server: prepare the data directory; its online public key goes offline.
    init_srv = run("server", "init", "--data", str(data), env=server_env)
    assert init_srv.returncode == 0, init_srv.stderr
    assert str(data / "online-key.pub.json") in init_srv.stdout
    # On the offline signing machine: keys outside the repository, one passphrase each.
    init_repo = run(
        "repo", "init", str(repo), "--keys-dir", str(keys),
        "--online-key", str(data / "online-key.pub.json"),
    )  # fmt: skip
    assert init_repo.returncode == 0, init_repo.stderr
    targets_only = {
        k: v for k, v in offline_env.items() if "ROOT" not in k
    }  # releases need the targets keys only
    add = run(
        "release", "add", str(repo), str(world.image("1.0.0")),
        "--version", "1.0.0", "--hardware-id", HW,
        "--sbom", str(sbom_beside(world.image("1.0.0"))), env=targets_only,
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    # On the server again: serve and follow the carried-over repository.
    server = subprocess.Popen(
        [
            *cli, "server", "--data", str(data), "--repo", str(repo), "--port", str(port),
            "--timestamp-expiry", "60s", "--snapshot-expiry", "1h",
        ],
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"https://127.0.0.1:{port}"
        ca = data / "ca" / "ca.pem"
        deadline = time.monotonic() + 30
        check = None
        token: str | None = None
        while time.monotonic() < deadline:
            if not (tmp_path / "d1").exists():
                init = run(
                    "device", "init", str(tmp_path / "d1"), "--serial", "d1", "--server", url,
                    "--root", str(repo / "metadata" / "root.json"), "--ca", str(ca),
                    "--hardware-id", HW, "--factory-image", str(world.image("1.0.0")),
                    "--factory-version", "1.0.0",
                    "--health-command", shlex.join(SIM_HEALTH_COMMAND),
                )  # fmt: skip
                assert init.returncode == 0, init.stderr
            if token is None:
                # The operator registers the device; the token is the last line's first word.
                added = run(
                    "fleet", "add-device", "--serial", "d1", "--hardware-id", HW,
                    "--server", url, "--ca", str(ca), "--token-file", str(data / "operator-token"),
                    env=server_env,
                )  # fmt: skip
                if added.returncode != 0:
                    time.sleep(0.2)
                    continue
                token = added.stdout.strip().splitlines()[-1].split()[0]
                enrolled = run(
                    "device", "enroll", str(tmp_path / "d1"),
                    env={**offline_env, "OTAGUARD_ENROLL_TOKEN": token},
                )  # fmt: skip
                assert enrolled.returncode == 0, enrolled.stderr
                assert token not in enrolled.stdout + enrolled.stderr
            check = run("agent", str(tmp_path / "d1"), "check")
            if check.returncode == 0:
                break
            time.sleep(0.2)
        assert check is not None and check.returncode == 0, check.stderr
        assert "no update" in check.stdout

        add = run(
            "release", "add", str(repo), str(world.image("1.1.0")),
            "--version", "1.1.0", "--hardware-id", HW,
            "--sbom", str(sbom_beside(world.image("1.1.0"))), env=targets_only,
        )  # fmt: skip
        assert add.returncode == 0, add.stderr
        # Served without restarting the server process; it signed snapshot and timestamp.
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
        assert not (repo / "metadata" / "timestamp.json").exists()
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
