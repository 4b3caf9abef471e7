"""Two server processes on one PostgreSQL database: one registry, one winner per token.

Server A runs in this process, server B is a real ``otaguard server`` child process with
``OTAGUARD_DATABASE_URL``; they share the data directory (CA, device CA, operator token)
as workers of one deployment do, and nothing else but the database.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.engine import make_url
from tuf.api.metadata import Metadata, Timestamp

from conftest import World, start_world
from nginx_support import free_port
from otaguard.agent import Device
from otaguard.agent.checkin import CHECKIN_PATH, NONCE_PATH, build_manifest
from otaguard.agent.identity import device_signer
from otaguard.crypto.envelope import sign_envelope
from otaguard.server import RunningServer, ServerSettings, init_data_dir, start_server_in_thread
from otaguard.server.client import FleetClient
from otaguard.server.ops_client import OpsClient
from otaguard.server.rollout_client import RolloutClient
from otaguard.server.storage import upgrade_database
from process_server import wait_healthy

#: a password in B's URL: PostgreSQL's trust authentication never asks for it, so it can
#: only ever show up in B's output if otaguard leaked it
PASSWORD = "s3cret-db-password"


def _csr(serial: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
        .sign(key, hashes.SHA256())
    )
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def _enroll(port: int, ctx: ssl.SSLContext, serial: str, token: str) -> tuple[int, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        auth = base64.b64encode(f"{serial}:{token}".encode()).decode()
        conn.request(
            "POST",
            "/.well-known/est/simpleenroll",
            body=_csr(serial),
            headers={
                "Content-Type": "application/pkcs10",
                "Content-Transfer-Encoding": "base64",
                "Authorization": f"Basic {auth}",
            },
        )
        answer = conn.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        conn.close()


def test_two_servers_share_the_registry_and_a_raced_token_enrolls_once(
    postgres_url: str, tmp_path: Path
) -> None:
    upgrade_database(postgres_url)
    paths = init_data_dir(tmp_path / "srv")
    a = start_server_in_thread(
        ServerSettings(data_dir=paths.data_dir, repo_dir=None, port=0, database_url=postgres_url)
    )
    port_b = free_port()
    url_b = make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "otaguard", "-vv", "server", "--data", str(paths.data_dir),
         "--port", str(port_b)],
        env={**env, "OTAGUARD_DATABASE_URL": url_b},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output = ""
    try:
        ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
        wait_healthy(
            port_b, ctx, alive=lambda: proc.poll() is None, why=lambda: proc.communicate()[0]
        )
        base_b = f"https://127.0.0.1:{port_b}"
        with FleetClient(
            server_url=a.base_url, ca_cert=paths.ca_cert, token=a.operator_token
        ) as fa:
            token = fa.add_device("racer", "hw-1").token
        # Registered through A, seen through B: one registry.
        with FleetClient(server_url=base_b, ca_cert=paths.ca_cert, token=a.operator_token) as fb:
            assert fb.show("racer").status == "registered"

        a_port = int(a.base_url.rsplit(":", 1)[1])
        results: list[tuple[int, str]] = []
        barrier = threading.Barrier(2)

        def enroll(port: int) -> None:
            barrier.wait()
            results.append(_enroll(port, ctx, "racer", token))

        threads = [threading.Thread(target=enroll, args=(p,)) for p in (a_port, port_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 403], results
        refused = next(body for status, body in results if status == 403)
        assert "already used" in refused
        with FleetClient(server_url=base_b, ca_cert=paths.ca_cert, token=a.operator_token) as fb:
            info = fb.show("racer")
        assert info.status == "enrolled"
        assert len(info.cert_serials) == 1
    finally:
        a.stop()
        proc.terminate()
        try:
            output = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    # B logged which database it uses (debug logging on), never the password.
    assert "database: postgresql+psycopg://postgres:***@127.0.0.1" in output
    assert PASSWORD not in output


def test_two_servers_following_one_repository_re_sign_and_publish_without_errors(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Both re-sign the same timestamp at half-life and import the same new release at
    # the same moment: one wins each time, the other finds it done. Nothing is an error.
    caplog.set_level(logging.INFO, logger="otaguard")
    upgrade_database(postgres_url)
    lifetimes: dict[str, Any] = {
        "timestamp_expiry": dt.timedelta(seconds=3),
        "snapshot_expiry": dt.timedelta(seconds=6),
    }
    world = start_world(tmp_path, database_url=postgres_url, **lifetimes)
    b = None
    try:
        world.release("1.0.0")
        b = _second_server(
            world, postgres_url, repo_dir=world.repo.dir, sync_interval=0.1, **lifetimes
        )
        time.sleep(4)  # both loops re-sign more than once (half-life 1.5 s)
        world.release("1.1.0")  # both syncs import it
        time.sleep(2)
        # End to end on PostgreSQL: enrollment, check-in (nonce spent), update.
        dev = world.device("d1")
        result = dev.update()
        assert (result.outcome, result.to_version) == ("updated", "1.1.0")
        current = world.server.app.state.store.current_timestamp()
        assert current is not None
        ts = Metadata[Timestamp].from_bytes(current.data).signed
        assert ts.expires > dt.datetime.now(dt.UTC)
    finally:
        if b is not None:
            b.stop()
        world.server.stop()
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []


def _second_server(world: World, database_url: str, **settings: Any) -> RunningServer:
    """Server B: another process's view of A's data directory and database."""
    return start_server_in_thread(
        ServerSettings(
            data_dir=world.server.data_dir,
            port=0,
            database_url=database_url,
            **{"repo_dir": None, **settings},
        )
    )


def _device_tls(world: World, dev: Device) -> ssl.SSLContext:
    """A client context trusting the server's CA and presenting ``dev``'s certificate."""
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    ctx.load_cert_chain(str(dev.paths.device_cert), str(dev.paths.device_key))
    return ctx


def _post(port: int, ctx: ssl.SSLContext, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_one_signed_check_in_sent_to_two_servers_is_accepted_once(
    postgres_url: str, tmp_path: Path
) -> None:
    # A replay raced to another server process: the nonce A issued is spent by one of them.
    upgrade_database(postgres_url)
    world = start_world(tmp_path, database_url=postgres_url)
    b = None
    try:
        world.release("1.0.0")
        b = _second_server(world, postgres_url)
        dev = world.device("twice")
        ctx = _device_tls(world, dev)
        port_a = int(world.server.base_url.rsplit(":", 1)[1])
        port_b = int(b.base_url.rsplit(":", 1)[1])
        status, data = _post(port_a, ctx, NONCE_PATH, b"")
        assert status == 200, data
        nonce = json.loads(data)["nonce"]
        signed = sign_envelope(
            device_signer(dev.paths, dev.config),
            build_manifest(dev.paths, dev.config, nonce=nonce, tpm=None).to_dict(),
        )
        results: list[tuple[int, bytes]] = []
        barrier = threading.Barrier(2)

        def check_in(port: int) -> None:
            barrier.wait()
            results.append(_post(port, ctx, CHECKIN_PATH, signed))

        threads = [threading.Thread(target=check_in, args=(p,)) for p in (port_a, port_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(s for s, _ in results) == [200, 403], results
        refused = next(d for s, d in results if s == 403)
        assert "the nonce was already used (replay)" in json.loads(refused)["error"]
        history = world.server.app.state.checkins.history("twice", limit=10)
        assert [c.outcome for c in history] == ["accepted"]  # one check-in recorded
    finally:
        if b is not None:
            b.stop()
        world.server.stop()


def test_a_quarantine_through_one_server_refuses_the_very_next_request_on_the_other(
    postgres_url: str, tmp_path: Path
) -> None:
    # Zero trust across workers: nothing of the registry is cached between requests, so
    # a quarantine made through B's operator API refuses the device at once on A, the
    # check-in of a nonce A issued before it included.
    upgrade_database(postgres_url)
    world = start_world(tmp_path, database_url=postgres_url)
    b = None
    try:
        world.release("1.0.0")
        b = _second_server(world, postgres_url)
        dev = world.device("watched")
        ctx = _device_tls(world, dev)
        port_a = int(world.server.base_url.rsplit(":", 1)[1])

        def signed_manifest() -> bytes:
            status, data = _post(port_a, ctx, NONCE_PATH, b"")
            assert status == 200, data
            return sign_envelope(
                device_signer(dev.paths, dev.config),
                build_manifest(
                    dev.paths, dev.config, nonce=json.loads(data)["nonce"], tpm=None
                ).to_dict(),
            )

        status, data = _post(port_a, ctx, CHECKIN_PATH, signed_manifest())
        assert status == 200, data  # A has served this device: anything it caches is warm
        pending = signed_manifest()
        with FleetClient(
            server_url=b.base_url, ca_cert=world.server.ca_cert, token=b.operator_token
        ) as fb:
            fb.quarantine("watched", "odd traffic")
        expected = "access denied: device watched is quarantined: odd traffic"
        status, data = _post(port_a, ctx, CHECKIN_PATH, pending)
        assert status == 403, data
        assert json.loads(data)["error"] == expected
        status, data = _post(port_a, ctx, NONCE_PATH, b"")
        assert status == 403, data
        assert json.loads(data)["error"] == expected
        history = world.server.app.state.checkins.history("watched", limit=10)
        assert [c.outcome for c in history] == ["accepted"]  # the refused one is not recorded
    finally:
        if b is not None:
            b.stop()
        world.server.stop()


def test_operator_changes_through_one_server_steer_the_very_next_check_in_on_the_other(
    postgres_url: str, tmp_path: Path
) -> None:
    # The check-in's channel policy reads only the device's own rows and caches nothing an
    # operator changes (ADR 0012): a group membership, a pause and a resume made through
    # B decide A's answer to the device's very next check-in.
    upgrade_database(postgres_url)
    world = start_world(tmp_path, database_url=postgres_url, director=True)
    b = None
    try:
        world.release("1.0.0")
        dev = world.device("steered")
        dev.update()  # A has answered this device: anything it caches is warm
        world.release("1.1.0")  # a feature release: only through a rollout
        b = _second_server(world, postgres_url, director_dir=tmp_path / "director")
        assert world.server.ca_cert is not None
        opts = {"server_url": b.base_url, "ca_cert": world.server.ca_cert}
        with (
            OpsClient(**opts, token=b.operator_token) as ops,
            RolloutClient(**opts, token=b.operator_token) as ro,
        ):
            ops.create_group("pilot", where=None)
            ro.create_rollout(
                release="1.1.0", group="pilot", phases=[100],
                success_threshold=95, failure_threshold=5, name="r-pilot",
            )  # fmt: skip
            dev.update()
            assert _booted(dev) == "1.0.0"  # not in the group
            ro.rollout_action("r-pilot", "pause")
            ops.change_members("pilot", add=["steered"])
            dev.update()
            assert _booted(dev) == "1.0.0"  # in the group, the rollout paused
            ro.rollout_action("r-pilot", "resume")
            dev.update()
            assert _booted(dev) == "1.1.0"
    finally:
        if b is not None:
            b.stop()
        world.server.stop()


def _booted(dev: Device) -> str:
    booted = dev.status().booted
    assert booted is not None
    return booted.version
