"""The hybrid policy (ADR 0014): classical AND ML-DSA signatures, on top of the threshold.

Targets has 3 signers, 2 classical (Ed25519) and 1 ML-DSA-65, threshold 2. Two classical
signatures meet the threshold; the policy in root refuses them, on the device (the
agent's ``TufSession`` against an in-memory mirror) and at publication (the walk that
``repo verify`` and the server's publish API run).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Role, Root, Snapshot, Targets, Timestamp

from otaguard.agent.updater import TufSession
from otaguard.crypto.hybrid import (
    HYBRID_FIELD,
    check_hybrid,
    check_root_update,
    is_hybrid,
    mark_hybrid,
)
from otaguard.crypto.keys import generate_signer
from otaguard.crypto.signers import load_signer, resolve_key_uri
from otaguard.model import Unsafe
from otaguard.model.errors import HybridPolicyError, VerificationError
from otaguard.repo import ImageRepository, RoleKeySpec, check_repository
from otaguard.sim.memory import MemoryFetcher, read_repository_files
from sbom_support import sbom_beside

NOW = datetime.now(UTC).replace(microsecond=0)


def _signed(signed: Root | Targets, signers: list[Signer]) -> Metadata[Root | Targets]:
    md: Metadata[Root | Targets] = Metadata(signed)
    for s in signers:
        md.sign(s, append=True)
    return md


@pytest.fixture(scope="module")
def keys() -> dict[str, Signer]:
    return {
        "ed": generate_signer("ed25519"),
        "ed2": generate_signer("ed25519"),
        "ml": generate_signer("ml-dsa-65"),
        "ml-other": generate_signer("ml-dsa-65"),
    }


def _root(keys: dict[str, Signer], *, hybrid: bool, version: int = 1) -> Root:
    root = Root(version=version, expires=NOW + timedelta(days=30))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.roles[role] = Role([], threshold=2 if role in ("root", "targets") else 1)
    for name in ("ed", "ed2", "ml"):
        root.add_key(keys[name].public_key, "root")
        root.add_key(keys[name].public_key, "targets")
    root.add_key(keys["ml-other"].public_key, "snapshot")  # an ML-DSA key of another role
    root.add_key(keys["ed"].public_key, "timestamp")
    if hybrid:
        mark_hybrid(root, "root")
        mark_hybrid(root, "targets")
    return root


def test_threshold_met_by_two_classical_is_not_enough(keys: dict[str, Signer]) -> None:
    root = _root(keys, hybrid=True)
    md = _signed(Targets(expires=NOW + timedelta(days=1)), [keys["ed"], keys["ed2"]])
    root.verify_delegate("targets", md.signed_bytes, md.signatures)  # TUF: threshold met
    with pytest.raises(HybridPolicyError, match="no valid ML-DSA signature"):
        check_hybrid(root, "targets", md.signed_bytes, md.signatures)
    only_pq = _signed(Targets(expires=NOW + timedelta(days=1)), [keys["ml"]])
    with pytest.raises(HybridPolicyError, match="no valid classical"):
        check_hybrid(root, "targets", only_pq.signed_bytes, only_pq.signatures)
    good = _signed(Targets(expires=NOW + timedelta(days=1)), [keys["ed"], keys["ml"]])
    check_hybrid(root, "targets", good.signed_bytes, good.signatures)


def test_only_valid_signatures_by_the_roles_own_keys_count(keys: dict[str, Signer]) -> None:
    root = _root(keys, hybrid=True)
    # an ML-DSA key root lists for another role signs: it is not a targets key
    md = _signed(Targets(expires=NOW + timedelta(days=1)), [keys["ed"], keys["ml-other"]])
    with pytest.raises(HybridPolicyError, match="no valid ML-DSA"):
        check_hybrid(root, "targets", md.signed_bytes, md.signatures)
    # the targets ML-DSA key's signature over other bytes does not count either
    other = _signed(Targets(version=2, expires=NOW + timedelta(days=1)), [keys["ml"]])
    ml_id = keys["ml"].public_key.keyid
    forged = _signed(Targets(expires=NOW + timedelta(days=1)), [keys["ed"]])
    forged.signatures[ml_id] = other.signatures[ml_id]
    with pytest.raises(HybridPolicyError, match="no valid ML-DSA"):
        check_hybrid(root, "targets", forged.signed_bytes, forged.signatures)


def test_a_policy_that_cannot_be_read_fails_closed(keys: dict[str, Signer]) -> None:
    root = _root(keys, hybrid=False)
    root.roles["targets"].unrecognized_fields[HYBRID_FIELD] = "yes"
    with pytest.raises(HybridPolicyError, match="is not true/false"):
        is_hybrid(root, "targets")
    with pytest.raises(VerificationError, match="cannot be hybrid"):
        mark_hybrid(root, "timestamp")  # one Ed25519 key: no metadata could ever verify


def test_stripping_the_policy_from_root_breaks_its_signatures(keys: dict[str, Signer]) -> None:
    md = _signed(_root(keys, hybrid=True), [keys["ed"], keys["ml"]])
    stripped = Metadata[Root].from_bytes(md.to_bytes())
    assert isinstance(stripped.signed, Root)
    del stripped.signed.roles["targets"].unrecognized_fields[HYBRID_FIELD]
    with pytest.raises(UnsignedMetadataError):
        stripped.signed.verify_delegate("root", stripped.signed_bytes, stripped.signatures)


def test_a_new_root_drops_the_policy_only_signed_hybrid_by_the_old_keys(
    keys: dict[str, Signer],
) -> None:
    v1 = _root(keys, hybrid=True)
    v2 = _root(keys, hybrid=False, version=2)
    classical = _signed(v2, [keys["ed"], keys["ed2"]])
    for delegator in (v1, v2):  # TUF's rule alone: both thresholds met
        delegator.verify_delegate("root", classical.signed_bytes, classical.signatures)
    with pytest.raises(HybridPolicyError, match="root v1 marks root hybrid; no valid ML-DSA"):
        check_root_update(v1, classical.to_bytes())
    proper = _signed(v2, [keys["ed"], keys["ml"]])
    assert check_root_update(v1, proper.to_bytes()).version == 2
    # past v2 the policy is gone: classical signatures alone are enough again
    v3 = _signed(_root(keys, hybrid=False, version=3), [keys["ed"], keys["ed2"]])
    check_root_update(v2, v3.to_bytes())


# -- the repository, a device and publication -------------------------------------------
class World:
    """A server-less repository, targets 2-of-3 (2 Ed25519 + 1 ML-DSA-65), one release."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.repo = ImageRepository.init(
            tmp / "repo",
            keys_dir=tmp / "keys",
            passphrases=Unsafe.PLAINTEXT_KEYS,
            key_specs={"targets": RoleKeySpec(3, 2), "root": RoleKeySpec(3, 2)},
        )
        img = tmp / "fw.img"
        img.write_bytes(os.urandom(2048))
        self.repo.add_release(
            img,
            version="1.0.0",
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
            sbom=sbom_beside(img),
        )
        self.files = {k: v for k, v in read_repository_files(self.repo.dir).items()}

    def signer(self, name: str) -> Signer:
        role = name.split("-", 1)[0]
        ref = next(r for r in self.repo.key_refs(role) if r.name == name)
        assert ref.uri is not None
        return load_signer(
            resolve_key_uri(ref.uri, self.repo.keys_dir),
            self.repo.latest_root().keys[ref.keyid],
            name=name,
            secrets=Unsafe.PLAINTEXT_KEYS,
        )

    def serve_targets(self, change: Callable[[Metadata[Targets]], None]) -> None:
        """Replace the served targets' signatures (snapshot pins its version only)."""
        name = f"metadata/{self.repo.latest_version('targets')}.targets.json"
        md = Metadata[Targets].from_bytes(self.files[name])
        change(md)
        self.files[name] = md.to_bytes()

    def device(self) -> TufSession:
        d = self.tmp / f"device-{len(list(self.tmp.glob('device-*')))}"
        d.mkdir()
        return TufSession(
            metadata_dir=d,
            trusted_root=self.files["metadata/1.root.json"],
            server_url="https://repo.invalid",
            fetcher=MemoryFetcher(self.files),
        )

    def device_again(self) -> TufSession:
        """The newest device again, with its cache."""
        d = sorted(self.tmp.glob("device-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        return TufSession(
            metadata_dir=d,
            trusted_root=self.files["metadata/1.root.json"],
            server_url="https://repo.invalid",
            fetcher=MemoryFetcher(self.files),
        )

    def publication_problem(self) -> str | None:
        files = {k.split("/", 1)[1]: v for k, v in self.files.items() if k.startswith("metadata/")}
        return check_repository(files, now=datetime.now(UTC)).problem


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("hybrid"))


def test_repo_init_makes_root_and_targets_hybrid(world: World) -> None:
    root = world.repo.latest_root()
    assert is_hybrid(root, "root") and is_hybrid(root, "targets")
    assert not is_hybrid(root, "snapshot") and not is_hybrid(root, "timestamp")
    world.device().refresh()  # all three targets keys signed: accepted
    assert world.publication_problem() is None


def test_two_classical_signatures_are_refused_by_device_and_publication(world: World) -> None:
    saved = dict(world.files)
    try:
        ed, ed2 = world.signer("targets-ed25519"), world.signer("targets-ed25519-2")

        def classical_only(md: Metadata[Targets]) -> None:
            md.signatures.clear()
            md.sign(ed, append=True)
            md.sign(ed2, append=True)

        world.serve_targets(classical_only)
        with pytest.raises(HybridPolicyError, match="no valid ML-DSA signature"):
            world.device().refresh()
        problem = world.publication_problem()
        assert problem is not None and "UnsignedMetadataError" in problem
        assert "marks targets hybrid; no valid ML-DSA signature" in problem
    finally:
        world.files.clear()
        world.files.update(saved)


def test_stripping_the_ml_dsa_signature_from_hybrid_targets_is_refused(world: World) -> None:
    saved = dict(world.files)
    try:
        ml_id = next(r.keyid for r in world.repo.key_refs("targets") if "ml-dsa" in r.name)
        root = world.repo.latest_root()

        def strip(md: Metadata[Targets]) -> None:
            del md.signatures[ml_id]
            root.verify_delegate("targets", md.signed_bytes, md.signatures)  # still 2 of 3

        world.serve_targets(strip)
        with pytest.raises(HybridPolicyError, match="no valid ML-DSA signature"):
            world.device().refresh()
        assert "no valid ML-DSA signature" in (world.publication_problem() or "")
    finally:
        world.files.clear()
        world.files.update(saved)


def _next_root(world: World, version: int, change: Callable[[Root], None], *signers: str) -> bytes:
    prev = Metadata[Root].from_bytes(world.files[f"metadata/{version - 1}.root.json"])
    md = Metadata[Root].from_bytes(prev.to_bytes())
    md.signed.version = version
    change(md.signed)
    md.signatures.clear()
    for name in signers:
        md.sign(world.signer(name), append=True)
    data = md.to_bytes()
    world.files[f"metadata/{version}.root.json"] = data
    return data


def _drop(role: str) -> Callable[[Root], None]:
    return lambda root: root.roles[role].unrecognized_fields.pop(HYBRID_FIELD)


def test_a_device_refuses_a_root_dropping_the_policy_signed_classical_only(
    world: World, tmp_path: Path
) -> None:
    saved = dict(world.files)
    try:
        # root 2-of-3 (2 Ed25519, 1 ML-DSA): both thresholds met by the classical pair
        _next_root(world, 2, _drop("root"), "root-ed25519", "root-ed25519-2")
        dev = world.device()
        with pytest.raises(HybridPolicyError, match=r"2\.root\.json: root v1 marks root hybrid"):
            dev.refresh()
        devices = sorted(world.tmp.glob("device-*"), key=lambda p: int(p.name.split("-")[1]))
        # refused before ngclient could make it the device's trust anchor
        assert not (devices[-1] / "root_history" / "2.root.json").exists()
        assert "marks root hybrid" in (world.publication_problem() or "")
        # the same root signed hybrid by the old root keys: the policy may go
        _next_root(world, 2, _drop("root"), "root-ed25519", "root-ml-dsa-65")
        world.device().refresh()
    finally:
        world.files.clear()
        world.files.update(saved)


def _publish_targets(world: World, md: Metadata[Targets], *signers: str) -> None:
    """Serve ``md`` signed by ``signers``, with a snapshot and timestamp naming it."""
    md.signatures.clear()
    for name in signers:
        md.sign(world.signer(name), append=True)
    world.files[f"metadata/{md.signed.version}.targets.json"] = md.to_bytes()
    ts = Metadata[Timestamp].from_bytes(world.files["metadata/timestamp.json"])
    snap_name = f"metadata/{ts.signed.snapshot_meta.version}.snapshot.json"
    snap = Metadata[Snapshot].from_bytes(world.files[snap_name])
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(version=md.signed.version)
    snap.signatures.clear()
    snap.sign(world.signer("snapshot-ed25519"))
    data = snap.to_bytes()
    world.files[f"metadata/{snap.signed.version}.snapshot.json"] = data
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile.from_data(snap.signed.version, data, ["sha256"])
    ts.signatures.clear()
    ts.sign(world.signer("timestamp-ed25519"))
    world.files["metadata/timestamp.json"] = ts.to_bytes()


def test_a_cached_targets_is_checked_when_a_new_root_marks_targets_hybrid(
    world: World,
) -> None:
    saved = dict(world.files)
    try:
        hybrid = ("root-ed25519", "root-ml-dsa-65")
        _next_root(world, 2, _drop("targets"), *hybrid)  # targets not hybrid any more
        name = f"metadata/{world.repo.latest_version('targets')}.targets.json"
        md = Metadata[Targets].from_bytes(world.files[name])
        md.signed.version += 1
        _publish_targets(world, md, "targets-ed25519", "targets-ed25519-2")
        dev = world.device()
        dev.refresh()  # classical targets accepted while the policy is off; ngclient caches it
        # root 3 marks targets hybrid again; nothing else changes: ngclient takes the
        # cached targets as final without fetching it (it never passes the gate)
        _next_root(world, 3, lambda r: mark_hybrid(r, "targets"), *hybrid)
        with pytest.raises(HybridPolicyError, match=r"trusted targets\.json: root v3 marks"):
            world.device_again().refresh()
    finally:
        world.files.clear()
        world.files.update(saved)
