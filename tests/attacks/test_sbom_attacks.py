"""The release SBOM against a compromised server and an insider: performed for real.

The device downloads the SBOM the image target binds through python-tuf, with the image,
before anything is written to a slot: a tampered, missing or unbound SBOM refuses the
install, and the device keeps running what it ran. A successful install records the
SBOM's digest in the boot environment and in the signed manifest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from tuf.api.metadata import Metadata, TargetFile, Targets

from conftest import HW, PASSPHRASE, World
from otaguard.agent import Device, Phase
from otaguard.agent.checkin import build_manifest
from otaguard.model.errors import TransportError, VerificationError
from otaguard.repo import Release
from otaguard.sim.attacks import CompromisedServer, steal_key

TARGETS_KEYS = ("targets-ed25519", "targets-ml-dsa-65")


@pytest.fixture
def updated(world: World) -> Iterator[tuple[World, Device, CompromisedServer]]:
    dev = world.device()
    world.release("1.1.0", security=True)
    assert dev.update().outcome == "updated"
    attacker = CompromisedServer(world.server.data_dir)
    yield world, dev, attacker
    attacker.close()


def _assert_untouched(dev: Device, rel: Release) -> None:
    st = dev.status()
    primary = st.bootenv.slots[st.bootenv.primary]
    assert primary is not None and primary.version == "1.1.0"
    assert rel.info.sbom is not None and primary.sbom_sha256 == rel.info.sbom.sha256
    assert st.bootenv.try_slot is None and st.install.phase is Phase.IDLE
    assert str(st.floor.version) == "1.1.0"
    assert not any(dev.paths.staging.iterdir()), "nothing refused stays staged"


def test_installed_sbom_digest_is_in_status_and_signed_manifest(
    updated: tuple[World, Device, CompromisedServer],
) -> None:
    world, dev, _ = updated
    ref = world.releases["1.1.0"].info.sbom
    assert ref is not None
    _assert_untouched(dev, world.releases["1.1.0"])
    manifest = build_manifest(dev.paths, dev.config, nonce="n" * 43, tpm=None)
    assert manifest.installed is not None
    assert manifest.installed.sbom_sha256 == ref.sha256
    assert manifest.to_dict()["installed"]["sbom_sha256"] == ref.sha256


def test_tampered_sbom_blob_is_refused(updated: tuple[World, Device, CompromisedServer]) -> None:
    world, dev, attacker = updated
    rel = world.release("1.2.0", security=True)
    assert rel.info.sbom is not None
    # after publishing: the server's copy of the SBOM changes, its signed hash does not
    attacker.tamper_blob(rel.info.sbom.path)
    with pytest.raises(
        VerificationError, match=rf"download of {re.escape(rel.info.sbom.path)}.*hash"
    ):
        dev.update()
    _assert_untouched(dev, world.releases["1.1.0"])
    result = dev.status().install.last_result or {}
    assert result.get("outcome") == "refused" and "cdx.json" in str(result.get("detail"))


def test_missing_sbom_blob_is_refused(updated: tuple[World, Device, CompromisedServer]) -> None:
    world, dev, attacker = updated
    rel = world.release("1.2.0", security=True)
    assert rel.info.sbom is not None
    for blob in (attacker.data_dir / "blobs").glob(f"*.{rel.info.sbom.path}"):
        blob.unlink()
    with pytest.raises(
        TransportError, match=rf"download of {re.escape(rel.info.sbom.path)}: HTTP 404"
    ):
        dev.update()
    _assert_untouched(dev, world.releases["1.1.0"])


def _insider_publish(world: World, version: str, *, sbom: dict[str, object] | None) -> None:
    """An insider with the offline keys signs an image target the tool would refuse."""
    repo = world.repo
    md: Metadata[Targets] = repo._latest("targets", Targets)
    image = world.image(version)
    tf = TargetFile.from_file(f"fw-{version}.img", str(image))
    custom: dict[str, object] = {"version": version, "security_counter": 1,
                                 "hardware_ids": [HW], "release_type": "security"}  # fmt: skip
    if sbom is not None:
        custom["sbom"] = sbom
    tf.unrecognized_fields["custom"] = custom
    md.signed.targets[tf.path] = tf
    md.signed.version += 1
    (repo.targets_dir / f"{tf.hashes['sha256']}.{tf.path}").write_bytes(image.read_bytes())
    repo._sign_and_write(md, "targets")
    world.wait_served()


def test_image_without_sbom_binding_is_refused(
    updated: tuple[World, Device, CompromisedServer],
) -> None:
    world, dev, _ = updated
    _insider_publish(world, "1.3.0", sbom=None)
    with pytest.raises(VerificationError, match=r"fw-1\.3\.0\.img carries no SBOM binding"):
        dev.update()
    _assert_untouched(dev, world.releases["1.1.0"])


@pytest.mark.parametrize(
    ("listed", "cause"),
    [
        (False, r"SBOM fw-1\.3\.0\.img\.cdx\.json of fw-1\.3\.0\.img is missing"),
        (True, r"SBOM fw-1\.1\.0-1\.1\.0\.img\.cdx\.json is not the one fw-1\.3\.0\.img binds"),
    ],
)
def test_sbom_binding_to_other_bytes_is_refused(
    updated: tuple[World, Device, CompromisedServer], listed: bool, cause: str
) -> None:
    world, dev, attacker = updated
    # Insiders with the targets threshold bind an SBOM the metadata does not list (a name
    # it lacks, or 1.1.0's listed SBOM with other bytes); the update server would refuse to
    # publish that (tests/unit/test_sbom.py), so a compromised server serves it directly.
    ref = world.releases["1.1.0"].info.sbom
    assert ref is not None
    binding = (
        {"path": ref.path, "hashes": {"sha256": "ab" * 32}, "length": ref.length}
        if listed
        else {"path": "fw-1.3.0.img.cdx.json", "hashes": {"sha256": ref.sha256},
              "length": ref.length}
    )  # fmt: skip
    attacker.inject_targets(
        signers=[steal_key(world.repo, n, PASSPHRASE) for n in TARGETS_KEYS],
        target_path="fw-1.3.0.img",
        payload=world.image("1.3.0").read_bytes(),
        custom={"version": "1.3.0", "security_counter": 1, "hardware_ids": [HW],
                "release_type": "security", "sbom": binding},
    )  # fmt: skip
    with pytest.raises(VerificationError, match=cause):
        dev.update()
    _assert_untouched(dev, world.releases["1.1.0"])
