"""Serving the repository (ADR 0016): metadata from memory as the exact signed bytes, the
fast path's gate (a quarantine refuses the very next request, from any process sharing
the data directory), HEAD, and interrupted uploads removed at start-up.

One server (module scope) serves every test here; each test uses its own device.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import http.client
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from conftest import World, start_world
from otaguard.agent import Device
from otaguard.server import ServerSettings, init_data_dir, start_server_in_thread
from otaguard.server._signal import ChangeSignal
from otaguard.server.client import FleetClient
from otaguard.server.storage.base import DeviceState
from otaguard.server.storage.database import sqlite_url
from otaguard.server.storage.files import FileBlobStore
from otaguard.server.storage.migrate import open_database
from otaguard.server.storage.notify import NotifyingDeviceStore

TIMESTAMP = "/metadata/timestamp.json"


@pytest.fixture(scope="module")
def served_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = start_world(tmp_path_factory.mktemp("serving"))
    try:
        w.release("1.0.0")
        yield w
    finally:
        w.server.stop()


class Conn:
    """One keep-alive mutual-TLS connection presenting a device's certificate."""

    def __init__(self, world: World, dev: Device):
        url = urlsplit(world.server.base_url)
        assert world.server.ca_cert is not None
        ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
        ctx.load_cert_chain(str(dev.paths.device_cert), str(dev.paths.device_key))
        self.http = http.client.HTTPSConnection(
            url.hostname or "", url.port, context=ctx, timeout=10
        )

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        self.http.request(method, path)
        resp = self.http.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    def close(self) -> None:
        self.http.close()


def _stored_timestamp(world: World) -> bytes:
    record = world.server.app.state.store.current_timestamp()
    assert record is not None
    return bytes(record.data)


def _error(body: bytes) -> str:
    return str(json.loads(body)["error"])


class StatementCounter:
    """SQL statements run by the server's request paths (the event loop and its worker
    threads), not by the periodic tasks (re-signing, sync, rollouts)."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, *args: Any) -> None:
        name = threading.current_thread().name
        if name == "otaguard-server" or name.startswith("AnyIO worker"):
            self.statements.append(str(args[2])[:80])


@pytest.fixture
def count_statements() -> Iterator[StatementCounter]:
    counter = StatementCounter()
    event.listen(Engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(Engine, "before_cursor_execute", counter)


def test_metadata_is_served_from_memory_exact_bytes_get_and_head(
    served_world: World, count_statements: StatementCounter
) -> None:
    dev = served_world.device("sv1")
    dev.checkin()
    conn = Conn(served_world, dev)
    try:
        status, _, first = conn.get(TIMESTAMP)  # admits the certificate (registry read)
        assert status == 200
        count_statements.statements.clear()
        for _ in range(50):
            status, headers, body = conn.get(TIMESTAMP)
            assert status == 200 and body == first
            assert headers["cache-control"] == "no-store"
        status, headers, body = conn.get("/metadata/2.root.json")  # the next root: 404
        assert status == 404 and "2.root.json not found" in _error(body)
        status, headers, body = conn.get("/metadata/1.root.json", method="HEAD")
        root = (served_world.repo.metadata_dir / "1.root.json").read_bytes()
        assert status == 200 and body == b""
        assert int(headers["content-length"]) == len(root)
        assert "immutable" in headers["cache-control"]
        status, _, body = conn.get("/metadata/1.root.json")
        assert body == root
        # No metadata query for any of these 53 requests; the registry is re-read only
        # when an admission ages out (every ADMISSION_SECONDS), not per request.
        statements = count_statements.statements
        assert not [s for s in statements if "FROM metadata" in s or "FROM current" in s]
        assert len(statements) < 53 / 5, statements
        # The bytes are the stored signed bytes, not a re-serialisation.
        assert first == _stored_timestamp(served_world)
    finally:
        conn.close()


def test_a_publication_is_served_on_the_next_request(served_world: World) -> None:
    dev = served_world.device("sv2")
    dev.checkin()
    conn = Conn(served_world, dev)
    try:
        before = conn.get(TIMESTAMP)[2]
        served_world.release("1.1.0")
        after = conn.get(TIMESTAMP)[2]
        assert after != before
        assert after == _stored_timestamp(served_world)
        assert dev.update().outcome == "updated"
    finally:
        conn.close()


def test_a_quarantine_refuses_the_next_request_on_a_kept_connection(served_world: World) -> None:
    dev = served_world.device("sv3")
    dev.checkin()
    conn = Conn(served_world, dev)
    try:
        assert conn.get(TIMESTAMP)[0] == 200  # admitted and kept
        with FleetClient(
            server_url=served_world.server.base_url,
            ca_cert=served_world.server.ca_cert,
            token=served_world.server.operator_token,
        ) as fleet:
            fleet.quarantine(dev.config.serial, "odd traffic")
        status, _, body = conn.get(TIMESTAMP)
        assert status == 403
        assert f"device {dev.config.serial} is quarantined: odd traffic" in _error(body)
    finally:
        conn.close()


def test_a_revocation_by_another_process_refuses_the_next_request(served_world: World) -> None:
    """Another server process (its own engine and store, the same database and data
    directory) revokes: this process's kept admission must not survive it."""
    dev = served_world.device("sv4")
    dev.checkin()
    conn = Conn(served_world, dev)
    data_dir = served_world.server.data_dir
    engine = open_database(sqlite_url(data_dir / "otaguard.db"), upgrade=False)
    try:
        assert conn.get(TIMESTAMP)[0] == 200
        other = NotifyingDeviceStore(engine, on_change=ChangeSignal(data_dir, "registry").touch)
        other.set_status(
            dev.config.serial, DeviceState.REVOKED, reason="stolen", now=dt.datetime.now(dt.UTC)
        )
        status, _, body = conn.get(TIMESTAMP)
        assert status == 403
        assert "revoked: stolen" in _error(body)
        status, _, body = conn.get("/targets/" + "0" * 64 + ".fw.img")
        assert status == 403
    finally:
        conn.close()
        engine.dispose()


def test_blobs_are_served_with_range_and_head_through_the_fast_path(served_world: World) -> None:
    dev = served_world.device("sv5")
    dev.checkin()
    rel = served_world.releases["1.0.0"]
    image = served_world.image("1.0.0").read_bytes()
    name = f"/targets/{rel.sha256}.{rel.path}"
    conn = Conn(served_world, dev)
    try:
        status, headers, body = conn.get(name, method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) == len(image)
        conn.http.request("GET", name, headers={"Range": "bytes=100-1099"})
        resp = conn.http.getresponse()
        assert resp.status == 206 and resp.read() == image[100:1100]
        status, _, body = conn.get(name)
        assert status == 200 and body == image
    finally:
        conn.close()


def test_interrupted_uploads_are_removed_but_not_one_in_progress(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    stale = store.directory / ".upload.crashed.tmp"
    stale.write_bytes(b"half an image")
    writer = store.writer("a" * 64 + ".fw.img", max_length=1024)  # holds its flock
    writer.write(b"in progress")
    live = list(store.directory.glob(".upload.*.tmp"))
    assert len(live) == 2
    # A new server process starting now (its own FileBlobStore on the same directory).
    assert FileBlobStore(store.directory).remove_interrupted_uploads() == 1
    assert not stale.exists()
    remaining = list(store.directory.glob(".upload.*.tmp"))
    assert len(remaining) == 1
    with remaining[0].open("rb") as f, pytest.raises(BlockingIOError):  # the writer's lock
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    writer.abort()
    assert list(store.directory.glob(".upload.*.tmp")) == []


def test_a_starting_server_removes_interrupted_uploads(tmp_path: Path) -> None:
    paths = init_data_dir(tmp_path / "server")
    blobs = paths.data_dir / "blobs"
    blobs.mkdir(exist_ok=True)
    crashed = blobs / ".upload.crashed.tmp"
    crashed.write_bytes(b"half an image from before a power cut")
    with start_server_in_thread(
        ServerSettings(data_dir=paths.data_dir, repo_dir=None, port=0)
    ) as server:
        assert server.base_url
        assert not crashed.exists()
