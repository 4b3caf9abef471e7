"""Pure parts of the server: names, the file blob store, the operator token, settings."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest

import otaguard.server
import otaguard.server.storage
from otaguard.model.errors import ConfigError, VerificationError
from otaguard.server import ServerSettings
from otaguard.server._names import blob_name, parse_blob_name, parse_metadata_name
from otaguard.server.app import DATA_DIR_MODE, create_app
from otaguard.server.auth import load_or_create_operator_token, token_matches
from otaguard.server.storage import FileBlobStore

SHA = hashlib.sha256(b"content").hexdigest()


@pytest.mark.parametrize(
    ("name", "role", "version"),
    [
        ("timestamp.json", "timestamp", None),
        ("root.json", "root", None),
        ("1.root.json", "root", 1),
        ("42.snapshot.json", "snapshot", 42),
        ("7.fw-hw1_role.json", "fw-hw1_role", 7),
    ],
)
def test_metadata_names(name: str, role: str, version: int | None) -> None:
    parsed = parse_metadata_name(name)
    assert parsed is not None
    assert (parsed.role, parsed.version) == (role, version)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".json",
        "0.root.json",
        "01.root.json",
        "-1.root.json",
        "../root.json",
        "a/b.json",
        ".hidden.json",
        "root.json.tmp",
        "1.root.JSON",
        "1" * 19 + ".root.json",
        "1.root.json\n",
    ],
)
def test_bad_metadata_names(name: str) -> None:
    assert parse_metadata_name(name) is None


def test_blob_names() -> None:
    assert parse_blob_name(f"{SHA}.fw-1.0.img") == (SHA, "fw-1.0.img")
    for bad in (
        f"{SHA}",
        f"{SHA}.",
        f"{SHA}..",
        f"{SHA}../x",
        f"{SHA}.a/b",
        f"{SHA.upper()}.x",
        f"{SHA[:-1]}.x",
        f"{SHA}.x\n",
        f"{SHA}.{'a' * 201}",
    ):
        assert parse_blob_name(bad) is None, bad
    with pytest.raises(VerificationError):
        blob_name(SHA, "dir/fw.img")


def test_blob_store_verifies_and_is_atomic(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    name = f"{SHA}.fw.img"
    with pytest.raises(VerificationError, match="sha256"):
        store.put_chunks(name, [b"cont", b"ent!"], max_length=100)
    assert store.stat(name) is None
    assert os.listdir(store.directory) == []  # no temp file left behind
    info = store.put_chunks(name, [b"cont", b"ent"], max_length=100)
    assert (info.length, info.sha256) == (7, SHA)
    assert store.stat(name) == info
    assert store.local_path(name) == store.directory / name
    assert (store.directory / name).read_bytes() == b"content"
    # Idempotent re-upload.
    assert store.put_chunks(name, [b"content"], max_length=100) == info


def test_blob_store_caps_size_and_names(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    with pytest.raises(VerificationError, match="size cap"):
        store.put_chunks(f"{SHA}.fw.img", [b"content"], max_length=6)
    assert os.listdir(store.directory) == []
    with pytest.raises(VerificationError, match="not a blob name"):
        store.writer("../../etc/passwd", max_length=10)
    assert store.stat("../../etc/passwd") is None
    assert store.local_path("operator-token") is None


def test_operator_token(tmp_path: Path) -> None:
    token = load_or_create_operator_token(tmp_path)
    path = tmp_path / "operator-token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(token) >= 43
    assert load_or_create_operator_token(tmp_path) == token  # stable across restarts
    assert token_matches(token, token)
    assert not token_matches(None, token)
    assert not token_matches(token[:-1], token)
    assert not token_matches("ü" + token, token)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="other users"):
        load_or_create_operator_token(tmp_path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="operator token"):
        load_or_create_operator_token(tmp_path)


def test_settings_validation(tmp_path: Path) -> None:
    s = ServerSettings(data_dir=tmp_path, repo_dir=None)
    assert (s.host, s.port, s.insecure_http) == ("127.0.0.1", 8443, False)
    with pytest.raises(ValueError, match="port"):
        ServerSettings(data_dir=tmp_path, repo_dir=None, port=70000)
    with pytest.raises(ValueError, match="sync_interval"):
        ServerSettings(data_dir=tmp_path, repo_dir=None, sync_interval=0)


@pytest.mark.parametrize("module", [otaguard.server, otaguard.server.storage])
def test_exported_members(module: object) -> None:
    exported = module.__all__  # type: ignore[attr-defined]
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert getattr(module, name) is not None


def _start_app(data_dir: Path) -> None:
    app = create_app(ServerSettings(data_dir=data_dir, repo_dir=None))
    app.state.store.close()


def test_new_data_dir_is_owner_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="otaguard")
    data_dir = tmp_path / "srv" / "data"
    _start_app(data_dir)
    assert DATA_DIR_MODE == 0o700
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert not caplog.records


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_wide_data_dir_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    caplog.set_level(logging.WARNING, logger="otaguard")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(mode)
    _start_app(data_dir)
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"had mode {mode:04o}; tightening it to 0700" in record.getMessage()
