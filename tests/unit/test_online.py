"""The server's online roles: pure builders, the re-sign decision, settings."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Role, Root, Snapshot, Timestamp

from otaguard.model import ConfigError, VerificationError
from otaguard.server import ServerSettings
from otaguard.server.online import (
    OnlineLifetimes,
    OnlineSigner,
    Served,
    ensure_online_key,
    refreshed,
    snapshot_for_targets,
)

NOW = dt.datetime(2030, 1, 1, 12, 0, 0, 500_000, tzinfo=dt.UTC)
LIFETIMES = OnlineLifetimes(timestamp=dt.timedelta(hours=1), snapshot=dt.timedelta(hours=10))
NOTHING = Served(None, None, 0, 0)


@pytest.fixture(scope="module")
def key() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def _verified(data: bytes, key: CryptoSigner) -> Metadata:  # type: ignore[type-arg]
    md: Metadata = Metadata.from_bytes(data)  # type: ignore[type-arg]
    key.public_key.verify_signature(md.signatures[key.public_key.keyid], md.signed_bytes)
    return md


def _served(files: dict[str, bytes], before: Served | None = None) -> Served:
    snap_name = next(n for n in files if n.endswith(".snapshot.json"))
    return Served(
        files["timestamp.json"],
        files[snap_name],
        (before.newest_timestamp_version if before else 0) + 1,
        int(snap_name.split(".")[0]),
    )


def test_first_snapshot_and_timestamp(key: CryptoSigner) -> None:
    files = snapshot_for_targets(NOTHING, 3, signer=key, now=NOW, lifetimes=LIFETIMES)
    assert sorted(files) == ["1.snapshot.json", "timestamp.json"]
    snap = _verified(files["1.snapshot.json"], key)
    assert isinstance(snap.signed, Snapshot)
    assert snap.signed.meta["targets.json"].version == 3
    # Expiry rounded up to the second metadata can express, never shorter than asked.
    assert snap.signed.expires == dt.datetime(2030, 1, 1, 22, 0, 1, tzinfo=dt.UTC)
    ts = _verified(files["timestamp.json"], key)
    assert isinstance(ts.signed, Timestamp)
    assert ts.signed.version == 1
    meta = ts.signed.snapshot_meta
    assert meta.version == 1 and meta.length == len(files["1.snapshot.json"])
    assert meta.hashes == {"sha256": hashlib.sha256(files["1.snapshot.json"]).hexdigest()}


def test_new_targets_bump_both_and_never_roll_back(key: CryptoSigner) -> None:
    first = snapshot_for_targets(NOTHING, 3, signer=key, now=NOW, lifetimes=LIFETIMES)
    served = _served(first)
    assert served.targets_version() == 3
    second = snapshot_for_targets(served, 4, signer=key, now=NOW, lifetimes=LIFETIMES)
    assert sorted(second) == ["2.snapshot.json", "timestamp.json"]
    assert Metadata.from_bytes(second["timestamp.json"]).signed.version == 2
    with pytest.raises(VerificationError, match="does not sign a rollback"):
        snapshot_for_targets(served, 2, signer=key, now=NOW, lifetimes=LIFETIMES)


def test_refresh_at_half_life(key: CryptoSigner) -> None:
    served = _served(snapshot_for_targets(NOTHING, 3, signer=key, now=NOW, lifetimes=LIFETIMES))
    half_ts = LIFETIMES.timestamp / 2
    assert (
        refreshed(
            served, signer=key, now=NOW + half_ts - dt.timedelta(seconds=2), lifetimes=LIFETIMES
        )
        == {}
    )
    # Timestamp due: a new timestamp naming the same snapshot bytes.
    files = refreshed(
        served, signer=key, now=NOW + half_ts + dt.timedelta(seconds=2), lifetimes=LIFETIMES
    )
    assert sorted(files) == ["timestamp.json"]
    ts = _verified(files["timestamp.json"], key)
    assert isinstance(ts.signed, Timestamp)
    assert ts.signed.version == 2
    assert served.snapshot is not None
    ts.signed.snapshot_meta.verify_length_and_hashes(served.snapshot)
    # Snapshot due (and an expired timestamp, after downtime): both, same content.
    late = NOW + LIFETIMES.snapshot
    files = refreshed(served, signer=key, now=late, lifetimes=LIFETIMES)
    assert sorted(files) == ["2.snapshot.json", "timestamp.json"]
    snap = _verified(files["2.snapshot.json"], key)
    assert isinstance(snap.signed, Snapshot)
    assert snap.signed.meta["targets.json"].version == 3
    assert not snap.signed.is_expired(late)
    assert refreshed(NOTHING, signer=key, now=late, lifetimes=LIFETIMES) == {}


def test_signs_only_when_root_names_its_key_alone(key: CryptoSigner) -> None:
    online = OnlineSigner(key, lifetimes=LIFETIMES)
    root = Root()
    other = CryptoSigner.generate_ed25519().public_key
    for role in ("snapshot", "timestamp"):
        root.roles[role] = Role([key.public_key.keyid], threshold=1)
    assert online.signs_for(root)
    root.roles["timestamp"] = Role([other.keyid], threshold=1)
    assert not online.signs_for(root)
    root.roles["timestamp"] = Role([key.public_key.keyid, other.keyid], threshold=2)
    assert not online.signs_for(root)


def test_online_key_files(tmp_path: Path) -> None:
    files = ensure_online_key(tmp_path / "data")
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    assert files.private_key.stat().st_mode & 0o777 == 0o600
    assert ensure_online_key(tmp_path / "data").public_key == files.public_key
    files.private_key.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        ensure_online_key(tmp_path / "data")


def test_lifetime_settings(tmp_path: Path) -> None:
    s = ServerSettings(data_dir=tmp_path, repo_dir=None)
    assert s.timestamp_expiry == dt.timedelta(days=1)
    assert s.snapshot_expiry == dt.timedelta(days=7)
    assert s.online_key_uri is None
    with pytest.raises(ValueError, match="timestamp_expiry"):
        ServerSettings(data_dir=tmp_path, repo_dir=None, timestamp_expiry=dt.timedelta(seconds=1))
    with pytest.raises(ValueError, match="shorter"):
        ServerSettings(
            data_dir=tmp_path,
            repo_dir=None,
            timestamp_expiry=dt.timedelta(hours=2),
            snapshot_expiry=dt.timedelta(hours=1),
        )
