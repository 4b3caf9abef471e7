"""Image repository tooling: init, release rules, verification findings, key custody."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from otaguard.model import ConfigError, KeyAccessError, OperatorError, Unsafe
from otaguard.repo import ImageRepository, check_repository
from sbom_support import sbom_beside

PW = b"pw"


def pw(_name: str) -> bytes:
    return PW


@pytest.fixture
def online_key() -> CryptoSigner:
    """Stands in for the update server's online key."""
    return CryptoSigner.generate_ed25519()


@pytest.fixture
def repo(tmp_path: Path, online_key: CryptoSigner) -> ImageRepository:
    """A server-mode repository (the server's online key signs snapshot and timestamp)."""
    return ImageRepository.init(
        tmp_path / "repo",
        keys_dir=tmp_path / "keys",
        passphrases=pw,
        online_key=online_key.public_key,
    )


@pytest.fixture
def local_repo(tmp_path: Path) -> ImageRepository:
    """A server-less repository: snapshot and timestamp keys are local too."""
    return ImageRepository.init(
        tmp_path / "local", keys_dir=tmp_path / "local-keys", passphrases=pw
    )


def image(tmp_path: Path, name: str = "fw.img", size: int = 4096) -> Path:
    p = tmp_path / name
    p.write_bytes(os.urandom(size))
    return p


def test_init_defaults(repo: ImageRepository, online_key: CryptoSigner) -> None:
    root = json.loads((repo.metadata_dir / "1.root.json").read_text())["signed"]
    assert root["consistent_snapshot"] is True
    for role in ("root", "targets"):
        keyids = root["roles"][role]["keyids"]
        assert root["roles"][role]["threshold"] == 2 == len(keyids)
        assert sorted(root["keys"][k]["keytype"] for k in keyids) == ["ed25519", "ml-dsa"]
    for role in ("snapshot", "timestamp"):
        assert root["roles"][role] == {"keyids": [online_key.public_key.keyid], "threshold": 1}
    assert stat.S_IMODE(repo.keys_dir.stat().st_mode) == 0o700
    pems = sorted(p.name for p in repo.keys_dir.glob("*.pem"))
    assert pems == [
        "root-ed25519.pem",
        "root-ml-dsa-65.pem",
        "targets-ed25519.pem",
        "targets-ml-dsa-65.pem",
    ]
    for key in repo.keys_dir.glob("*.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == [
        "1.root.json",
        "1.targets.json",
        "root.json",
    ]
    report, _ = repo.verify()
    assert report.ok, report.all_problems()
    cfg = json.loads((repo.dir / "otaguard-repo.json").read_text())
    assert cfg["expiry_days"] == {"root": 365, "targets": 90}
    assert cfg["online_roles"] == "server"
    assert cfg["keys_dir"] == "../keys"
    assert cfg["keys"]["targets"][0]["uri"] == "encfile:targets-ed25519.pem"
    assert cfg["keys"]["timestamp"] == [
        {
            "name": "server-online",
            "algorithm": "ed25519",
            "keyid": online_key.public_key.keyid,
            "uri": None,
        }
    ]


def test_local_mode_is_complete_and_refreshes(local_repo: ImageRepository) -> None:
    """Server-less: six keys, each its own file, and a complete static repository."""
    assert not local_repo.server_signed
    assert len(list(local_repo.keys_dir.glob("*.pem"))) == 6
    assert (local_repo.metadata_dir / "timestamp.json").exists()
    before = json.loads((local_repo.metadata_dir / "timestamp.json").read_text())["signed"]

    local_repo.refresh()

    after = json.loads((local_repo.metadata_dir / "timestamp.json").read_text())["signed"]
    assert after["version"] == before["version"] + 1
    assert after["meta"]["snapshot.json"]["version"] == 2
    report, _ = local_repo.verify()
    assert report.ok, report.all_problems()
    # Reopened (as the CLI does), a timestamp-only refresh needs only the timestamp key.
    asked: list[str] = []
    reopened = ImageRepository(local_repo.dir, passphrases=lambda name: asked.append(name) or PW)
    reopened.refresh(roles=("timestamp",))
    assert asked == ["timestamp-ed25519"]


def test_refresh_of_online_roles_in_server_mode_is_refused(repo: ImageRepository) -> None:
    with pytest.raises(OperatorError, match="update server signs snapshot and timestamp"):
        ImageRepository(repo.dir, passphrases=pw).refresh()
    assert not (repo.metadata_dir / "2.targets.json").exists()
    # Targets are the offline tool's to re-sign, also in server mode.
    ImageRepository(repo.dir, passphrases=pw).refresh(roles=("targets",))
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == [
        "1.root.json",
        "1.targets.json",
        "2.targets.json",
        "root.json",
    ]


def test_init_refuses_non_empty_dir(repo: ImageRepository, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="not empty"):
        ImageRepository.init(repo.dir, keys_dir=tmp_path / "k2", passphrases=pw)
    with pytest.raises(OperatorError, match="not empty"):
        ImageRepository.init(tmp_path / "r2", keys_dir=repo.keys_dir, passphrases=pw)
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("keys", ["repo/keys", "repo", "."], ids=["inside", "same", "parent"])
def test_keys_dir_must_be_outside_the_repository(tmp_path: Path, keys: str) -> None:
    with pytest.raises(OperatorError, match="must be outside the repository"):
        ImageRepository.init(tmp_path / "repo", keys_dir=tmp_path / keys, passphrases=pw)
    assert not (tmp_path / "repo").exists()


def test_none_is_never_plaintext(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="passphrases"):
        ImageRepository.init(
            tmp_path / "repo",
            keys_dir=tmp_path / "keys",
            passphrases=None,  # type: ignore[arg-type]
        )
    assert not (tmp_path / "repo").exists() and not (tmp_path / "keys").exists()


def test_release_needs_targets_keys_only_in_server_mode(
    repo: ImageRepository, tmp_path: Path
) -> None:
    asked: list[str] = []
    reopened = ImageRepository(repo.dir, passphrases=lambda name: asked.append(name) or PW)
    reopened.add_release(
        image(tmp_path),
        sbom=sbom_beside(image(tmp_path)),
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
    )
    assert sorted(asked) == ["targets-ed25519", "targets-ml-dsa-65"]
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == [
        "1.root.json",
        "1.targets.json",
        "2.targets.json",
        "root.json",
    ]


def test_release_rules(repo: ImageRepository, tmp_path: Path) -> None:
    rel = repo.add_release(
        image(tmp_path),
        sbom=sbom_beside(image(tmp_path)),
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
    )
    assert rel.info.release_type == "feature" and rel.info.security_counter == 0
    with pytest.raises(OperatorError, match=r"1\.0\.0 is already published for hardware id hw"):
        repo.add_release(
            image(tmp_path),
            sbom=sbom_beside(image(tmp_path)),
            version="1.0.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
        )
    with pytest.raises(OperatorError, match="not greater"):
        repo.add_release(
            image(tmp_path),
            sbom=sbom_beside(image(tmp_path)),
            version="0.9.0",
            hardware_ids=["other", "hw"],
            security=False,
            security_counter=None,
        )
    sec = repo.add_release(
        image(tmp_path, "s.img"),
        sbom=sbom_beside(image(tmp_path, "s.img")),
        version="1.1.0",
        hardware_ids=["hw"],
        security=True,
        security_counter=None,
    )
    assert sec.info.release_type == "security" and sec.info.security_counter == 1
    with pytest.raises(OperatorError, match="below the highest"):
        repo.add_release(
            image(tmp_path),
            sbom=sbom_beside(image(tmp_path)),
            version="1.2.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=0,
        )
    # Another hardware id may use a lower version, not a lower counter.
    other = repo.add_release(
        image(tmp_path, "o.img"),
        sbom=sbom_beside(image(tmp_path, "o.img")),
        version="0.1.0",
        hardware_ids=["other"],
        security=False,
        security_counter=None,
    )
    assert other.info.security_counter == 1
    report, checks = repo.verify()
    assert report.ok and all(c.ok for c in checks) and len(checks) == 6  # 3 images, 3 SBOMs


def test_a_security_fix_on_an_older_line(repo: ImageRepository, tmp_path: Path) -> None:
    """2.3.1 while 2.4.x exists: only a final security release above its line's newest;
    never a feature release, a pre-release, a new line or a duplicate. Its counter may be
    below the newer line's (a backport names the fix's counter), never below an older
    release's; by default it starts a new epoch like any security release."""
    img = image(tmp_path)

    def add(version: str, *, security: bool, counter: int | None = None) -> int:
        rel = repo.add_release(img, version=version, hardware_ids=["hw"], security=security,
                               security_counter=counter, sbom=sbom_beside(img))  # fmt: skip
        return rel.info.security_counter

    def check(version: str, *, security: bool = True, counter: int | None = None) -> int:
        _, info, _, _ = repo.check_new_release(
            img,
            version=version,
            hardware_ids=["hw"],
            security=security,
            security_counter=counter,
            sbom=sbom_beside(img),
        )
        return info.security_counter

    assert (add("2.3.0", security=False), add("2.4.0", security=False)) == (0, 0)
    assert add("2.4.1", security=True) == 1  # the fix on the newest line: epoch 1
    refusals = {
        ("2.3.1", False): r"not greater than published 2\.4\.1 for hardware id hw \(only a "
        r"final security release above 2\.3\.0 may fix its line\)",
        ("2.3.1-rc.1", True): r"not greater than published 2\.4\.1",
        ("2.2.1", True): r"not greater than published 2\.4\.1 for hardware id hw$",
        ("2.3.0", True): r"2\.3\.0 is already published",
        ("2.4.1", True): r"2\.4\.1 is already published",
        ("2.4.0-rc.1", True): r"not greater than published 2\.4\.1",
    }
    for (version, security), message in refusals.items():
        with pytest.raises(OperatorError, match=message):
            check(version, security=security)
    assert check("2.3.1") == 2  # by default a new epoch, above everything
    assert add("2.3.1", security=True, counter=1) == 1  # the backport of 2.4.1's fix
    with pytest.raises(OperatorError, match=r"counter 0 is below a published older release \(1\)"):
        check("2.3.2", counter=0)
    assert add("2.3.5", security=True) == 2  # epoch 2 ...
    with pytest.raises(OperatorError, match=r"counter 1 is below the highest published \(2\)"):
        check("2.5.0", counter=1)  # ... and the newest line stays at or above it
    report, _ = repo.verify()
    assert report.ok


def _tree(*dirs: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("server_mode", [True, False], ids=["server-mode", "local-mode"])
def test_per_key_passphrases_and_a_wrong_one_changes_nothing(
    tmp_path: Path, online_key: CryptoSigner, server_mode: bool
) -> None:
    """Each key has its own passphrase; one wrong one is named and nothing is written."""

    def own(name: str) -> bytes:
        return f"passphrase of {name}".encode()

    repo = ImageRepository.init(
        tmp_path / "repo",
        keys_dir=tmp_path / "keys",
        passphrases=own,
        online_key=online_key.public_key if server_mode else None,
    )
    before = _tree(repo.dir, repo.keys_dir)
    # The right passphrase of one key does not open another.
    with pytest.raises(KeyAccessError, match=r"wrong passphrase for key targets-ml-dsa-65 \("):
        ImageRepository(
            repo.dir,
            passphrases=lambda n: own("targets-ed25519" if n == "targets-ml-dsa-65" else n),
        ).add_release(
            image(tmp_path),
            sbom=sbom_beside(image(tmp_path)),
            version="1.0.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
        )
    assert _tree(repo.dir, repo.keys_dir) == before
    if not server_mode:
        wrong_timestamp = ImageRepository(
            repo.dir, passphrases=lambda n: b"nope" if n.startswith("timestamp") else own(n)
        )
        with pytest.raises(KeyAccessError, match="wrong passphrase for key timestamp-ed25519"):
            wrong_timestamp.refresh()
        assert _tree(repo.dir, repo.keys_dir) == before
    ImageRepository(repo.dir, passphrases=own).add_release(
        image(tmp_path),
        sbom=sbom_beside(image(tmp_path)),
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
    )
    report, _ = repo.verify()
    assert report.ok, report.all_problems()


def test_read_only_repository_cannot_sign(repo: ImageRepository, tmp_path: Path) -> None:
    with pytest.raises(KeyAccessError, match="read-only"):
        ImageRepository(repo.dir).add_release(
            image(tmp_path),
            sbom=sbom_beside(image(tmp_path)),
            version="1.0.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
        )


def test_keys_dir_can_move(repo: ImageRepository, tmp_path: Path) -> None:
    """The keys directory on a disk mounted elsewhere: given explicitly."""
    moved = tmp_path / "usb" / "keys"
    moved.parent.mkdir()
    repo.keys_dir.rename(moved)
    with pytest.raises(ConfigError, match=r"keys directory .* not found"):
        ImageRepository(repo.dir, passphrases=pw).refresh(roles=("targets",))
    ImageRepository(repo.dir, passphrases=pw, keys_dir=moved).refresh(roles=("targets",))


def test_swapped_key_file_is_refused(repo: ImageRepository, tmp_path: Path) -> None:
    """A key file replaced by another (encrypted) key does not match root: refused."""
    from otaguard.crypto import generate_signer, write_private_key

    write_private_key(
        repo.keys_dir / "targets-ed25519.pem", generate_signer("ed25519"), passphrase=PW
    )
    with pytest.raises(ConfigError, match="targets-ed25519"):
        ImageRepository(repo.dir, passphrases=pw).refresh(roles=("targets",))


def test_verify_finds_tampered_blob_and_metadata(repo: ImageRepository, tmp_path: Path) -> None:
    rel = repo.add_release(
        image(tmp_path),
        sbom=sbom_beside(image(tmp_path)),
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
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


def test_plaintext_keys_only_by_name_and_warn_on_every_use(tmp_path: Path) -> None:
    from otaguard.model import InsecureModeWarning

    with pytest.warns(InsecureModeWarning, match="plaintext"):
        ImageRepository.init(
            tmp_path / "r", keys_dir=tmp_path / "k", passphrases=Unsafe.PLAINTEXT_KEYS
        )
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "k" / "root-ed25519.pem").read_bytes()
    with pytest.warns(InsecureModeWarning, match="plaintext"):
        ImageRepository(tmp_path / "r")
    # Plaintext keys are used only when the development option is named again.
    with (
        pytest.warns(InsecureModeWarning),
        pytest.raises(KeyAccessError, match="unencrypted development key"),
    ):
        ImageRepository(tmp_path / "r", passphrases=pw).refresh()
    with pytest.warns(InsecureModeWarning, match="using plaintext private key timestamp-ed25519"):
        ImageRepository(tmp_path / "r", passphrases=Unsafe.PLAINTEXT_KEYS).refresh(
            roles=("timestamp",)
        )


def test_encrypted_keys_need_a_passphrase(repo: ImageRepository) -> None:
    with pytest.raises(KeyAccessError, match="is encrypted"):
        ImageRepository(repo.dir, passphrases=Unsafe.PLAINTEXT_KEYS).refresh(roles=("targets",))


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
        image(tmp_path),
        sbom=sbom_beside(image(tmp_path)),
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
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
        image(tmp_path),
        sbom=sbom_beside(image(tmp_path)),
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
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
    assert [c.path for c in checks] == [rel.path, f"{rel.path}.cdx.json"]
    assert all(c.ok for c in checks)

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
