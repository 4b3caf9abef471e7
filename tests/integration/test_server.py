"""The update server over real sockets and real TLS, run in-process on a free port."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from test_server_support import RepoWriter

import otaguard.server.app
import otaguard.server.client
import otaguard.server.publish
from otaguard.crypto import CertificateAuthority
from otaguard.model.errors import (
    ConflictError,
    NotReadyError,
    OperatorError,
    ServerStorageError,
    TransportError,
    VerificationError,
)
from otaguard.server import (
    PublishResult,
    RunningServer,
    ServerSettings,
    publish_repository,
    start_server_in_thread,
)

FIRMWARE = bytes(range(256)) * 40  # 10 KiB, every byte value at a known offset


@pytest.fixture
def repo(tmp_path: Path) -> RepoWriter:
    writer = RepoWriter(tmp_path / "repo")
    writer.add_target("fw-hw1-1.0.0.img", FIRMWARE)
    writer.publish()
    return writer


def _start(data_dir: Path, repo_dir: Path | None) -> RunningServer:
    return start_server_in_thread(
        ServerSettings(data_dir=data_dir, repo_dir=repo_dir, port=0, sync_interval=0.1)
    )


@pytest.fixture
def server(tmp_path: Path, repo: RepoWriter) -> Iterator[RunningServer]:
    with _start(tmp_path / "data", repo.path) as running:
        yield running


@pytest.fixture
def bare_server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server without --repo: content arrives only through the operator API."""
    with _start(tmp_path / "bare", None) as running:
        yield running


def _pool(server: RunningServer) -> urllib3.PoolManager:
    assert server.ca_cert is not None
    # The operator's bearer token may read the repository (devices use certificates).
    return urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED",
        ca_certs=str(server.ca_cert),
        retries=False,
        timeout=10,
        headers={"Authorization": f"Bearer {server.operator_token}"},
    )


@pytest.fixture
def http(server: RunningServer) -> Iterator[urllib3.PoolManager]:
    with _pool(server) as pool:
        yield pool


def test_healthz_and_openapi(server: RunningServer, http: urllib3.PoolManager) -> None:
    resp = http.request("GET", f"{server.base_url}/healthz")
    assert resp.status == 200
    assert resp.json() == {"status": "ok"}
    spec = http.request("GET", f"{server.base_url}/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/healthz",
        "/metadata/{filename}",
        "/targets/{filename}",
        "/api/v1/blobs/{filename}",
        "/api/v1/publish",
    }
    assert paths["/api/v1/publish"]["post"]["tags"] == ["operator"]
    assert paths["/api/v1/publish"]["post"]["security"] == [{"operatorToken": []}]
    assert paths["/targets/{filename}"]["get"]["summary"]
    assert "206" in paths["/targets/{filename}"]["get"]["responses"]


def test_metadata_served_byte_identical(
    server: RunningServer, http: urllib3.PoolManager, repo: RepoWriter
) -> None:
    # The server imports every root plus the current set: what timestamp.json leads to.
    current = ("1.root.json", "root.json", "2.snapshot.json", "2.targets.json", "timestamp.json")
    for name in current:
        data = (repo.meta_dir / name).read_bytes()
        resp = http.request("GET", f"{server.base_url}/metadata/{name}")
        assert resp.status == 200, name
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.data == data, name


@pytest.mark.parametrize(
    "path",
    [
        "/metadata/2.root.json",  # the next root: ngclient needs a 404 to stop
        "/metadata/9.snapshot.json",
        "/metadata/targets.json",
        "/metadata/1.timestamp.json",  # timestamps only through timestamp.json
        "/metadata/..%2F..%2Fotaguard.db",
        "/metadata/.hidden.json",
        "/targets/" + "0" * 64 + ".fw.img",
        "/targets/operator-token",
        "/targets/..%2Foperator-token",
    ],
)
def test_unknown_is_404(server: RunningServer, http: urllib3.PoolManager, path: str) -> None:
    resp = http.request("GET", f"{server.base_url}{path}")
    assert resp.status == 404
    assert list(resp.json()) == ["error"]


def test_target_range_request(
    server: RunningServer, http: urllib3.PoolManager, repo: RepoWriter
) -> None:
    blob = f"{hashlib.sha256(FIRMWARE).hexdigest()}.fw-hw1-1.0.0.img"
    url = f"{server.base_url}/targets/{blob}"
    full = http.request("GET", url)
    assert full.status == 200
    assert full.data == FIRMWARE
    part = http.request("GET", url, headers={**http.headers, "Range": "bytes=1000-1099"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 1000-1099/{len(FIRMWARE)}"
    assert part.data == FIRMWARE[1000:1100]
    tail = http.request(
        "GET", url, headers={**http.headers, "Range": f"bytes={len(FIRMWARE) - 10}-"}
    )
    assert tail.status == 206
    assert tail.data == FIRMWARE[-10:]
    beyond = http.request("GET", url, headers={**http.headers, "Range": f"bytes={len(FIRMWARE)}-"})
    assert beyond.status == 416


def _wait_for(check: object, timeout: float = 5.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_repo_change_served_without_restart(
    server: RunningServer, http: urllib3.PoolManager, repo: RepoWriter
) -> None:
    new_fw = b"firmware 1.1.0" * 500
    blob = repo.add_target("fw-hw1-1.1.0.img", new_fw, version="1.1.0")
    repo.rotate_timestamp_key()  # a new root version travels along
    written = repo.publish()
    url = f"{server.base_url}/metadata/timestamp.json"
    _wait_for(lambda: http.request("GET", url).data == written["timestamp.json"])
    for name in ("3.targets.json", "3.snapshot.json", "2.root.json"):
        assert (
            http.request("GET", f"{server.base_url}/metadata/{name}").data
            == (repo.meta_dir / name).read_bytes()
        )
    assert http.request("GET", f"{server.base_url}/targets/{blob}").data == new_fw


def test_repo_mid_write_is_not_served_until_complete(
    server: RunningServer, http: urllib3.PoolManager, repo: RepoWriter
) -> None:
    url = f"{server.base_url}/metadata/timestamp.json"
    served = http.request("GET", url).data
    repo.add_target("fw-hw1-1.2.0.img", b"partial" * 100, version="1.2.0")
    written = repo.publish()
    # Simulate a repository caught mid-write: the timestamp is on disk, its snapshot not.
    snapshot = repo.meta_dir / "3.snapshot.json"
    saved = snapshot.read_bytes()
    snapshot.unlink()
    time.sleep(0.5)  # several sync intervals
    assert http.request("GET", url).data == served
    snapshot.write_bytes(saved)
    _wait_for(lambda: http.request("GET", url).data == written["timestamp.json"])


def _publish(server: RunningServer, repo: RepoWriter, token: str | None = None) -> PublishResult:
    return publish_repository(
        repo.path,
        server_url=server.base_url,
        ca_cert=server.ca_cert,
        token=token if token is not None else server.operator_token,
    )


def test_publish_via_client(bare_server: RunningServer, repo: RepoWriter) -> None:
    result = _publish(bare_server, repo)
    assert result.uploaded == (f"{hashlib.sha256(FIRMWARE).hexdigest()}.fw-hw1-1.0.0.img",)
    assert result.timestamp == "2.timestamp.json"
    with _pool(bare_server) as http:
        for name in ("1.root.json", "root.json", "2.snapshot.json", "2.targets.json"):
            resp = http.request("GET", f"{bare_server.base_url}/metadata/{name}")
            assert resp.data == (repo.meta_dir / name).read_bytes()
        ts = http.request("GET", f"{bare_server.base_url}/metadata/timestamp.json")
        assert ts.data == (repo.meta_dir / "timestamp.json").read_bytes()
    # Publishing again is idempotent: nothing uploaded, nothing added.
    again = _publish(bare_server, repo)
    assert again.uploaded == ()
    assert again.added == ()
    assert again.timestamp is None


@pytest.mark.parametrize("token", ["", "wrong-token-wrong-token-wrong"])
def test_operator_api_needs_token(bare_server: RunningServer, repo: RepoWriter, token: str) -> None:
    with _pool(bare_server) as http:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = http.request(
            "POST", f"{bare_server.base_url}/api/v1/publish", body=b"{}", headers=headers
        )
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert resp.json() == {"error": "operator token missing or wrong"}
        put = http.request(
            "PUT",
            f"{bare_server.base_url}/api/v1/blobs/{'a' * 64}.x.img",
            body=b"x",
            headers=headers,
        )
        assert put.status == 401
    with pytest.raises(OperatorError, match="operator token"):
        _publish(bare_server, repo, token="not-the-token-not-the-token")


def test_blob_with_wrong_hash_is_refused(bare_server: RunningServer) -> None:
    name = f"{hashlib.sha256(b'the real content').hexdigest()}.fw.img"
    auth = {"Authorization": f"Bearer {bare_server.operator_token}"}
    with _pool(bare_server) as http:
        bad = http.request(
            "PUT", f"{bare_server.base_url}/api/v1/blobs/{name}", body=b"evil", headers=auth
        )
        assert bad.status == 422
        assert "sha256" in bad.json()["error"]
        assert http.request("HEAD", f"{bare_server.base_url}/targets/{name}").status == 404
        good = http.request(
            "PUT",
            f"{bare_server.base_url}/api/v1/blobs/{name}",
            body=b"the real content",
            headers=auth,
        )
        assert good.status == 200
        assert good.json()["length"] == len(b"the real content")
        invalid = http.request(
            "PUT", f"{bare_server.base_url}/api/v1/blobs/not-a-blob-name", body=b"x", headers=auth
        )
        # refused by the name's pattern in the API schema (the schema tells the truth)
        assert invalid.status == 422
        assert "invalid request" in invalid.json()["error"]
    assert sorted(p.name for p in (bare_server.data_dir / "blobs").iterdir()) == [name]


def test_publish_timestamp_without_snapshot_is_refused(
    bare_server: RunningServer, repo: RepoWriter
) -> None:
    _publish(bare_server, repo)
    ts_url = f"{bare_server.base_url}/metadata/timestamp.json"
    with _pool(bare_server) as http:
        before = http.request("GET", ts_url).data
        written = repo.publish()  # new targets, snapshot and timestamp
        files = {"timestamp.json": written["timestamp.json"]}  # ...but only the timestamp
        body = json.dumps({"metadata": {k: base64.b64encode(v).decode() for k, v in files.items()}})
        resp = http.request(
            "POST",
            f"{bare_server.base_url}/api/v1/publish",
            body=body.encode(),
            headers={
                "Authorization": f"Bearer {bare_server.operator_token}",
                "Content-Type": "application/json",
            },
        )
        assert resp.status == 422
        assert "3.snapshot.json" in resp.json()["error"]
        assert http.request("GET", ts_url).data == before
        assert http.request("GET", f"{bare_server.base_url}/metadata/3.targets.json").status == 404


def test_publish_missing_blob_is_refused(bare_server: RunningServer, repo: RepoWriter) -> None:
    _publish(bare_server, repo)
    blob = repo.add_target("fw-hw1-2.0.0.img", b"two" * 100, version="2.0.0")
    repo.publish()
    (repo.targets_dir / blob).unlink()
    with pytest.raises(OperatorError, match="cannot read blob"):
        _publish(bare_server, repo)


def test_tls_is_verified(server: RunningServer, repo: RepoWriter, tmp_path: Path) -> None:
    # A client with only the system trust store refuses the fleet CA's certificate...
    with (
        urllib3.PoolManager(cert_reqs="CERT_REQUIRED", retries=False, timeout=5) as plain,
        pytest.raises(urllib3.exceptions.SSLError),
    ):
        plain.request("GET", f"{server.base_url}/healthz")
    # ...and so does the publish client given another CA: the token is never sent.
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    with pytest.raises(TransportError):
        publish_repository(
            repo.path,
            server_url=server.base_url,
            ca_cert=other.cert_path,
            token=server.operator_token,
        )


def test_operator_token_file_is_private(server: RunningServer) -> None:
    # The data directory (token, CA key, database) is created owner-only, not tightened later.
    assert stat.S_IMODE(os.stat(server.data_dir).st_mode) == 0o700
    token_file = server.data_dir / "operator-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() == server.operator_token
    assert len(server.operator_token) >= 43


def test_verification_error_reason_reaches_the_client(
    bare_server: RunningServer, tmp_path: Path
) -> None:
    expired = RepoWriter(tmp_path / "expired", expires_in=dt.timedelta(0))
    time.sleep(1.1)
    with pytest.raises(VerificationError, match="expired"):
        publish_repository(
            expired.path,
            server_url=bare_server.base_url,
            ca_cert=bare_server.ca_cert,
            token=bare_server.operator_token,
        )


def _post(server: RunningServer, files: dict[str, bytes]) -> urllib3.BaseHTTPResponse:
    body = json.dumps({"metadata": {k: base64.b64encode(v).decode() for k, v in files.items()}})
    with _pool(server) as http:
        return http.request(
            "POST",
            f"{server.base_url}/api/v1/publish",
            body=body.encode(),
            headers={
                "Authorization": f"Bearer {server.operator_token}",
                "Content-Type": "application/json",
            },
        )


def test_concurrent_publishes_conflict_and_the_loser_retries(
    bare_server: RunningServer, repo: RepoWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two release jobs publish at once: one commits, the other gets 409 and retries."""
    monkeypatch.setattr(otaguard.server.client, "CONFLICT_BACKOFF_SECONDS", 0.01)
    # Both requests finish every check before either commits (the race, made certain).
    both_checked = threading.Barrier(2, timeout=10)
    real_check = otaguard.server.publish._check_reachable
    calls: list[int] = []

    def rendezvous(*args: Any) -> None:
        real_check(*args)
        calls.append(1)
        if len(calls) <= 2:
            both_checked.wait()

    monkeypatch.setattr(otaguard.server.publish, "_check_reachable", rendezvous)
    conflicts: list[str] = []
    real_publish = otaguard.server.publish.publish_files

    def count_conflicts(*args: Any, **kw: Any) -> Any:
        try:
            return real_publish(*args, **kw)
        except ConflictError as e:
            conflicts.append(str(e))
            raise

    monkeypatch.setattr(otaguard.server.app, "publish_files", count_conflicts)
    results: list[PublishResult] = []
    errors: list[BaseException] = []

    def job() -> None:
        try:
            results.append(_publish(bare_server, repo))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert conflicts == ["a concurrent publish moved the timestamp; retry"]
    assert len(calls) == 3  # two racing checks, one retry
    # One job published the release; the other's retry found it already served.
    assert sorted(r.timestamp or "" for r in results) == ["", "2.timestamp.json"]
    with _pool(bare_server) as http:
        ts = http.request("GET", f"{bare_server.base_url}/metadata/timestamp.json")
    assert ts.data == (repo.meta_dir / "timestamp.json").read_bytes()


def test_publish_client_gives_up_on_persistent_conflict(
    bare_server: RunningServer, repo: RepoWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otaguard.server.client, "CONFLICT_BACKOFF_SECONDS", 0.0)
    attempts: list[int] = []

    def always_loses(*_args: Any, **_kw: Any) -> Any:
        attempts.append(1)
        raise ConflictError("a concurrent publish moved the timestamp; retry")

    monkeypatch.setattr(otaguard.server.app, "publish_files", always_loses)
    assert _post(bare_server, {"timestamp.json": b"{}"}).status == 409
    attempts.clear()
    with pytest.raises(ConflictError, match=r"moved the timestamp.*gave up after 4 attempts"):
        _publish(bare_server, repo)
    assert len(attempts) == otaguard.server.client.PUBLISH_ATTEMPTS == 4


@pytest.mark.parametrize(
    "case",
    [
        (NotReadyError("the repository is being written"), "2", NotReadyError),
        (ServerStorageError("metadata database read failed"), None, TransportError),
    ],
    ids=["not-ready", "storage"],
)
def test_server_faults_are_503(
    bare_server: RunningServer,
    repo: RepoWriter,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[Exception, str | None, type[Exception]],
) -> None:
    error, retry_after, client_error = case

    def fails(*_args: Any, **_kw: Any) -> Any:
        raise error

    monkeypatch.setattr(otaguard.server.app, "publish_files", fails)
    resp = _post(bare_server, {"timestamp.json": b"{}"})
    assert resp.status == 503
    assert resp.headers.get("Retry-After") == retry_after
    assert str(error) in resp.json()["error"]
    with pytest.raises(client_error, match=str(error)):
        _publish(bare_server, repo)


def test_refusal_is_422_and_changes_nothing(bare_server: RunningServer, repo: RepoWriter) -> None:
    _publish(bare_server, repo)
    repo.timestamp.signed.version += 1
    repo.timestamp.signed.expires = dt.datetime.now(dt.UTC).replace(microsecond=0)
    resp = _post(bare_server, {"timestamp.json": repo.sign(repo.timestamp, "timestamp")})
    assert resp.status == 422
    assert "ExpiredMetadataError" in resp.json()["error"]
