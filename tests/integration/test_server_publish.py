"""publish_files against a real SQLite database and blob directory (no HTTP)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from test_server_support import RepoWriter

from otaguard.model.errors import VerificationError
from otaguard.server.publish import publish_files
from otaguard.server.storage import FileBlobStore, SQLMetadataStore, sqlite_url
from otaguard.server.sync import RepoSync

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[SQLMetadataStore, FileBlobStore]]:
    store = SQLMetadataStore(sqlite_url(tmp_path / "otaguard.db"))
    try:
        yield store, FileBlobStore(tmp_path / "blobs")
    finally:
        store.close()


@pytest.fixture
def repo(tmp_path: Path) -> RepoWriter:
    return RepoWriter(tmp_path / "repo")


def _current(repo: RepoWriter) -> dict[str, bytes]:
    files = repo.files()
    ts = files["timestamp.json"]
    sv = max(int(n.split(".")[0]) for n in files if n.endswith(".snapshot.json"))
    tv = max(int(n.split(".")[0]) for n in files if n.endswith(".targets.json"))
    roots = {n: d for n, d in files.items() if n.endswith(".root.json") and n[0].isdigit()}
    return {
        "timestamp.json": ts,
        f"{sv}.snapshot.json": files[f"{sv}.snapshot.json"],
        f"{tv}.targets.json": files[f"{tv}.targets.json"],
        **roots,
    }


def _upload(blobs: FileBlobStore, repo: RepoWriter) -> None:
    for path in repo.targets_dir.iterdir():
        blobs.put_chunks(path.name, [path.read_bytes()], max_length=10**6)


def test_publish_is_idempotent_and_versioned_files_immutable(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    first = publish_files(store, blobs, _current(repo), now=NOW)
    assert set(first.added) == {
        "1.root.json",
        "1.targets.json",
        "1.snapshot.json",
        "1.timestamp.json",
    }
    assert first.timestamp_filename == "1.timestamp.json"
    again = publish_files(store, blobs, _current(repo), now=NOW)
    assert again.added == ()
    assert again.timestamp_filename is None
    # Same version, different bytes (re-signed with a changed expiry): refused.
    repo.targets.signed.expires += dt.timedelta(days=1)
    forged = dict(_current(repo))
    forged["1.targets.json"] = repo.sign(repo.targets, "targets")
    with pytest.raises(VerificationError):
        publish_files(store, blobs, forged, now=NOW)
    assert store.get("1.targets.json") == repo.files()["1.targets.json"]


def test_targets_need_their_blobs_first(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    repo.add_target("fw.img", b"firmware")
    repo.publish()
    with pytest.raises(VerificationError, match="no uploaded blob"):
        publish_files(store, blobs, _current(repo), now=NOW)
    current = store.current_timestamp()
    assert current is not None
    assert current.filename == "1.timestamp.json"
    _upload(blobs, repo)
    assert publish_files(store, blobs, _current(repo), now=NOW).timestamp_filename == (
        "2.timestamp.json"
    )


def test_blob_length_must_match(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    repo.add_target("fw.img", b"firmware")
    repo.publish()
    _upload(blobs, repo)
    # A target entry claiming another length for the same hash cannot be served.
    repo.targets.signed.targets["fw.img"].length = 9
    repo.publish()
    with pytest.raises(VerificationError, match="has 8 bytes"):
        publish_files(store, blobs, _current(repo), now=NOW)


def test_timestamp_rollback_and_forgeries_are_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    old = _current(repo)
    repo.publish()
    publish_files(store, blobs, _current(repo), now=NOW)
    # Valid on its own (a device fresh from the factory accepts it), but a rollback for
    # every device that already trusts timestamp 2.
    with pytest.raises(VerificationError, match=r"up to date.*BadVersionNumberError.*>= 2"):
        publish_files(store, blobs, old, now=NOW)
    # A timestamp signed by a key the root does not list.
    repo.signers["timestamp"] = CryptoSigner.generate_ed25519()
    with pytest.raises(
        VerificationError, match=r"timestamp timestamp\.json: UnsignedMetadataError: .*0/1"
    ):
        publish_files(store, blobs, repo.publish(), now=NOW)
    current = store.current_timestamp()
    assert current is not None
    assert current.filename == "2.timestamp.json"


def test_timestamp_only_refresh_uses_stored_snapshot(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    repo.timestamp.signed.version += 1
    ts = repo.sign(repo.timestamp, "timestamp")
    outcome = publish_files(store, blobs, {"timestamp.json": ts}, now=NOW)
    assert outcome.added == ("2.timestamp.json",)


def test_root_rotation_must_chain(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    # A "new root" signed only by an attacker's key.
    repo.signers["root"] = CryptoSigner.generate_ed25519()
    repo.root.signed.version += 1
    files = {"2.root.json": repo.sign(repo.root, "root"), **repo.publish()}
    with pytest.raises(VerificationError, match=r"2\.root\.json"):
        publish_files(store, blobs, files, now=NOW)
    newest = store.newest("root")
    assert newest is not None
    assert newest.version == 1


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"timestamp.json": b"{}"},
        {"1.timestamp.json": b"{}"},
        {"targets.json": b"{}"},
        {"1.delegated.json": b"{}"},
        {"../1.root.json": b"{}"},
        {"1.root.json": b"not json"},
    ],
)
def test_malformed_publications(
    stores: tuple[SQLMetadataStore, FileBlobStore], files: dict[str, bytes]
) -> None:
    store, blobs = stores
    with pytest.raises(VerificationError):
        publish_files(store, blobs, files, now=NOW)
    assert store.current_timestamp() is None


def test_root_alias_must_match(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    files = {**_current(repo), "root.json": b'{"signed": {}, "signatures": []}'}
    with pytest.raises(VerificationError):
        publish_files(store, blobs, files, now=NOW)
    files["root.json"] = repo.files()["root.json"]
    assert publish_files(store, blobs, files, now=NOW).timestamp_filename


def test_concurrent_pointer_move_is_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    rec = store.current_timestamp()
    assert rec is not None
    with pytest.raises(VerificationError, match="concurrent"):
        store.publish([], timestamp=rec.filename, now=NOW, expected_timestamp=None)


def test_sync_imports_and_skips_mid_write(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    sync = RepoSync(repo.path, store=store, blobs=blobs, interval=60)
    assert sync.check_once()
    assert not sync.check_once()  # unchanged timestamp: nothing to do
    content = b"image" * 100
    blob = repo.add_target("fw.img", content)
    repo.publish()
    (repo.meta_dir / "2.snapshot.json").rename(repo.meta_dir / "snapshot.hold")
    assert not sync.check_once()  # mid-write: retried later
    (repo.meta_dir / "snapshot.hold").rename(repo.meta_dir / "2.snapshot.json")
    assert sync.check_once()
    info = blobs.stat(blob)
    assert info is not None
    assert info.sha256 == hashlib.sha256(content).hexdigest()
    current = store.current_timestamp()
    assert current is not None
    assert current.data == (repo.meta_dir / "timestamp.json").read_bytes()


def test_timestamp_pointing_back_at_an_older_snapshot_is_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    """The reported hole: every device refuses this timestamp, so the server must too."""
    from tuf.api.metadata import MetaFile

    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    repo.publish()
    publish_files(store, blobs, _current(repo), now=NOW)
    served = store.current_timestamp()
    assert served is not None and served.filename == "2.timestamp.json"
    old_snapshot = store.get("1.snapshot.json")
    assert old_snapshot is not None
    # Timestamp v3, validly signed with the repository's timestamp key, naming snapshot 1.
    repo.timestamp.signed.version = 3
    repo.timestamp.signed.snapshot_meta = MetaFile.from_data(1, old_snapshot, ["sha256"])
    forged = repo.sign(repo.timestamp, "timestamp")
    with pytest.raises(VerificationError, match="BadVersionNumberError"):
        publish_files(store, blobs, {"timestamp.json": forged}, now=NOW)
    assert store.current_timestamp() == served
