"""publish_files against a real database (SQLite and PostgreSQL) and blob directory (no HTTP)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from sqlalchemy.engine import Engine
from test_server_support import RepoWriter
from tuf.api.metadata import Metadata, MetaFile, Root, Targets
from tuf.ngclient import Updater

from otaguard.model import Unsafe
from otaguard.model.errors import ConflictError, VerificationError
from otaguard.repo import ImageRepository
from otaguard.server._repo_dir import read_current_set
from otaguard.server.publish import _served_cache, publish_files
from otaguard.server.storage import (
    FileBlobStore,
    MetadataRecord,
    PublishOutcome,
    SQLMetadataStore,
)
from otaguard.server.sync import RepoSync
from sbom_support import sbom_beside

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def stores(db_engine: Engine, tmp_path: Path) -> Iterator[tuple[SQLMetadataStore, FileBlobStore]]:
    # db_engine: every test here runs on SQLite and on PostgreSQL.
    store = SQLMetadataStore(db_engine)
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
    with pytest.raises(
        VerificationError,
        match=r"root 2\.root\.json: UnsignedMetadataError: root was signed by 0/1",
    ):
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
    with pytest.raises(ConflictError, match="concurrent publish moved the timestamp"):
        store.publish([], timestamp=rec.filename, now=NOW, expected_timestamp=None)


def test_sync_imports_and_skips_mid_write(
    stores: tuple[SQLMetadataStore, FileBlobStore],
    repo: RepoWriter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="otaguard")
    store, blobs = stores
    sync = RepoSync(repo.path, store=store, blobs=blobs, interval=60)
    assert sync.check_once()
    assert not sync.check_once()  # unchanged timestamp: nothing to do
    content = b"image" * 100
    blob = repo.add_target("fw.img", content)
    repo.publish()
    (repo.meta_dir / "2.snapshot.json").rename(repo.meta_dir / "snapshot.hold")
    assert not sync.check_once()  # mid-write: retried later
    assert not sync.check_once()  # ...every time, quietly
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
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


def _served_timestamp(store: SQLMetadataStore) -> str | None:
    rec = store.current_timestamp()
    return rec.filename if rec is not None else None


def _resign_timestamp(repo: RepoWriter, **changes: Any) -> bytes:
    for name, value in changes.items():
        setattr(repo.timestamp.signed, name, value)
    return repo.sign(repo.timestamp, "timestamp")


def test_expired_timestamp_is_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    expired = _resign_timestamp(repo, version=2, expires=NOW - dt.timedelta(minutes=1))
    with pytest.raises(
        VerificationError,
        match=r"timestamp timestamp\.json: ExpiredMetadataError: timestamp\.json is expired",
    ):
        publish_files(store, blobs, {"timestamp.json": expired}, now=NOW)
    assert _served_timestamp(store) == "1.timestamp.json"


def test_snapshot_rolling_back_targets_is_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    """Snapshot 3 names targets 1 while devices already trust targets 2."""
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    repo.publish()
    publish_files(store, blobs, _current(repo), now=NOW)
    repo.snapshot.signed.version = 3
    repo.snapshot.signed.meta["targets.json"] = MetaFile(version=1)
    snapshot = repo.sign(repo.snapshot, "snapshot")
    timestamp = _resign_timestamp(
        repo, version=3, snapshot_meta=MetaFile.from_data(3, snapshot, ["sha256"])
    )
    files = {"3.snapshot.json": snapshot, "timestamp.json": timestamp}
    with pytest.raises(
        VerificationError,
        match=r"up to date .*snapshot 3\.snapshot\.json: BadVersionNumberError",
    ):
        publish_files(store, blobs, files, now=NOW)
    assert _served_timestamp(store) == "2.timestamp.json"
    assert store.get("3.snapshot.json") is None


@pytest.fixture
def hybrid(tmp_path: Path) -> ImageRepository:
    """The production layout: hybrid ed25519 + ML-DSA-65 root and targets, threshold 2."""
    repo = ImageRepository.init(
        tmp_path / "hybrid", keys_dir=tmp_path / "hybrid-keys", passphrases=Unsafe.PLAINTEXT_KEYS
    )
    image = tmp_path / "fw.img"
    image.write_bytes(b"firmware" * 64)
    repo.add_release(
        image,
        sbom=sbom_beside(image),
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
    )
    return repo


def _publish_dir(store: SQLMetadataStore, blobs: FileBlobStore, repo_dir: Path) -> PublishOutcome:
    current = read_current_set(repo_dir)
    for blob in current.blobs:
        blobs.put_chunks(blob.name, [blob.path.read_bytes()], max_length=10**6)
    return publish_files(store, blobs, current.metadata, now=NOW)


@pytest.mark.parametrize("key", [0, 1], ids=["only-ed25519", "only-ml-dsa-65"])
def test_targets_signed_below_threshold_are_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], hybrid: ImageRepository, key: int
) -> None:
    """One half of the hybrid targets key, with valid snapshot and timestamp: refused."""
    store, blobs = stores
    _publish_dir(store, blobs, hybrid.dir)
    md: Metadata[Targets] = hybrid._latest("targets", Targets)
    md.signed.version += 1
    md.signatures.clear()
    md.sign(hybrid._role_signers("targets")[key])
    (hybrid.metadata_dir / f"{md.signed.version}.targets.json").write_bytes(md.to_bytes())
    hybrid._write_snapshot_and_timestamp(md, now=NOW)
    served = _served_timestamp(store)
    with pytest.raises(VerificationError) as info:
        _publish_dir(store, blobs, hybrid.dir)
    message = str(info.value)
    assert "targets 3.targets.json: UnsignedMetadataError" in message
    assert "signed by 1/2 keys" in message
    assert _served_timestamp(store) == served
    assert store.get("3.targets.json") is None


def test_root_signed_below_the_old_threshold_is_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], hybrid: ImageRepository
) -> None:
    """A new root signed by one of the two current root keys cannot take over."""
    store, blobs = stores
    _publish_dir(store, blobs, hybrid.dir)
    root: Metadata[Root] = hybrid._latest("root", Root)
    root.signed.version = 2
    root.sign(hybrid._role_signers("root")[0])
    (hybrid.metadata_dir / "2.root.json").write_bytes(root.to_bytes())
    with pytest.raises(
        VerificationError,
        match=r"root 2\.root\.json: UnsignedMetadataError: root was signed by 1/2 keys",
    ):
        _publish_dir(store, blobs, hybrid.dir)
    newest = store.newest("root")
    assert newest is not None and newest.version == 1


def test_unreachable_file_is_refused(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter
) -> None:
    """A versioned file no timestamp leads to would block its name unverified."""
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    repo.targets.signed.version = 7
    stray = repo.sign(repo.targets, "targets")
    with pytest.raises(VerificationError, match=r"7\.targets\.json is not reached"):
        publish_files(store, blobs, {**_current(repo), "7.targets.json": stray}, now=NOW)
    assert store.get("7.targets.json") is None


def test_pointer_moved_between_check_and_commit_is_a_conflict(
    stores: tuple[SQLMetadataStore, FileBlobStore],
    repo: RepoWriter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    rival = {"timestamp.json": _resign_timestamp(repo, version=2)}
    ours = repo.publish()  # timestamp 3, snapshot 2, targets 2: verified against timestamp 1
    real_publish = store.publish

    def rival_commits_first(records: Sequence[MetadataRecord], **kw: Any) -> PublishOutcome:
        monkeypatch.setattr(store, "publish", real_publish)
        publish_files(store, blobs, rival, now=NOW)
        return real_publish(records, **kw)

    monkeypatch.setattr(store, "publish", rival_commits_first)
    with pytest.raises(ConflictError, match="concurrent publish moved the timestamp"):
        publish_files(store, blobs, ours, now=NOW)
    assert _served_timestamp(store) == "2.timestamp.json"
    assert store.get("3.timestamp.json") is None
    # Retrying re-verifies against what is served now, and succeeds.
    assert publish_files(store, blobs, ours, now=NOW).timestamp_filename == "3.timestamp.json"


def test_served_cache_is_what_an_up_to_date_device_holds(
    stores: tuple[SQLMetadataStore, FileBlobStore], repo: RepoWriter, tmp_path: Path
) -> None:
    """The second simulated device's cache equals a real ngclient's after a refresh."""
    from test_verify_like_a_device import _MemoryFetcher

    store, blobs = stores
    publish_files(store, blobs, _current(repo), now=NOW)
    repo.rotate_timestamp_key()
    repo.publish()
    publish_files(store, blobs, _current(repo), now=NOW)
    current = store.current_timestamp()
    assert current is not None
    device = tmp_path / "device"
    device.mkdir()
    served = {**_current(repo), "1.root.json": repo.files()["1.root.json"]}
    Updater(
        str(device),
        "https://repo.invalid/metadata/",
        fetcher=_MemoryFetcher(served),
        bootstrap=served["1.root.json"],
    ).refresh()
    cache = _served_cache(store, current)
    assert cache == {
        name: (device / name).read_bytes()
        for name in ("timestamp.json", "snapshot.json", "targets.json")
    }


def test_sync_logs_a_refused_repository_once_then_serves_the_next_release(
    stores: tuple[SQLMetadataStore, FileBlobStore],
    repo: RepoWriter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A target name the server cannot serve: one ERROR line, no retry loop, no lock-up."""
    caplog.set_level(logging.DEBUG, logger="otaguard")
    store, blobs = stores
    repo.add_target("fw+beta.img", b"beta" * 100)
    repo.publish()
    sync = RepoSync(repo.path, store=store, blobs=blobs, interval=0.02)
    sync.start()
    try:
        time.sleep(0.4)  # about twenty sync intervals
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) == 1, [r.getMessage() for r in loud]
        assert loud[0].levelno == logging.ERROR
        assert "'fw+beta.img' has no servable name" in loud[0].getMessage()
        assert "\n" not in loud[0].getMessage()
        assert loud[0].exc_info is None
        assert store.current_timestamp() is None

        del repo.targets.signed.targets["fw+beta.img"]
        repo.add_target("fw-1.1.0.img", b"good" * 100, version="1.1.0")
        repo.publish()
        want = (repo.meta_dir / "timestamp.json").read_bytes()
        deadline = time.monotonic() + 5
        while (rec := store.current_timestamp()) is None or rec.data != want:
            assert time.monotonic() < deadline, "the good release was not served"
            time.sleep(0.02)
    finally:
        sync.stop()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
