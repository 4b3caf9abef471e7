"""Release tooling of compressed and delta transfer: what is built, listed, refused, withdrawn."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tuf.api.metadata import Targets

from otaguard.cli import main, passphrase_env_var
from otaguard.model import OperatorError
from otaguard.model.transfer import TRANSFER_OF_KEY, Encodings
from otaguard.repo import ImageRepository, check_repository
from otaguard.repo.transfer import TransferRequest
from sbom_support import sbom_beside

PW = b"transfer test passphrase"
SIZE = 64 * 1024


@pytest.fixture
def local_repo(tmp_path: Path) -> ImageRepository:
    """A server-less repository with 1.0.0 published."""
    repo = ImageRepository.init(
        tmp_path / "repo", keys_dir=tmp_path / "keys", passphrases=lambda _n: PW
    )
    rng = random.Random(1)
    base = tmp_path / "fw.img"
    base.write_bytes(rng.randbytes(SIZE))
    repo.add_release(
        base, version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None,
        sbom=sbom_beside(base),
    )  # fmt: skip
    return repo


def _next(tmp_path: Path, version: str) -> Path:
    data = bytearray((tmp_path / "fw.img").read_bytes())
    data[100:140] = bytes(40)
    path = tmp_path / version / "fw.img"
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    return path


def _targets(repo: ImageRepository) -> Targets:
    return repo.latest_targets()


def test_cli_publishes_compressed_and_delta_blobs(
    local_repo: ImageRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for role in ("targets", "snapshot", "timestamp"):
        for ref in local_repo.key_refs(role):
            monkeypatch.setenv(passphrase_env_var(ref.name), PW.decode())
    new = _next(tmp_path, "1.1.0")
    argv = ["release", "add", str(local_repo.dir), str(new), "--version", "1.1.0",
            "--hardware-id", "hw", "--sbom", str(sbom_beside(new)), "--keys-dir",
            str(local_repo.keys_dir), "--compress", "zstd", "--delta-from", "1.0.0"]  # fmt: skip
    assert main(argv) == 0
    targets = _targets(local_repo)
    image = targets.targets["fw-1.1.0.img"]
    enc = Encodings.from_custom(image.custom)
    assert enc.compressed is not None and enc.compressed.path == "fw-1.1.0.img.zst"
    (delta,) = enc.deltas
    assert delta.blob.path == "fw-1.1.0.img.from-1.0.0.delta"
    assert delta.base_sha256 == targets.targets["fw-1.0.0.img"].hashes["sha256"]
    assert delta.blob.length < 2000  # 40 changed bytes of 64 KiB
    for ref in (enc.compressed, delta.blob):
        listed = targets.targets[ref.path]
        assert listed.custom == {TRANSFER_OF_KEY: "fw-1.1.0.img", "format": ref.format}
        assert (listed.length, listed.hashes["sha256"]) == (ref.length, ref.sha256)
        blob = (local_repo.targets_dir / f"{ref.sha256}.{ref.path}").read_bytes()
        assert hashlib.sha256(blob).hexdigest() == ref.sha256
    # encoded blobs are not releases, and the repository verifies as a device would
    assert [str(r.info.version) for r in local_repo.releases()] == ["1.0.0", "1.1.0"]
    report = check_repository(local_repo.read_files(), now=datetime.now(UTC))
    assert report.ok, report


def test_unknown_or_newer_base_is_refused(local_repo: ImageRepository, tmp_path: Path) -> None:
    new = _next(tmp_path, "1.1.0")
    for base in ("0.9.0", "1.1.0", "x.y"):
        with pytest.raises(OperatorError, match=f"--delta-from {base}"):
            local_repo.add_release(
                new, version="1.1.0", hardware_ids=["hw"], security=False,
                security_counter=None, sbom=sbom_beside(new),
                transfer=TransferRequest(delta_from=(base,)),
            )  # fmt: skip
    with pytest.raises(OperatorError, match="--compress must be one of zstd"):
        TransferRequest(compress="gzip")


def test_tampered_base_blob_is_refused(local_repo: ImageRepository, tmp_path: Path) -> None:
    (rel,) = local_repo.releases()
    local_repo.blob_path(rel).write_bytes(b"not the signed image")
    new = _next(tmp_path, "1.1.0")
    with pytest.raises(OperatorError, match=r"stored image of fw-1\.0\.0\.img is not the signed"):
        local_repo.add_release(
            new, version="1.1.0", hardware_ids=["hw"], security=False, security_counter=None,
            sbom=sbom_beside(new), transfer=TransferRequest(delta_from=("1.0.0",)),
        )  # fmt: skip


def test_withdraw_removes_the_encodings(local_repo: ImageRepository, tmp_path: Path) -> None:
    new = _next(tmp_path, "1.1.0")
    local_repo.add_release(
        new, version="1.1.0", hardware_ids=["hw"], security=False, security_counter=None,
        sbom=sbom_beside(new), transfer=TransferRequest("zstd", ("1.0.0",)),
    )  # fmt: skip
    with pytest.raises(OperatorError, match="is an encoding: withdraw the release"):
        local_repo.withdraw_release("fw-1.1.0.img.zst")
    local_repo.withdraw_release("fw-1.1.0.img")
    assert sorted(_targets(local_repo).targets) == ["fw-1.0.0.img", "fw-1.0.0.img.cdx.json"]


def test_verify_refuses_an_encoding_targets_does_not_list(
    local_repo: ImageRepository, tmp_path: Path
) -> None:
    from tuf.api.metadata import Metadata

    new = _next(tmp_path, "1.1.0")
    local_repo.add_release(
        new, version="1.1.0", hardware_ids=["hw"], security=False, security_counter=None,
        sbom=sbom_beside(new), transfer=TransferRequest("zstd"),
    )  # fmt: skip
    path = local_repo.metadata_dir / f"{local_repo.latest_version('targets')}.targets.json"
    md = Metadata[Targets].from_file(str(path))
    del md.signed.targets["fw-1.1.0.img.zst"]  # the image still lists it
    local_repo._sign_targets(md, datetime.now(UTC))  # a correctly signed, inconsistent targets
    report = check_repository(local_repo.read_files(), now=datetime.now(UTC))
    assert not report.ok
    assert "lists the encoding fw-1.1.0.img.zst, which targets does not list" in str(report)
