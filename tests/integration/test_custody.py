"""Key custody: offline root/targets keys apart from the server, which signs only online roles.

Real servers and the real CLI, no mocks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import urllib3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from conftest import HW, PASSPHRASE, World, same_passphrase, start_world
from otaguard.cli import passphrase_env_var
from otaguard.crypto import read_public_key
from otaguard.model import ConfigError
from otaguard.model.unsafe import Unsafe
from otaguard.repo import ImageRepository
from otaguard.server import ServerSettings, init_data_dir, start_server_in_thread
from otaguard.server._repo_dir import refuse_private_keys
from otaguard.server.client import FleetClient
from otaguard.sim import SIM_HEALTH_COMMAND, wait_served
from sbom_support import sbom_beside

OFFLINE_KEYS = ("root-ed25519", "root-ml-dsa-65", "targets-ed25519", "targets-ml-dsa-65")


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI without a terminal and without the caller's otaguard variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    return subprocess.run(
        [sys.executable, "-m", "otaguard", *map(str, args)],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("warning:")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def tree(*dirs: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def plaintext_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def served_signed(world: World, name: str) -> dict[str, object]:
    assert world.server.ca_cert is not None
    with urllib3.PoolManager(
        ca_certs=str(world.server.ca_cert),
        timeout=5,
        headers={"Authorization": f"Bearer {world.server.operator_token}"},
    ) as http:
        resp = http.request("GET", f"{world.server.base_url}/metadata/{name}")
        assert resp.status == 200, name
        signed = json.loads(resp.data)["signed"]
    assert isinstance(signed, dict)
    return signed


def _expires_in(signed: dict[str, object]) -> float:
    expires = dt.datetime.fromisoformat(str(signed["expires"]).replace("Z", "+00:00"))
    return (expires - dt.datetime.now(dt.UTC)).total_seconds()


# -- the acceptance test: nobody runs `repo refresh` ---------------------------------------------


@pytest.mark.slow
def test_server_keeps_devices_updating_with_short_lived_metadata(tmp_path: Path) -> None:
    """A 4 s timestamp and 8 s snapshot: the server re-signs both, devices keep updating."""
    world = start_world(
        tmp_path,
        timestamp_expiry=dt.timedelta(seconds=4),
        snapshot_expiry=dt.timedelta(seconds=8),
    )
    try:
        world.release("1.0.0")
        repo_before = tree(world.repo.dir)
        dev = world.device()
        first_ts = served_signed(world, "timestamp.json")
        assert 0 < _expires_in(first_ts) <= 5  # short-lived, as configured
        assert dev.update().outcome == "up-to-date"  # t ≈ 0

        started = time.monotonic()
        while time.monotonic() - started < 10:  # > 2 timestamp and > 1 snapshot lifetimes
            running, selection = dev.check()
            assert running == "1.0.0" and selection.chosen is None
            time.sleep(1.5)
        assert dev.update().outcome == "up-to-date"

        ts = served_signed(world, "timestamp.json")
        assert int(str(ts["version"])) >= int(str(first_ts["version"])) + 3
        snap_version = ts["meta"]["snapshot.json"]["version"]  # type: ignore[index]
        first_snap = first_ts["meta"]["snapshot.json"]["version"]  # type: ignore[index]
        assert snap_version > first_snap, "the snapshot was re-signed too"
        assert tree(world.repo.dir) == repo_before, "nobody touched the repository"

        world.release("1.1.0", security=True)
        result = dev.update()
        assert result.outcome == "updated" and result.to_version == "1.1.0"
    finally:
        world.server.stop()


# -- the server refuses a repository directory holding private keys ------------------------------


@pytest.mark.parametrize(
    "plant",
    ["keys/stray.pem", "deep/er/key.txt", "otaguard-keys.json", "old-layout"],
)
def test_server_refuses_a_repository_holding_private_keys(tmp_path: Path, plant: str) -> None:
    paths = init_data_dir(tmp_path / "server")
    repo = ImageRepository.init(
        tmp_path / "repo",
        keys_dir=tmp_path / "keys",
        passphrases=same_passphrase,
        online_key=read_public_key(paths.online_public_key),
    )
    if plant == "old-layout":  # what format 1 wrote: every key inside the repository
        (repo.dir / "keys").mkdir()
        target = repo.dir / "keys" / "targets-ed25519.pem"
        target.write_bytes((repo.keys_dir / "targets-ed25519.pem").read_bytes())
    elif plant == "otaguard-keys.json":
        target = repo.dir / "otaguard-keys.json"
        target.write_bytes((repo.keys_dir / "otaguard-keys.json").read_bytes())
    else:
        target = repo.dir / plant
        target.parent.mkdir(parents=True)
        target.write_bytes(b"notes\n" + plaintext_pem())

    with pytest.raises(ConfigError, match=re.escape(str(target))):
        start_server_in_thread(
            ServerSettings(data_dir=paths.data_dir, repo_dir=repo.dir, port=0, sync_interval=0.1)
        )

    proc = cli("server", "--data", paths.data_dir, "--repo", repo.dir, "--port", "0")
    one_line_error(proc, 2, "configuration error", str(target), "private key")


def test_sync_refuses_a_key_planted_later(world: World) -> None:
    """The sync scans before every import: a release is not taken while a key is there."""
    dev = world.device()
    served = served_signed(world, "timestamp.json")
    stray = world.repo.dir / "targets" / "oops.pem"
    stray.write_bytes(plaintext_pem())
    world.repo.add_release(
        world.image("1.1.0"), version="1.1.0", hardware_ids=[HW], security=False,
        sbom=sbom_beside(world.image("1.1.0")),
        security_counter=None,
    )  # fmt: skip
    time.sleep(1.0)  # ten sync intervals
    assert served_signed(world, "timestamp.json") == served
    assert dev.update().outcome == "up-to-date"
    stray.unlink()
    world.wait_served()
    assert dev.update().outcome == "updated"


def test_private_key_scan_is_bounded(tmp_path: Path) -> None:
    """Big files (firmware blobs) are not read; deep trees are not walked forever."""
    repo = tmp_path / "repo"
    (repo / "targets").mkdir(parents=True)
    blob = repo / "targets" / ("0" * 64 + ".fw.img")
    blob.write_bytes(b"\0" * (300 * 1024) + plaintext_pem())  # a key inside a large blob
    deep = repo.joinpath(*"abcdefgh")
    deep.mkdir(parents=True)
    (deep / "k.pem").write_bytes(plaintext_pem())
    refuse_private_keys(repo)  # neither is in reach of the bounded scan
    (repo / "a" / "b" / "k.pem").write_bytes(plaintext_pem())
    with pytest.raises(ConfigError, match=r"a/b/k\.pem holds a private key"):
        refuse_private_keys(repo)


# -- what the offline tool writes ---------------------------------------------------------------


def test_repo_init_with_online_key_writes_no_private_key_into_the_repository(
    tmp_path: Path,
) -> None:
    data, repo, keys = tmp_path / "srv", tmp_path / "repo", tmp_path / "keys"
    srv = cli("server", "init", "--data", data)
    assert srv.returncode == 0, srv.stderr
    for needle in ("online-key.pub.json", "ca.pem", "operator-token"):
        assert needle in srv.stdout
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "online-key.pem").stat().st_mode) == 0o600
    online = read_public_key(data / "online-key.pub.json")
    again = cli("server", "init", "--data", data)  # idempotent: the same key
    assert again.returncode == 0 and read_public_key(data / "online-key.pub.json") == online

    env = {passphrase_env_var(n): f"pass {n}" for n in OFFLINE_KEYS}
    init = cli(
        "repo", "init", repo, "--keys-dir", keys,
        "--online-key", data / "online-key.pub.json", env=env,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert "signed by the update server" in init.stdout

    # Nothing private in the repository; the bounded scan agrees with a full one.
    for path in repo.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    refuse_private_keys(repo)
    assert sorted(p.name for p in (repo / "metadata").iterdir()) == [
        "1.root.json",
        "1.targets.json",
        "root.json",
    ]
    # No snapshot or timestamp key anywhere offline: root names the server's key.
    assert sorted(p.name for p in keys.glob("*.pem")) == [f"{n}.pem" for n in OFFLINE_KEYS]
    root = json.loads((repo / "metadata" / "1.root.json").read_text())["signed"]
    for role in ("snapshot", "timestamp"):
        assert root["roles"][role] == {"keyids": [online.keyid], "threshold": 1}
    config = json.loads((repo / "otaguard-repo.json").read_text())
    for role in ("snapshot", "timestamp"):
        assert [e["uri"] for e in config["keys"][role]] == [None]
    assert [e["uri"] for e in config["keys"]["targets"]] == [
        "encfile:targets-ed25519.pem",
        "encfile:targets-ml-dsa-65.pem",
    ]
    # Server mode: refreshing snapshot or timestamp is the server's job.
    refresh = cli("repo", "refresh", repo, env=env)
    one_line_error(refresh, 2, "update server signs snapshot and timestamp")
    verify = cli("repo", "verify", repo, env={"COLUMNS": "200"})  # one table row per line
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count("signed by the server") == 2


@pytest.mark.parametrize("keys", ["repo/keys", "repo"])
def test_repo_init_refuses_keys_inside_the_repository(tmp_path: Path, keys: str) -> None:
    proc = cli(
        "repo", "init", tmp_path / "repo", "--keys-dir", tmp_path / keys,
        env={"OTAGUARD_KEY_PASSPHRASE": "x"},
    )  # fmt: skip
    one_line_error(proc, 2, "must be outside the repository")
    assert not (tmp_path / "repo").exists()


def test_cli_per_key_passphrases(world: World) -> None:
    """Each key's own variable, then the shared one; a wrong one is named, nothing changes."""
    before = tree(world.repo.dir, world.keys_dir)
    args = (
        "release", "add", world.repo.dir, world.image("1.1.0"),
        "--version", "1.1.0", "--hardware-id", HW, "--sbom", sbom_beside(world.image("1.1.0")),
    )  # fmt: skip
    wrong_one = cli(
        *args,
        env={
            "OTAGUARD_KEY_PASSPHRASE": PASSPHRASE.decode(),
            passphrase_env_var("targets-ml-dsa-65"): "not this one",
        },
    )
    one_line_error(wrong_one, 2, "key error: wrong passphrase for key targets-ml-dsa-65")
    missing = cli(*args, env={passphrase_env_var("targets-ed25519"): PASSPHRASE.decode()})
    one_line_error(
        missing,
        2,
        "no passphrase for key targets-ml-dsa-65",
        "OTAGUARD_KEY_PASSPHRASE_TARGETS_ML_DSA_65",
    )
    assert tree(world.repo.dir, world.keys_dir) == before
    right = cli(
        *args,
        env={passphrase_env_var(n): PASSPHRASE.decode() for n in OFFLINE_KEYS if "targets" in n},
    )
    assert right.returncode == 0, right.stderr
    world.wait_served()


# -- server-less mode ---------------------------------------------------------------------------


def test_serverless_repository_refresh_and_plain_mirror(tmp_path: Path) -> None:
    """Without --online-key the repository is complete; `repo refresh` keeps it fresh, and
    `otaguard server` mirrors it byte for byte (it cannot re-sign it)."""
    repo_dir, keys = tmp_path / "repo", tmp_path / "keys"
    env = {"OTAGUARD_KEY_PASSPHRASE": "one for all, in a script"}
    init = cli("repo", "init", repo_dir, "--keys-dir", keys, env=env)
    assert init.returncode == 0, init.stderr
    assert sorted(p.name for p in keys.glob("*.pem")) == sorted(
        [f"{n}.pem" for n in OFFLINE_KEYS] + ["snapshot-ed25519.pem", "timestamp-ed25519.pem"]
    )
    timestamp = repo_dir / "metadata" / "timestamp.json"
    before = json.loads(timestamp.read_text())["signed"]["version"]

    refresh = cli("repo", "refresh", repo_dir, env=env)
    assert refresh.returncode == 0, refresh.stderr
    assert json.loads(timestamp.read_text())["signed"]["version"] == before + 1
    verify = cli("repo", "verify", repo_dir)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    repo = ImageRepository(repo_dir)
    server = start_server_in_thread(
        ServerSettings(
            data_dir=tmp_path / "mirror",
            repo_dir=repo_dir,
            port=0,
            sync_interval=0.1,
            timestamp_expiry=dt.timedelta(seconds=2),
            snapshot_expiry=dt.timedelta(seconds=2),
        )
    )
    try:
        wait_served(server, repo)  # the repository's own timestamp, byte for byte
        time.sleep(1.5)  # past half of the server's lifetimes: still not re-signed
        wait_served(server, repo)
        refresh = cli("repo", "refresh", repo_dir, env=env)
        assert refresh.returncode == 0, refresh.stderr
        wait_served(server, repo)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--timestamp-expiry", "1d", "--snapshot-expiry", "1h"), "shorter"),
        (("--timestamp-expiry", "1s"), "timestamp_expiry must be between"),
        (("--timestamp-expiry", "soon"), "invalid duration"),
    ],
)
def test_server_lifetime_options_are_checked(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    proc = cli("server", "--data", tmp_path / "srv", "--port", "0", *args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "srv").exists()


def test_publish_api_completes_a_server_mode_publication(tmp_path: Path) -> None:
    """`otaguard publish` of a server-mode repository: the server adds snapshot + timestamp."""
    from otaguard.agent import Device
    from otaguard.server import publish_repository
    from otaguard.sim import make_image

    paths = init_data_dir(tmp_path / "server")
    repo = ImageRepository.init(
        tmp_path / "repo",
        keys_dir=tmp_path / "keys",
        passphrases=same_passphrase,
        online_key=read_public_key(paths.online_public_key),
    )
    image = make_image(tmp_path / "fw.img", size=64 * 1024, seed="1.0.0")
    repo.add_release(
        image,
        sbom=sbom_beside(image),
        version="1.0.0",
        hardware_ids=[HW],
        security=False,
        security_counter=None,
    )
    with start_server_in_thread(
        ServerSettings(data_dir=paths.data_dir, repo_dir=None, port=0)
    ) as server:
        result = publish_repository(
            repo.dir, server_url=server.base_url, ca_cert=paths.ca_cert, token=server.operator_token
        )
        assert result.timestamp == "1.timestamp.json"
        assert set(result.added) >= {"1.root.json", "2.targets.json", "1.snapshot.json"}
        wait_served(server, repo)
        assert server.ca_cert is not None
        dev = Device.provision(
            tmp_path / "dev",
            server_url=server.base_url,
            root_json=repo.metadata_dir / "root.json",
            ca_pem=server.ca_cert,
            hardware_id=HW,
            serial="dev",
            factory_image=image,
            factory_version="1.0.0",
            health_command=SIM_HEALTH_COMMAND,
        )
        with FleetClient(
            server_url=server.base_url, ca_cert=server.ca_cert, token=server.operator_token
        ) as fleet:
            token = fleet.add_device("dev", HW).token
        dev.enroll(token, key_store=Unsafe.FILE_DEVICE_KEY)
        assert dev.update().outcome == "up-to-date"
        again = publish_repository(
            repo.dir, server_url=server.base_url, ca_cert=paths.ca_cert, token=server.operator_token
        )
        assert again.added == () and again.timestamp is None
