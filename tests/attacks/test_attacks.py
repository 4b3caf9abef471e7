"""Each attack performed against the real server and agent; each must be refused.

After every attack the device must still run a verified 1.1.0 from its primary slot,
with no install in progress and the anti-rollback floor unchanged.

The compromised server holds its online (snapshot and timestamp) key, as a real server
does; what it cannot get is a threshold of the offline root or targets keys.
"""

from __future__ import annotations

import datetime as dt

import pytest

from attack_support import assert_untouched as _assert_untouched
from attack_support import updated  # noqa: F401 - the fixture
from conftest import HW, PASSPHRASE, World
from otaguard.agent import Device
from otaguard.agent.attack_flags import read_flags
from otaguard.model.errors import DowngradeError, VerificationError
from otaguard.sim.attacks import CompromisedServer, steal_key
from sbom_support import sbom_beside


def test_tampered_image_blob_is_refused(updated: tuple[World, Device, CompromisedServer]) -> None:
    world, dev, attacker = updated
    rel = world.release("1.2.0")
    attacker.tamper_blob(rel.path)
    with pytest.raises(VerificationError, match="hash"):
        dev.update()
    _assert_untouched(dev)
    assert not any(dev.paths.staging.iterdir()), "tampered download must be discarded"


def test_replayed_old_metadata_is_refused(updated: tuple[World, Device, CompromisedServer]) -> None:
    _, dev, attacker = updated
    # The first timestamp the server ever served (before 1.1.0 existed), validly signed.
    attacker.serve_timestamp(
        "1.timestamp.json"
        if attacker.store.get_record("1.timestamp.json")
        else sorted(_timestamps(attacker))[0]
    )
    with pytest.raises(VerificationError, match="BadVersionNumber"):
        dev.update()
    _assert_untouched(dev)


def _timestamps(attacker: CompromisedServer) -> list[str]:
    newest = attacker.store.current_timestamp()
    assert newest is not None
    return [
        f"{v}.timestamp.json"
        for v in range(1, newest.version)
        if attacker.store.get_record(f"{v}.timestamp.json")
    ]


def test_newer_version_with_lower_security_counter_is_refused(
    updated: tuple[World, Device, CompromisedServer],
) -> None:
    world, dev, _ = updated
    # 1.1.0 raised the counter to 1; a "newer" build carrying counter 0 would reopen the hole.
    # The release tool refuses it, so an insider signs it with the library directly.
    from otaguard.model.errors import OperatorError

    with pytest.raises(OperatorError, match="below the highest"):
        world.repo.add_release(
            world.image("1.3.0"),
            sbom=sbom_beside(world.image("1.3.0")),
            version="1.3.0",
            hardware_ids=[HW],
            security=False,
            security_counter=0,
        )
    _publish_with_counter(world, "1.3.0", 0)
    with pytest.raises(DowngradeError, match="security counter"):
        dev.update()
    _assert_untouched(dev)


def _publish_with_counter(world: World, version: str, counter: int) -> None:
    """Bypass the release tool's checks (an insider with the offline keys)."""
    from tuf.api.metadata import Metadata, TargetFile, Targets

    repo = world.repo
    md = repo._latest("targets", Targets)
    image = world.image(version)
    tf = TargetFile.from_file(f"fw-{version}.img", str(image))
    tf.unrecognized_fields["custom"] = {
        "version": version,
        "security_counter": counter,
        "hardware_ids": [HW],
        "release_type": "feature",
    }
    md.signed.targets[tf.path] = tf
    md.signed.version += 1
    (repo.targets_dir / f"{tf.hashes['sha256']}.{tf.path}").write_bytes(image.read_bytes())
    assert isinstance(md, Metadata)
    repo._sign_and_write(md, "targets")  # the server signs snapshot and timestamp for it
    world.wait_served()


@pytest.mark.parametrize(
    "key_name",
    ["targets-ed25519", "targets-ml-dsa-65"],
    ids=["only-ed25519", "only-ml-dsa-65"],
)
def test_release_signed_by_one_hybrid_key_is_refused(
    updated: tuple[World, Device, CompromisedServer], key_name: str
) -> None:
    """A compromised server (online key) plus either half of the targets key gets nowhere.

    Snapshot and timestamp are validly signed by the server's own online key, so the
    device refuses for one reason only: the targets threshold (2) is not met.
    """
    world, dev, attacker = updated
    attacker.inject_targets(
        signers=[steal_key(world.repo, key_name, PASSPHRASE)],
        target_path="evil-9.9.9.img",
        payload=b"evil" * 1000,
        custom={
            "version": "9.9.9",
            "security_counter": 9,
            "hardware_ids": [HW],
            "release_type": "security",
        },
    )
    with pytest.raises(VerificationError, match=r"targets was signed by 1/2 keys") as refused:
        dev.update()
    assert "snapshot" not in str(refused.value) and "timestamp" not in str(refused.value)
    _assert_untouched(dev)


def test_online_key_only_mixes_offline_signed_targets(
    updated: tuple[World, Device, CompromisedServer],
) -> None:
    """The most a stolen online key does with targets: offer an older offline-signed one."""
    world, dev, attacker = updated
    older = world.repo.latest_version("targets") - 1  # before 1.1.0 was added
    attacker.serve_targets_version(older)
    with pytest.raises(VerificationError, match=r"BadVersionNumberError: .*targets\.json"):
        dev.update()
    _assert_untouched(dev)


def test_server_publish_api_refuses_under_signed_metadata(world: World) -> None:
    """The server's own verification refuses what the agent would refuse anyway."""
    from otaguard.server.client import publish_repository

    forged = world.tmp / "forged"
    import shutil

    shutil.copytree(world.repo.dir, forged)
    # Re-sign targets with one of the two keys only.
    from tuf.api.metadata import Metadata, Targets

    newest = world.repo.latest_version("targets")
    md = Metadata[Targets].from_file(str(forged / "metadata" / f"{newest}.targets.json"))
    md.signed.version += 1  # a new targets version the server would sign a snapshot for
    md.signatures.clear()
    md.sign(steal_key(world.repo, "targets-ed25519", PASSPHRASE))
    (forged / "metadata" / f"{newest + 1}.targets.json").write_bytes(md.to_bytes())
    assert world.server.ca_cert is not None
    with pytest.raises(
        VerificationError, match=r"UnsignedMetadataError: targets was signed by 1/2 keys"
    ):
        publish_repository(
            forged,
            server_url=world.server.base_url,
            ca_cert=world.server.ca_cert,
            token=world.server.operator_token,
        )


def test_image_for_other_hardware_is_never_offered(world: World) -> None:
    dev = world.device()
    world.repo.add_release(
        world.image("2.0.0"),
        sbom=sbom_beside(world.image("2.0.0")),
        version="2.0.0",
        hardware_ids=["other-hw"],
        security=False,
        security_counter=None,
    )
    world.wait_served()
    assert dev.update().outcome == "up-to-date"
    _assert_untouched(dev, "1.0.0")


def test_expired_timestamp_is_refused(world: World) -> None:
    """Freeze attack: a compromised server stops re-signing and serves an expired timestamp."""
    dev = world.device()
    world.server.app.state.resign.stop()  # a compromised server does not re-sign honestly
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    attacker = CompromisedServer(world.server.data_dir)
    try:
        # Validly signed with the server's own online key, but expired.
        attacker.plant_timestamp(attacker.sign_timestamp(expires=past))
    finally:
        attacker.close()
    with pytest.raises(VerificationError, match=r"[Ee]xpired"):
        dev.update()
    _assert_untouched(dev, "1.0.0")


def test_a_device_ahead_of_the_repository_is_not_an_attack(
    updated: tuple[World, Device, CompromisedServer],
) -> None:
    """The release a device runs is withdrawn: only older ones are offered. Without a
    director nothing names the older image, so this is no downgrade attempt: the device
    stays, says why, and raises no attack flag (a director naming it is: test_director)."""
    world, dev, _ = updated
    world.repo.withdraw_release(world.releases["1.1.0"].path)
    world.wait_served()
    result = dev.update()
    assert result.outcome == "up-to-date" and result.refused == []
    assert "1.1.0 is ahead of the repository (newest offered: 1.0.0)" in result.detail
    assert read_flags(dev.paths) == ()
    _assert_untouched(dev)
