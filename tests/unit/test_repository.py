"""Image repository tooling: init, release rules, verification findings."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from otaguard.model import KeyAccessError, OperatorError
from otaguard.repo import ImageRepository, check_repository

PW = b"pw"


@pytest.fixture
def repo(tmp_path: Path) -> ImageRepository:
    return ImageRepository.init(tmp_path / "repo", passphrase=PW)


def image(tmp_path: Path, name: str = "fw.img", size: int = 4096) -> Path:
    p = tmp_path / name
    p.write_bytes(os.urandom(size))
    return p


def test_init_defaults(repo: ImageRepository) -> None:
    root = json.loads((repo.metadata_dir / "1.root.json").read_text())["signed"]
    assert root["consistent_snapshot"] is True
    for role in ("root", "targets"):
        keyids = root["roles"][role]["keyids"]
        assert root["roles"][role]["threshold"] == 2 == len(keyids)
        assert sorted(root["keys"][k]["keytype"] for k in keyids) == ["ed25519", "ml-dsa"]
    for role in ("snapshot", "timestamp"):
        assert root["roles"][role]["threshold"] == 1
    for key in (repo.dir / "keys").iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    report, _ = repo.verify()
    assert report.ok, report.all_problems()
    cfg = json.loads((repo.dir / "otaguard-repo.json").read_text())
    assert cfg["expiry_days"] == {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}


def test_init_refuses_non_empty_dir(repo: ImageRepository) -> None:
    with pytest.raises(OperatorError, match="not empty"):
        ImageRepository.init(repo.dir, passphrase=PW)


def test_release_rules(repo: ImageRepository, tmp_path: Path) -> None:
    rel = repo.add_release(
        image(tmp_path), version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None
    )
    assert rel.info.release_type == "feature" and rel.info.security_counter == 0
    with pytest.raises(OperatorError, match="not greater"):
        repo.add_release(
            image(tmp_path),
            version="1.0.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
        )
    with pytest.raises(OperatorError, match="not greater"):
        repo.add_release(
            image(tmp_path),
            version="0.9.0",
            hardware_ids=["other", "hw"],
            security=False,
            security_counter=None,
        )
    sec = repo.add_release(
        image(tmp_path, "s.img"),
        version="1.1.0",
        hardware_ids=["hw"],
        security=True,
        security_counter=None,
    )
    assert sec.info.release_type == "security" and sec.info.security_counter == 1
    with pytest.raises(OperatorError, match="below the highest"):
        repo.add_release(
            image(tmp_path),
            version="1.2.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=0,
        )
    # Another hardware id may use a lower version, not a lower counter.
    other = repo.add_release(
        image(tmp_path, "o.img"),
        version="0.1.0",
        hardware_ids=["other"],
        security=False,
        security_counter=None,
    )
    assert other.info.security_counter == 1
    report, checks = repo.verify()
    assert report.ok and all(c.ok for c in checks) and len(checks) == 3


def test_wrong_passphrase_changes_nothing(repo: ImageRepository, tmp_path: Path) -> None:
    before = sorted(p.name for p in repo.metadata_dir.iterdir()) + sorted(
        p.name for p in repo.targets_dir.iterdir()
    )
    with pytest.raises(KeyAccessError, match="wrong passphrase"):
        ImageRepository(repo.dir, passphrase=b"nope").add_release(
            image(tmp_path),
            version="1.0.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
        )
    after = sorted(p.name for p in repo.metadata_dir.iterdir()) + sorted(
        p.name for p in repo.targets_dir.iterdir()
    )
    assert before == after


def test_verify_finds_tampered_blob_and_metadata(repo: ImageRepository, tmp_path: Path) -> None:
    rel = repo.add_release(
        image(tmp_path), version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None
    )
    blob = repo.blob_path(rel)
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    report, checks = repo.verify()
    assert report.ok and not checks[0].ok and "hash" in (checks[0].problem or "")

    files = repo.read_files()
    name = max(
        (n for n in files if n.endswith(".targets.json")), key=lambda n: int(n.split(".")[0])
    )
    files[name] = files[name].replace(b'"1.0.0"', b'"9.0.0"')
    report = check_repository(files, now=datetime.now(UTC))
    assert not report.ok
    assert report.problem is not None
    assert f"targets {name}: UnsignedMetadataError" in report.problem
    assert report.roles["targets"].problem == report.problem
    assert report.targets is None


def test_plaintext_keys_warn_on_every_use(tmp_path: Path) -> None:
    from otaguard.model import InsecureModeWarning

    with pytest.warns(InsecureModeWarning, match="plaintext"):
        ImageRepository.init(tmp_path / "r", passphrase=None)
    with pytest.warns(InsecureModeWarning, match="plaintext"):
        ImageRepository(tmp_path / "r", passphrase=None)


def _offline_layout(repo: ImageRepository) -> None:
    """What the new layout keeps: N.root.json and N.targets.json only."""
    for p in repo.metadata_dir.iterdir():
        if p.name == "timestamp.json" or p.name.endswith(".snapshot.json"):
            p.unlink()


def _sign_newest_targets_with_one_key(repo: ImageRepository) -> str:
    from tuf.api.metadata import Metadata, Targets

    md: Metadata[Targets] = repo._latest("targets", Targets)
    md.signatures.clear()
    md.sign(repo._role_signers("targets")[0])
    name = f"{md.signed.version}.targets.json"
    (repo.metadata_dir / name).write_bytes(md.to_bytes())
    return name


def test_repo_verify_cli(
    repo: ImageRepository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from otaguard.cli import main

    repo.add_release(
        image(tmp_path), version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None
    )
    assert main(["repo", "verify", str(repo.dir)]) == 0
    out = capsys.readouterr().out
    assert "repository verified" in out
    assert "2/2" in out and "hash ok" in out

    name = _sign_newest_targets_with_one_key(repo)
    assert main(["repo", "verify", str(repo.dir)]) == 3
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"verification failed: targets {name}: UnsignedMetadataError: "
        "targets was signed by 1/2 keys"
    )
    assert f"problem: targets {name}: UnsignedMetadataError" in captured.out


def test_verify_without_online_roles(repo: ImageRepository, tmp_path: Path) -> None:
    rel = repo.add_release(
        image(tmp_path), version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None
    )
    _offline_layout(repo)
    report, checks = repo.verify()
    assert report.ok, report.all_problems()
    for role in ("snapshot", "timestamp"):
        assert report.roles[role].note == "signed by the server"
    assert (report.roles["targets"].file, report.roles["targets"].signed) == (
        "2.targets.json",
        2,
    )
    assert [c.path for c in checks] == [rel.path] and checks[0].ok

    name = _sign_newest_targets_with_one_key(repo)
    report, checks = repo.verify()
    assert not report.ok and checks == []
    assert report.problem == (
        f"targets {name}: UnsignedMetadataError: targets was signed by 1/2 keys"
    )
    assert report.roles["snapshot"].note == "signed by the server"


def test_verify_without_online_roles_checks_expiry(repo: ImageRepository) -> None:
    _offline_layout(repo)
    later = datetime.now(UTC) + timedelta(days=91)  # targets live 90 days
    report, _ = repo.verify(now=later)
    assert report.problem == "targets 1.targets.json: ExpiredMetadataError: New targets is expired"
    report, _ = repo.verify(now=later + timedelta(days=365))
    assert report.problem == "root 1.root.json: ExpiredMetadataError: Final root.json is expired"
