"""Pure director code: the policy, signing, the device's verification, root rotation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from otaguard.agent.director import (
    follow_director_root,
    match_image_repository,
    verify_director_targets,
)
from otaguard.model.errors import (
    ConfigError,
    DirectorMetadataError,
    DirectorMismatchError,
    OperatorError,
    VerificationError,
)
from otaguard.model.manifest import DeviceManifest
from otaguard.model.release import ReleaseInfo
from otaguard.model.unsafe import Unsafe
from otaguard.model.version import Version
from otaguard.repo.director import init_director
from otaguard.server.director import (
    DirectorRelease,
    choose_release,
    load_director_roots,
    sign_instruction,
)
from otaguard.server.storage.assignments import Assignment

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
HW = "gw"
SHA = "ab" * 32


def rel(version: str, hw: str = HW, sha: str = SHA, length: int = 100) -> DirectorRelease:
    info = ReleaseInfo(Version.parse(version), 1, (hw,), "feature")
    return DirectorRelease(f"fw-{version}.img", length, {"sha256": sha}, info)


RELEASES = [rel("1.0.0"), rel("1.2.0"), rel("1.1.0"), rel("9.0.0", hw="other")]


# -- the policy --------------------------------------------------------------------------
def _choose(assignment: Assignment | None, running: str | None = "1.0.0") -> str | None:
    chosen = choose_release(
        hardware_id=HW,
        running=Version.parse(running) if running else None,
        assignment=assignment,
        releases=RELEASES,
    )
    return chosen.name if chosen else None


def test_policy_default_is_the_newest_release_for_the_hardware() -> None:
    assert _choose(None) == "fw-1.2.0.img"  # 9.0.0 is for other hardware


def test_policy_never_instructs_what_runs_or_older() -> None:
    assert _choose(None, running="1.2.0") is None
    assert _choose(Assignment("s", "release", "1.1.0", NOW), running="1.2.0") is None


def test_policy_assignment_and_hold() -> None:
    assert _choose(Assignment("s", "release", "1.1.0", NOW)) == "fw-1.1.0.img"
    assert _choose(Assignment("s", "release", "7.0.0", NOW)) is None  # not served
    assert _choose(Assignment("s", "hold", None, NOW)) is None
    assert _choose(None, running=None) == "fw-1.2.0.img"  # recovery


def test_assignment_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="names a version"):
        Assignment("s", "release", None, NOW)
    with pytest.raises(ValueError, match="mode"):
        Assignment("s", "later", None, NOW)


# -- the device's verification ------------------------------------------------------------
@pytest.fixture(scope="module")
def keys() -> tuple[CryptoSigner, CryptoSigner]:
    """(root key, director targets key)."""
    return CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()


def _root(root_key: CryptoSigner, targets_key: CryptoSigner, version: int = 1) -> Metadata[Root]:
    root = Root(version=version, expires=NOW + dt.timedelta(days=365), consistent_snapshot=True)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key((root_key if role == "root" else targets_key).public_key, role)
    md = Metadata(root)
    md.sign(root_key)
    return md


def _verify(data: bytes, root: Root, **kw: object) -> object:
    args: dict[str, object] = {"serial": "s1", "hardware_id": HW, "nonce": "n1", "now": NOW}
    args.update(kw)
    return verify_director_targets(data, root=root, **args)  # type: ignore[arg-type]


def test_signed_instruction_verifies(keys: tuple[CryptoSigner, CryptoSigner]) -> None:
    root = _root(*keys).signed
    data = sign_instruction(
        rel("1.1.0"), serial="s1", hardware_id=HW, nonce="n1", now=NOW, signer=keys[1]
    )
    instruction = _verify(data, root)
    assert instruction.target.path == "fw-1.1.0.img"  # type: ignore[attr-defined]
    none = sign_instruction(None, serial="s1", hardware_id=HW, nonce="n1", now=NOW, signer=keys[1])
    assert _verify(none, root).target is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"nonce": "n2"}, "nonce differs"),
        ({"serial": "s2"}, "not for this device"),
        ({"hardware_id": "gw2"}, "another hardware id"),
        ({"now": NOW + dt.timedelta(minutes=6)}, "expired"),
    ],
)
def test_instruction_bound_to_nonce_device_hardware_and_time(
    keys: tuple[CryptoSigner, CryptoSigner], change: dict[str, object], match: str
) -> None:
    root = _root(*keys).signed
    data = sign_instruction(
        rel("1.1.0"), serial="s1", hardware_id=HW, nonce="n1", now=NOW, signer=keys[1]
    )
    with pytest.raises(DirectorMetadataError, match=match):
        _verify(data, root, **change)


def test_instruction_signed_by_another_key_is_refused(
    keys: tuple[CryptoSigner, CryptoSigner],
) -> None:
    root = _root(*keys).signed
    for signer in (keys[0], CryptoSigner.generate_ed25519()):  # the root key is not targets'
        data = sign_instruction(
            rel("1.1.0"), serial="s1", hardware_id=HW, nonce="n1", now=NOW, signer=signer
        )
        with pytest.raises(DirectorMetadataError, match="not signed by a threshold"):
            _verify(data, root)


def test_tampered_instruction_is_refused(keys: tuple[CryptoSigner, CryptoSigner]) -> None:
    root = _root(*keys).signed
    data = sign_instruction(
        rel("1.1.0"), serial="s1", hardware_id=HW, nonce="n1", now=NOW, signer=keys[1]
    )
    raw = json.loads(data)
    raw["signed"]["targets"]["fw-1.1.0.img"]["length"] = 101
    with pytest.raises(DirectorMetadataError, match="not signed"):
        _verify(json.dumps(raw).encode(), root)


def test_two_targets_or_garbage_are_refused(keys: tuple[CryptoSigner, CryptoSigner]) -> None:
    root = _root(*keys).signed
    md = Metadata[Targets].from_bytes(
        sign_instruction(
            rel("1.1.0"), serial="s1", hardware_id=HW, nonce="n1", now=NOW, signer=keys[1]
        )
    )
    md.signed.targets["x"] = TargetFile(1, {"sha256": SHA}, "x", {"custom": {"hardware_id": HW}})
    md.signatures.clear()
    md.sign(keys[1])
    with pytest.raises(DirectorMetadataError, match="more than 1"):
        _verify(md.to_bytes(), root)
    for junk in (b"", b"{}", b"[1]", b"\xff" * 10, b"x" * (13 * 1024)):
        with pytest.raises(DirectorMetadataError):
            _verify(junk, root)


# -- matching the image repository ------------------------------------------------------
def _image(
    length: int = 100, hashes: dict[str, str] | None = None, hw: str = HW, sbom: bool = True
) -> TargetFile:
    custom: dict[str, object] = {"version": "1.1.0", "security_counter": 1, "hardware_ids": [hw],
                                 "release_type": "feature"}  # fmt: skip
    if sbom:
        custom["sbom"] = {"path": "fw-1.1.0.img.cdx.json", "hashes": {"sha256": "ab" * 32},
                          "length": 10}  # fmt: skip
    return TargetFile(length, hashes or {"sha256": SHA}, "fw-1.1.0.img", {"custom": custom})


def test_match_image_repository() -> None:
    instr = TargetFile(100, {"sha256": SHA}, "fw-1.1.0.img", {"custom": {"hardware_id": HW}})
    offer = match_image_repository(instr, _image(), hardware_id=HW)
    assert offer.info.version == Version.parse("1.1.0")
    for image, match in (
        (None, "lacks"),
        (_image(length=101), "bytes"),
        (_image(hashes={"sha256": "cd" * 32}), "hashes"),
        (_image(hashes={"sha256": SHA, "sha512": "ef" * 64}), "hashes"),
        (_image(hw="gw2"), "not for hardware"),
        # the director path accepts only images whose signed custom binds their SBOM
        (_image(sbom=False), "carries no SBOM binding"),
    ):
        with pytest.raises(DirectorMismatchError, match=match):
            match_image_repository(instr, image, hardware_id=HW)


# -- root rotation ------------------------------------------------------------------------
def test_root_rotation_is_followed_and_checked(keys: tuple[CryptoSigner, CryptoSigner]) -> None:
    old_key, targets_key = keys
    v1 = _root(old_key, targets_key)
    new_key = CryptoSigner.generate_ed25519()
    v2 = _root(new_key, targets_key, version=2)
    v2.sign(old_key, append=True)  # signed by the old root's threshold and the new one's
    chain = {2: v2.to_bytes()}
    data, root = follow_director_root(v1.to_bytes(), chain.get, now=NOW)
    assert root.version == 2
    assert data == v2.to_bytes()
    # A v2 signed only by its own new key: refused (the old root never vouched for it).
    rogue = _root(new_key, targets_key, version=2)
    with pytest.raises(DirectorMetadataError, match="root"):
        follow_director_root(v1.to_bytes(), {2: rogue.to_bytes()}.get, now=NOW)
    with pytest.raises(DirectorMetadataError, match="expired"):
        follow_director_root(v1.to_bytes(), {}.get, now=NOW + dt.timedelta(days=400))


# -- the offline director root -----------------------------------------------------------
def test_init_director_makes_a_hybrid_root_naming_the_server_key(tmp_path: Path) -> None:
    online = CryptoSigner.generate_ed25519()
    path = init_director(
        tmp_path / "director",
        keys_dir=tmp_path / "keys",
        passphrases=Unsafe.PLAINTEXT_KEYS,
        online_key=online.public_key,
        now=NOW,
    )
    root = Metadata[Root].from_bytes(path.read_bytes()).signed
    assert root.roles["root"].threshold == 2
    assert {root.keys[k].keytype for k in root.roles["root"].keyids} == {"ed25519", "ml-dsa"}
    assert root.roles["targets"].keyids == [online.public_key.keyid]
    assert not any((tmp_path / "director").rglob("*.pem"))  # no private key published
    assert load_director_roots(tmp_path / "director", keyid=online.public_key.keyid)
    with pytest.raises(ConfigError, match="does not name this server's director key"):
        load_director_roots(tmp_path / "director", keyid="00" * 32)
    with pytest.raises(OperatorError, match="outside"):
        init_director(
            tmp_path / "d2",
            keys_dir=tmp_path / "d2" / "keys",
            passphrases=Unsafe.PLAINTEXT_KEYS,
            online_key=online.public_key,
        )


# -- attack flags in the manifest --------------------------------------------------------
def _manifest(flags: object) -> dict[str, object]:
    return {
        "_type": "otaguard-device-manifest", "serial": "s1", "nonce": "n", "time": "t",
        "installed": None, "last_result": {}, "quote": None, "attack_flags": flags,
        "boot": {"sha256": SHA, "slot": None, "attested": False},
    }  # fmt: skip


def test_manifest_attack_flags_are_strict() -> None:
    m = DeviceManifest.from_dict(_manifest(["downgrade", "forged-image"]))
    assert m.attack_flags == ("downgrade", "forged-image")
    assert DeviceManifest.from_dict(m.to_dict()) == m
    for bad in (["nope"], ["downgrade", "downgrade"], "downgrade", [1], None):
        with pytest.raises(VerificationError, match="attack_flags"):
            DeviceManifest.from_dict(_manifest(bad))
