"""verify_update refuses exactly what python-tuf's ngclient on a device refuses.

Each scenario changes a served repository; two real ngclient ``Updater`` devices (one
fresh from the factory, one that refreshed against the served repository first, so its
cache holds what devices trust now) fetch the result from memory, and so does
:func:`otaguard.repo.verify.verify_update` with the same trust and cache. The outcomes,
and python-tuf's exception class on refusal, must be identical.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from test_server_support import RepoWriter
from tuf.api.exceptions import DownloadError, DownloadHTTPError, RepositoryError
from tuf.api.metadata import MetaFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from otaguard.agent import updater as agent_updater
from otaguard.model.errors import VerificationError
from otaguard.repo.verify import (
    DEVICE_MAX_LENGTHS,
    MAX_ROOT_ROTATIONS,
    check_repository,
    verify_update,
)

Files = dict[str, bytes]


class _MemoryFetcher(FetcherInterface):
    """Serves metadata files from a dict; a missing name is a 404."""

    def __init__(self, files: Files):
        self.files = files

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.rsplit("/", 1)[-1]
        if name not in self.files:
            raise DownloadHTTPError(f"{name} not found", 404)
        return iter([self.files[name]])


def _device_config() -> UpdaterConfig:
    # The limits the agent configures (otaguard.agent.updater.TufSession).
    return agent_updater.updater_config()


def _ngclient(metadata_dir: Path, files: Files, bootstrap: bytes | None) -> str | None:
    """Refresh like a device; ``None`` when accepted, else tuf's exception class."""
    metadata_dir.mkdir(exist_ok=True)
    try:
        Updater(
            str(metadata_dir),
            "https://repo.invalid/metadata/",
            fetcher=_MemoryFetcher(files),
            config=_device_config(),
            bootstrap=bootstrap,
        ).refresh()
    except (RepositoryError, DownloadError) as e:
        return type(e).__name__
    return None


def _ours(trusted_root: bytes, cached: Files | None, remote: Files) -> str | None:
    try:
        verify_update(
            trusted_root=trusted_root,
            cached=cached,
            remote=remote,
            now=dt.datetime.now(dt.UTC),
        )
    except VerificationError as e:
        return type(e.__cause__).__name__ if e.__cause__ else str(e)
    return None


def _device_cache(metadata_dir: Path) -> Files:
    """What ngclient keeps on a device, under the names verify_update takes."""
    cache = {
        name: (metadata_dir / name).read_bytes()
        for name in ("timestamp.json", "snapshot.json", "targets.json")
        if (metadata_dir / name).exists()
    }
    for path in (metadata_dir / "root_history").iterdir():
        cache[path.name] = path.read_bytes()
    return cache


@dataclass(frozen=True)
class Outcome:
    fresh: str | None
    up_to_date: str | None


def _compare(tmp_path: Path, served: Files, candidate: Files) -> Outcome:
    """Run both devices with ngclient and with verify_update; they must agree."""
    factory_root = candidate["1.root.json"]
    fresh_ng = _ngclient(tmp_path / "fresh", candidate, factory_root)
    fresh_ours = _ours(factory_root, None, candidate)
    assert fresh_ours == fresh_ng, "fresh device"

    current = tmp_path / "current"
    assert _ngclient(current, served, served["1.root.json"]) is None
    cache = _device_cache(current)
    newest_root = (current / "root.json").read_bytes()
    ours = _ours(newest_root, cache, candidate)
    theirs = _ngclient(current, candidate, None)  # bootstrap from its cached root
    assert ours == theirs, "device up to date"
    return Outcome(fresh_ng, theirs)


def _served(repo: RepoWriter) -> Files:
    return {n: d for n, d in repo.files().items() if n != "root.json"}


@pytest.fixture
def repo(tmp_path: Path) -> RepoWriter:
    writer = RepoWriter(tmp_path / "repo")
    writer.add_target("fw-1.0.0.img", b"one" * 100)
    writer.publish()
    return writer


def _next_release(repo: RepoWriter) -> None:
    repo.add_target("fw-1.1.0.img", b"two" * 100, version="1.1.0")
    repo.publish()


def _timestamp_to_old_snapshot(repo: RepoWriter) -> None:
    """The reported hole: a new timestamp version naming an older snapshot."""
    old = (repo.meta_dir / "1.snapshot.json").read_bytes()
    repo.timestamp.signed.version += 1
    repo.timestamp.signed.snapshot_meta = MetaFile.from_data(1, old, ["sha256"])
    (repo.meta_dir / "timestamp.json").write_bytes(repo.sign(repo.timestamp, "timestamp"))


def _expired_timestamp(repo: RepoWriter) -> None:
    repo.timestamp.signed.version += 1
    repo.timestamp.signed.expires = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(
        hours=1
    )
    (repo.meta_dir / "timestamp.json").write_bytes(repo.sign(repo.timestamp, "timestamp"))


def _snapshot_rolls_back_targets(repo: RepoWriter) -> None:
    repo.snapshot.signed.version += 1
    repo.snapshot.signed.meta["targets.json"] = MetaFile(version=1)
    sv = repo.snapshot.signed.version
    data = repo.sign(repo.snapshot, "snapshot")
    (repo.meta_dir / f"{sv}.snapshot.json").write_bytes(data)
    repo.timestamp.signed.version += 1
    repo.timestamp.signed.snapshot_meta = MetaFile.from_data(sv, data, ["sha256"])
    (repo.meta_dir / "timestamp.json").write_bytes(repo.sign(repo.timestamp, "timestamp"))


def _targets_signed_by_stranger(repo: RepoWriter) -> None:
    repo.signers["targets"] = CryptoSigner.generate_ed25519()
    _next_release(repo)


def _root_not_signed_by_old_root(repo: RepoWriter) -> None:
    repo.signers["root"] = CryptoSigner.generate_ed25519()
    repo.root.signed.roles["root"].keyids = [repo.signers["root"].public_key.keyid]
    repo.root.signed.keys[repo.signers["root"].public_key.keyid] = repo.signers["root"].public_key
    repo.root.signed.version += 1
    repo.write_root()
    repo.publish()


def _timestamp_key_rotation(repo: RepoWriter) -> None:
    repo.rotate_timestamp_key()
    _next_release(repo)


def _oversized_timestamp(repo: RepoWriter) -> None:
    repo.timestamp.signed.version += 1
    repo.timestamp.signed.unrecognized_fields["padding"] = "x" * DEVICE_MAX_LENGTHS["timestamp"]
    (repo.meta_dir / "timestamp.json").write_bytes(repo.sign(repo.timestamp, "timestamp"))


def _nothing_new(repo: RepoWriter) -> None:
    """The same timestamp again: an up-to-date device keeps what it has."""


SCENARIOS: dict[str, tuple[Callable[[RepoWriter], None], Outcome]] = {
    "next release": (_next_release, Outcome(None, None)),
    "nothing new": (_nothing_new, Outcome(None, None)),
    "timestamp key rotation": (_timestamp_key_rotation, Outcome(None, None)),
    "timestamp names an older snapshot": (
        _timestamp_to_old_snapshot,
        Outcome(None, "BadVersionNumberError"),
    ),
    "expired timestamp": (
        _expired_timestamp,
        Outcome("ExpiredMetadataError", "ExpiredMetadataError"),
    ),
    "snapshot rolls back targets": (
        _snapshot_rolls_back_targets,
        Outcome(None, "BadVersionNumberError"),
    ),
    "targets signed by a stranger": (
        _targets_signed_by_stranger,
        Outcome("UnsignedMetadataError", "UnsignedMetadataError"),
    ),
    "root not signed by the old root": (
        _root_not_signed_by_old_root,
        Outcome("UnsignedMetadataError", "UnsignedMetadataError"),
    ),
    "timestamp larger than a device downloads": (
        _oversized_timestamp,
        Outcome("DownloadLengthMismatchError", "DownloadLengthMismatchError"),
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_verify_update_agrees_with_ngclient(
    tmp_path: Path, repo: RepoWriter, scenario: str
) -> None:
    change, expected = SCENARIOS[scenario]
    served = _served(repo)
    change(repo)
    candidate = {**served, **_served(repo)}
    assert _compare(tmp_path, served, candidate) == expected


def test_refusal_names_role_file_and_tuf_error(repo: RepoWriter) -> None:
    served = _served(repo)
    _timestamp_to_old_snapshot(repo)
    with pytest.raises(VerificationError) as info:
        verify_update(
            trusted_root=served["1.root.json"],
            cached={"timestamp.json": served["timestamp.json"]},
            remote=_served(repo),
            now=dt.datetime.now(dt.UTC),
        )
    assert str(info.value) == (
        "timestamp timestamp.json: BadVersionNumberError: "
        "New snapshot version must be >= 2, got version 1"
    )
    assert isinstance(info.value.__cause__, RepositoryError)


def test_accepted_update_returns_what_a_device_trusts(repo: RepoWriter) -> None:
    files = _served(repo)
    result = verify_update(
        trusted_root=files["1.root.json"], cached=None, remote=files, now=dt.datetime.now(dt.UTC)
    )
    assert (result.timestamp.version, result.snapshot.version, result.targets.version) == (2, 2, 2)
    assert result.root_bytes == files["1.root.json"]
    assert str(result.releases["fw-1.0.0.img"].version) == "1.0.0"
    assert result.fetched == {"timestamp.json", "2.snapshot.json", "2.targets.json"}


def test_invalid_custom_fields_are_refused_naming_the_target(repo: RepoWriter) -> None:
    repo.targets.signed.targets["fw-1.0.0.img"].unrecognized_fields["custom"] = {"version": "x"}
    repo.publish()
    files = _served(repo)
    with pytest.raises(
        VerificationError, match=r"targets 3\.targets\.json: target fw-1\.0\.0\.img"
    ):
        verify_update(
            trusted_root=files["1.root.json"],
            cached=None,
            remote=files,
            now=dt.datetime.now(dt.UTC),
        )


def test_missing_file_is_refused_naming_it(repo: RepoWriter) -> None:
    files = _served(repo)
    del files["2.snapshot.json"]
    with pytest.raises(VerificationError, match=r"^snapshot 2\.snapshot\.json: not available"):
        verify_update(
            trusted_root=files["1.root.json"],
            cached=None,
            remote=files,
            now=dt.datetime.now(dt.UTC),
        )


def test_bounds_match_the_device() -> None:
    """The caps verify_update applies are the ones the agent gives ngclient."""
    config = _device_config()
    assert dict(DEVICE_MAX_LENGTHS) == {
        "root": config.root_max_length,
        "timestamp": config.timestamp_max_length,
        "snapshot": config.snapshot_max_length,
        "targets": config.targets_max_length,
    }
    assert _device_config().max_root_rotations == MAX_ROOT_ROTATIONS


def test_check_repository_reports_each_role(repo: RepoWriter) -> None:
    report = check_repository(repo.files(), now=dt.datetime.now(dt.UTC))
    assert report.ok, report.all_problems()
    rows = {role: (c.file, c.version, c.signed, c.threshold) for role, c in report.roles.items()}
    assert rows == {
        "root": ("1.root.json", 1, 1, 1),
        "timestamp": ("timestamp.json", 2, 1, 1),
        "snapshot": ("2.snapshot.json", 2, 1, 1),
        "targets": ("2.targets.json", 2, 1, 1),
    }
    assert set(report.releases) == {"fw-1.0.0.img"}
