"""Release SBOMs: CycloneDX checking, the binding in the image target, release add/stage
refusing a release without one or with an invalid one, ``sbom show``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Targets

from otaguard.cli import main
from otaguard.model import OperatorError, VerificationError
from otaguard.model.manifest import InstalledTarget
from otaguard.model.release import ReleaseInfo
from otaguard.model.sbom import MAX_SBOM_BYTES, parse_sbom
from otaguard.repo import ImageRepository
from otaguard.repo.ceremony import SigningRequest, stage_release
from otaguard.sim.sbom import VULNERABLE_OPENSSL, make_sbom

PW = b"pw"


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "version": 1,
        "components": [
            {
                "type": "library",
                "name": "openssl",
                "version": "3.0.13",
                "purl": "pkg:generic/openssl@3.0.13",
                "components": [{"type": "file", "name": "libcrypto.so.3"}],
            }
        ],
    }
    doc.update(changes)
    return doc


def _bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


@pytest.fixture
def repo(tmp_path: Path) -> ImageRepository:
    return ImageRepository.init(
        tmp_path / "repo",
        keys_dir=tmp_path / "keys",
        passphrases=lambda _n: PW,
        online_key=CryptoSigner.generate_ed25519().public_key,
    )


@pytest.fixture
def fw(tmp_path: Path) -> Path:
    p = tmp_path / "fw.img"
    p.write_bytes(os.urandom(4096))
    return p


# -- checking CycloneDX ----------------------------------------------------------------
@pytest.mark.parametrize("spec", ["1.5", "1.6"])
def test_valid_sbom_lists_every_component(spec: str) -> None:
    sbom = parse_sbom(_bytes(_doc(specVersion=spec)))
    assert sbom.spec_version == spec
    assert [(c.name, c.version, c.purl, c.type) for c in sbom.components] == [
        ("openssl", "3.0.13", "pkg:generic/openssl@3.0.13", "library"),
        ("libcrypto.so.3", None, None, "file"),
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{not json", "SBOM is not JSON"),
        (_bytes({"spdxVersion": "SPDX-2.3"}), "not CycloneDX JSON"),
        (_bytes(_doc(specVersion="1.4")), "CycloneDX '1.4'; only 1.5 and 1.6"),
        # the schema check names the problem and where it is
        (
            _bytes(_doc(components=[{"type": "gadget", "name": "x"}])),
            r"not valid CycloneDX 1.6: 'gadget' is not one of .* \(at components/0/type\)",
        ),
        (
            _bytes(_doc(components=[{"type": "library"}])),
            r"'name' is a required property \(at components/0\)",
        ),
        (b" " * (MAX_SBOM_BYTES + 1), "larger than"),
    ],
)
def test_invalid_sbom_is_refused_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(VerificationError, match=problem):
        parse_sbom(data)


# -- release add / stage ------------------------------------------------------------------
def test_release_binds_its_sbom_and_publishes_it_as_a_target(
    repo: ImageRepository, fw: Path, tmp_path: Path
) -> None:
    sbom = make_sbom(tmp_path / "fw.cdx.json", name="fw", version="1.0.0")
    rel = repo.add_release(
        fw, version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None, sbom=sbom
    )
    ref = rel.info.sbom
    assert ref is not None and ref.path == "fw-1.0.0.img.cdx.json"
    targets: Targets = repo.latest_targets()
    # the offline-signed image target carries path, hash and length of the SBOM's bytes
    assert targets.targets[rel.path].custom["sbom"] == {
        "path": ref.path,
        "hashes": {"sha256": parse_sbom(sbom.read_bytes()).sha256},
        "length": sbom.stat().st_size,
    }
    assert targets.targets[ref.path].hashes == {"sha256": ref.sha256}
    assert [r.path for r in repo.releases()] == [rel.path], "an SBOM is no release"
    report, checks = repo.verify()
    assert report.ok and [c.path for c in checks if c.ok] == [rel.path, ref.path]
    shown, parsed = repo.release_sbom("1.0.0")
    assert shown.path == rel.path and any(c.name == "openssl" for c in parsed.components)
    repo.withdraw_release(rel.path)
    assert repo.latest_targets().targets == {}, "the SBOM goes with its release"


def test_release_with_invalid_sbom_is_refused_and_changes_nothing(
    repo: ImageRepository, fw: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.cdx.json"
    bad.write_bytes(_bytes(_doc(components=[{"type": "gadget", "name": "x"}])))
    before = repo.read_files()
    with pytest.raises(OperatorError, match=r"bad.cdx.json: SBOM is not valid CycloneDX 1.6"):
        repo.add_release(
            fw, version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None,
            sbom=bad,
        )  # fmt: skip
    with pytest.raises(OperatorError, match="cannot read SBOM"):
        repo.add_release(
            fw, version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None,
            sbom=tmp_path / "missing.cdx.json",
        )  # fmt: skip
    out = tmp_path / "req.json"
    with pytest.raises(OperatorError, match="SBOM is not valid CycloneDX"):
        stage_release(
            repo, fw, version="1.0.0", hardware_ids=["hw"], security=False,
            security_counter=None, sbom=bad, out=out,
        )  # fmt: skip
    assert not out.exists()
    assert repo.read_files() == before


def test_signing_request_summary_shows_the_sbom_digest(
    repo: ImageRepository, fw: Path, tmp_path: Path
) -> None:
    sbom = make_sbom(tmp_path / "fw.cdx.json", name="fw", version="1.0.0")
    request, rel = stage_release(
        repo, fw, version="1.0.0", hardware_ids=["hw"], security=True, security_counter=None,
        sbom=sbom, out=tmp_path / "req.json",
    )  # fmt: skip
    assert rel.info.sbom is not None
    digest = rel.info.sbom.sha256
    assert request.summary["images"][0]["sbom"]["sha256"] == digest
    assert [i["path"] for i in request.summary["images"]] == [rel.path]
    assert any(f"SBOM {rel.info.sbom.path}" in line and digest in line for line in request.render())
    # the summary is derived from the bytes: an SBOM digest edited in it is refused
    doc = json.loads((tmp_path / "req.json").read_text())
    doc["summary"]["images"][0]["sbom"]["sha256"] = "0" * 64
    with pytest.raises(VerificationError, match="summary does not match"):
        SigningRequest(doc)


def test_cli_refuses_a_release_without_sbom(
    repo: ImageRepository, fw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for cmd in ("add", "stage"):
        with pytest.raises(SystemExit) as exc:
            main(["release", cmd, str(repo.dir), str(fw), "--version", "1.0.0",
                  "--hardware-id", "hw"])  # fmt: skip
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "the following arguments are required: --sbom" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"bomFormat": "CycloneDX", "specVersion": "1.4"}')
    code = main(["release", "stage", str(repo.dir), str(fw), "--version", "1.0.0",
                 "--hardware-id", "hw", "--sbom", str(bad),
                 "--out", str(tmp_path / "r.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "only 1.5 and 1.6 are accepted" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sbom_show_lists_components(
    repo: ImageRepository, fw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sbom = make_sbom(tmp_path / "fw.cdx.json", name="fw", version="1.0.0")
    repo.add_release(
        fw, version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None, sbom=sbom
    )
    assert main(["sbom", "show", str(repo.dir), "1.0.0"]) == 0
    out = capsys.readouterr().out
    assert f"pkg:generic/openssl@{VULNERABLE_OPENSSL}" in out and "3 components" in out
    assert main(["sbom", "show", str(repo.dir), "9.9.9"]) == 2
    assert "no release 9.9.9" in capsys.readouterr().err


# -- old records stay readable -------------------------------------------------------------
def test_targets_and_manifests_from_before_sboms_still_parse() -> None:
    old = {"version": "1.0.0", "security_counter": 0, "hardware_ids": ["hw"],
           "release_type": "feature"}  # fmt: skip
    assert ReleaseInfo.from_custom(old).sbom is None
    bad = old | {"sbom": {"path": "x.cdx.json", "hashes": {"sha256": "zz"}, "length": 1}}
    with pytest.raises(VerificationError, match="sbom sha256"):
        ReleaseInfo.from_custom(bad)
    installed = {"name": "fw-1.0.0.img", "length": 1, "sha256": "ab" * 32, "version": "1.0.0",
                 "security_counter": 0}  # fmt: skip
    assert InstalledTarget.from_dict(installed).sbom_sha256 is None
    new = InstalledTarget.from_dict(installed | {"sbom_sha256": "cd" * 32})
    assert new.sbom_sha256 == "cd" * 32 and new.to_dict()["sbom_sha256"] == "cd" * 32
    with pytest.raises(VerificationError, match=r"installed\.sbom_sha256"):
        InstalledTarget.from_dict(installed | {"sbom_sha256": "not a digest"})


def test_binding_to_an_unlisted_sbom_fails_verification(
    repo: ImageRepository, fw: Path, tmp_path: Path
) -> None:
    """What the update server's publication check and ``repo verify`` refuse (insiders
    signing an image target whose SBOM binding names bytes targets does not list)."""
    sbom = make_sbom(tmp_path / "fw.cdx.json", name="fw", version="1.0.0")
    rel = repo.add_release(
        fw, version="1.0.0", hardware_ids=["hw"], security=False, security_counter=None, sbom=sbom
    )
    assert rel.info.sbom is not None
    md = repo._latest("targets", Targets)
    del md.signed.targets[rel.info.sbom.path]
    md.signed.version += 1
    repo._sign_and_write(md, "targets")
    report, _ = repo.verify()
    assert not report.ok
    assert any("SBOM binding names fw-1.0.0.img.cdx.json" in p for p in report.all_problems())
