"""Key rotation and recovery (ADR 0014), against the real agent's ngclient session.

A server-less repository serves from memory to devices (``TufSession`` over
``MemoryFetcher``, the agent's own verification path including the hybrid gate). Keys
are plaintext development files so that the tests stay fast; the rotation code only
sees signer URIs.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import Signer
from tuf.api.exceptions import BadVersionNumberError, UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Timestamp

from otaguard.agent.director import follow_director_root
from otaguard.agent.updater import TufSession
from otaguard.cli import main
from otaguard.crypto.hybrid import is_hybrid
from otaguard.crypto.keys import generate_signer, write_private_key
from otaguard.crypto.signers import load_signer, resolve_key_uri, write_public_key
from otaguard.model import Unsafe
from otaguard.model.errors import (
    ConfigError,
    DirectorMetadataError,
    OperatorError,
    VerificationError,
)
from otaguard.repo import ImageRepository, SigningRequest, publish_request, sign_request
from otaguard.repo.director import init_director, rotate_director
from otaguard.repo.rotation import NewKey, rotate, stage_rotation, stage_targets
from otaguard.sim.memory import MemoryFetcher, read_repository_files
from sbom_support import sbom_beside

PLAIN = Unsafe.PLAINTEXT_KEYS


def new_key(directory: Path, name: str, algorithm: str) -> NewKey:
    """A new plaintext key file with its .pub.json, as 'otaguard key generate' writes."""
    signer = generate_signer(algorithm)
    path = directory / f"{name}.pem"
    write_private_key(path, signer, passphrase=PLAIN)
    write_public_key(path.with_name(path.name + ".pub.json"), signer.public_key)
    return NewKey(signer.public_key, f"file2:{path}")


class Repo:
    """A server-less repository and devices that fetch it from memory."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.new_keys = tmp / "new-keys"
        self.new_keys.mkdir()
        self.repo = ImageRepository.init(tmp / "repo", keys_dir=tmp / "keys", passphrases=PLAIN)
        self.files: dict[str, bytes] = {}
        self.serve()

    def release(self, version: str) -> None:
        img = self.tmp / f"fw-{version}.img"
        img.write_bytes(os.urandom(1024))
        self.repo.add_release(
            img,
            version=version,
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
            sbom=sbom_beside(img),
        )
        self.serve()

    def serve(self) -> None:
        self.files.clear()
        self.files.update(read_repository_files(self.repo.dir))

    def device(self, name: str) -> TufSession:
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        return TufSession(
            metadata_dir=d,
            trusted_root=(self.repo.metadata_dir / "1.root.json").read_bytes(),
            server_url="https://repo.invalid",
            fetcher=MemoryFetcher(self.files),
        )

    def newest(self, session: TufSession) -> str:
        offers, bad = session.offers("hw")
        assert not bad
        return str(max(o.info.version for o in offers))

    def signer(self, role: str, name: str, root: Root) -> Signer:
        """A key file as an attacker who stole it would load it."""
        keyid = next(r.keyid for r in self.repo.key_refs(role) if r.name == name)
        uri = next(r.uri for r in self.repo.key_refs(role) if r.name == name)
        assert uri is not None
        return load_signer(
            resolve_key_uri(uri, self.repo.keys_dir), root.keys[keyid], name=name, secrets=PLAIN
        )


@pytest.fixture
def world(tmp_path: Path) -> Repo:
    w = Repo(tmp_path)
    w.release("1.0.0")
    return w


def _rotate(w: Repo, role: str, add: list[NewKey], remove: list[str]) -> None:
    rotate(w.repo, role=role, add=add, remove=remove, threshold=None, secrets=PLAIN)
    w.serve()


def test_device_offline_across_three_rotations_follows_the_chain(world: Repo) -> None:
    w = world
    dev = w.device("dev")
    dev.refresh()
    assert w.newest(dev) == "1.0.0"
    root1 = w.repo.latest_root()
    old_root_key = w.signer("root", "root-ed25519", root1)
    old_ts_key = w.signer("timestamp", "timestamp-ed25519", root1)

    # 1: root-ed25519 is compromised: replaced (the old threshold, it included, signs v2)
    _rotate(w, "root", [new_key(w.new_keys, "root-ed25519-b", "ed25519")], ["root-ed25519"])
    # 2: a targets key replaced; targets is re-signed by the new keys at once
    _rotate(w, "targets", [new_key(w.new_keys, "targets-ed25519-b", "ed25519")],
            ["targets-ed25519"])  # fmt: skip
    # 3: the timestamp key replaced; snapshot and timestamp re-signed (local mode)
    _rotate(w, "timestamp", [new_key(w.new_keys, "timestamp-b", "ed25519")],
            ["timestamp-ed25519"])  # fmt: skip
    w.release("1.1.0")
    assert w.repo.latest_version("root") == 4
    assert [r.name for r in w.repo.key_refs("root")] == ["root-ml-dsa-65", "root-ed25519-b"]
    assert is_hybrid(w.repo.latest_root(), "root") and is_hybrid(w.repo.latest_root(), "targets")

    dev = w.device("dev")  # offline since root 1; same factory root, same cache
    dev.refresh()
    assert w.newest(dev) == "1.1.0"
    history = sorted(p.name for p in (w.tmp / "dev" / "root_history").iterdir())
    assert history == ["1.root.json", "2.root.json", "3.root.json", "4.root.json"]
    fresh = w.device("fresh")  # a device from the factory walks 1 -> 4 too
    fresh.refresh()
    assert w.newest(fresh) == "1.1.0"

    # Metadata signed only by a removed key is refused. A timestamp by the old key:
    ts = Metadata[Timestamp].from_bytes(w.files["metadata/timestamp.json"])
    ts.signed.version += 1
    ts.signatures.clear()
    ts.sign(old_ts_key)
    w.files["metadata/timestamp.json"] = ts.to_bytes()
    with pytest.raises(VerificationError) as refused:
        w.device("dev").refresh()
    assert isinstance(refused.value.__cause__, UnsignedMetadataError)
    assert "timestamp was signed by 0/1 keys" in str(refused.value)
    # A root 5 by the compromised (removed) root key:
    w.serve()
    root5 = Metadata[Root].from_bytes(w.files["metadata/4.root.json"])
    root5.signed.version = 5
    root5.signatures.clear()
    root5.sign(old_root_key)
    w.files["metadata/5.root.json"] = root5.to_bytes()
    with pytest.raises(VerificationError) as refused:
        w.device("dev").refresh()
    assert isinstance(refused.value.__cause__, UnsignedMetadataError)
    assert "root was signed by 0/2 keys" in str(refused.value)
    assert not (w.tmp / "dev" / "root_history" / "5.root.json").exists()


def _fast_forward(w: Repo, ts_key: Signer, snap_key: Signer, version: int) -> None:
    """The attacker with the timestamp and snapshot keys serves versions far ahead."""
    snap = Metadata[Snapshot].from_bytes(
        w.files[f"metadata/{w.repo.latest_version('snapshot')}.snapshot.json"]
    )
    snap.signed.version = version
    snap.signatures.clear()
    snap.sign(snap_key)
    data = snap.to_bytes()
    ts = Metadata[Timestamp].from_bytes(w.files["metadata/timestamp.json"])
    ts.signed.version = version
    ts.signed.snapshot_meta = MetaFile.from_data(version, data, ["sha256"])
    ts.signatures.clear()
    ts.sign(ts_key)
    w.files[f"metadata/{version}.snapshot.json"] = data
    w.files["metadata/timestamp.json"] = ts.to_bytes()


def test_fast_forward_recovery_after_timestamp_and_snapshot_key_compromise(world: Repo) -> None:
    w = world
    dev = w.device("dev")
    dev.refresh()
    root1 = w.repo.latest_root()
    _fast_forward(
        w,
        w.signer("timestamp", "timestamp-ed25519", root1),
        w.signer("snapshot", "snapshot-ed25519", root1),
        version=1_000_000,
    )
    w.device("dev").refresh()  # the stolen keys sign validly: the device accepts
    cached = json.loads((w.tmp / "dev" / "timestamp.json").read_bytes())
    assert cached["signed"]["version"] == 1_000_000

    # The real repository moves on; the device is frozen: its versions are "ahead".
    w.release("1.1.0")
    with pytest.raises(VerificationError) as frozen:
        w.device("dev").refresh()
    assert isinstance(frozen.value.__cause__, BadVersionNumberError)

    # Recovery: the timestamp and snapshot keys rotated in new roots (TUF §5.3.11).
    _rotate(w, "timestamp", [new_key(w.new_keys, "timestamp-b", "ed25519")],
            ["timestamp-ed25519"])  # fmt: skip
    _rotate(w, "snapshot", [new_key(w.new_keys, "snapshot-b", "ed25519")],
            ["snapshot-ed25519"])  # fmt: skip
    dev = w.device("dev")
    dev.refresh()  # the cached fast-forwarded files no longer verify: dropped
    assert w.newest(dev) == "1.1.0"
    cached = json.loads((w.tmp / "dev" / "timestamp.json").read_bytes())
    assert cached["signed"]["version"] < 1_000


def test_root_rotation_by_ceremony_needs_old_and_new_signers(world: Repo) -> None:
    w = world
    dev = w.device("dev")
    dev.refresh()
    new = new_key(w.new_keys, "root-ml-dsa-65-b", "ml-dsa-65")
    with pytest.raises(OperatorError, match="root is hybrid: it would be left without"):
        stage_rotation(w.repo, role="root", add=[], remove=["root-ml-dsa-65"], threshold=1,
                       out=w.tmp / "bad.json")  # fmt: skip
    req_path = w.tmp / "root-2.request.json"
    staged = stage_rotation(w.repo, role="root", add=[new], remove=["root-ml-dsa-65"],
                            threshold=None, out=req_path)  # fmt: skip
    text = "\n".join(staged.render())
    assert f"+ key root-ml-dsa-65-b {new.public_key.keyid}" in text
    assert "- key root-ml-dsa-65 " in text and "HYBRID" in text

    def sign(name: str, uri: str) -> None:
        request = SigningRequest.load(req_path)
        sign_request(request, uri=uri, secrets=PLAIN, key_name=name)
        request.save(req_path)

    keys = w.repo.keys_dir
    sign("root-ed25519", f"file2:{keys / 'root-ed25519.pem'}")
    sign("root-ml-dsa-65", f"file2:{keys / 'root-ml-dsa-65.pem'}")
    with pytest.raises(OperatorError) as missing:
        publish_request(w.repo, SigningRequest.load(req_path))
    assert str(missing.value) == (
        "root 2 needs 2 of 2 signatures, has 1 (root-ed25519); missing signers: root-ml-dsa-65-b"
    )
    assert new.uri is not None
    sign("root-ml-dsa-65-b", new.uri)
    publish_request(w.repo, SigningRequest.load(req_path))
    assert [r.name for r in w.repo.key_refs("root")] == ["root-ed25519", "root-ml-dsa-65-b"]
    report, _ = w.repo.verify()
    assert not report.all_problems()
    w.release("1.1.0")  # signed after the rotation, with the repository's config
    dev = w.device("dev")
    dev.refresh()
    assert w.newest(dev) == "1.1.0"


def test_targets_rotation_by_ceremony_then_targets_signed_by_the_new_keys(
    world: Repo, caplog: pytest.LogCaptureFixture
) -> None:
    w = world
    w.device("dev").refresh()
    new = new_key(w.new_keys, "targets-ml-dsa-65-b", "ml-dsa-65")
    req = w.tmp / "root-2.request.json"
    stage_rotation(w.repo, role="targets", add=[new], remove=["targets-ml-dsa-65"],
                   threshold=None, out=req)  # fmt: skip
    keys = w.repo.keys_dir
    for name in ("root-ed25519", "root-ml-dsa-65"):
        request = SigningRequest.load(req)
        sign_request(request, uri=f"file2:{keys / (name + '.pem')}", secrets=PLAIN, key_name=name)
        request.save(req)
    publish_request(w.repo, SigningRequest.load(req))
    assert "targets no longer verifies under root 2" in caplog.text
    w.serve()
    with pytest.raises(VerificationError, match="targets was signed by 1/2 keys"):
        w.device("dev").refresh()  # the old ML-DSA signature does not count any more
    treq = w.tmp / "targets-3.request.json"
    staged = stage_targets(w.repo, out=treq)
    assert staged.summary["version"] == 3 and staged.summary["changed"] == []
    for name, uri in (("targets-ed25519", f"file2:{keys / 'targets-ed25519.pem'}"),
                      ("targets-ml-dsa-65-b", new.uri)):  # fmt: skip
        assert uri is not None
        request = SigningRequest.load(treq)
        sign_request(request, uri=uri, secrets=PLAIN, key_name=name)
        request.save(treq)
    publish_request(w.repo, SigningRequest.load(treq))
    w.serve()
    dev = w.device("dev")
    dev.refresh()
    assert w.newest(dev) == "1.0.0"


def test_policy_switched_off_and_on_by_rotation(world: Repo) -> None:
    """A repository made before the policy (or by choice) switches it by a signed root."""
    w = world
    for step, hybrid in ((2, False), (3, True)):
        rotate(w.repo, role="targets", add=[], remove=[], threshold=None, secrets=PLAIN,
               hybrid=hybrid)  # fmt: skip
        assert w.repo.latest_version("root") == step
        assert is_hybrid(w.repo.latest_root(), "targets") is hybrid
    w.serve()
    w.device("dev").refresh()
    with pytest.raises(OperatorError, match="nothing to rotate"):
        rotate(w.repo, role="targets", add=[], remove=[], threshold=None, secrets=PLAIN,
               hybrid=True)  # fmt: skip
    with pytest.raises(OperatorError, match="snapshot is hybrid: it would be left without"):
        rotate(w.repo, role="snapshot", add=[], remove=[], threshold=None, secrets=PLAIN,
               hybrid=True)  # fmt: skip


def test_cli_rotate_snapshot_key_and_list_it(
    world: Repo, capsys: pytest.CaptureFixture[str]
) -> None:
    w = world
    signer = generate_signer("ed25519")
    path = w.new_keys / "snapshot-new.pem"
    write_private_key(path, signer, passphrase=PLAIN)
    write_public_key(path.with_name(path.name + ".pub.json"), signer.public_key)
    args = ["repo", "rotate", str(w.repo.dir), "--role", "snapshot",
            "--add-key", f"file2:{path}", "--remove-key", "snapshot-ed25519",
            "--insecure-plaintext-keys"]  # fmt: skip
    assert main(args) == 0
    assert "published root version 2: snapshot keys rotated" in capsys.readouterr().out
    assert main(["key", "list", str(w.repo.dir)]) == 0
    listing = capsys.readouterr().out
    assert "snapshot-new  snapshot (1 of 1)" in listing and "snapshot-ed25519" not in listing
    assert main(["repo", "verify", str(w.repo.dir)]) == 0
    # nothing to change is refused in one line
    assert main([*args[:5], "--insecure-plaintext-keys"]) == 2
    assert "nothing to rotate" in capsys.readouterr().err


def test_director_root_and_director_key_rotation(tmp_path: Path) -> None:
    online = generate_signer("ed25519")
    directory, keys = tmp_path / "director", tmp_path / "dkeys"
    init_director(directory, keys_dir=keys, passphrases=PLAIN, online_key=online.public_key)
    meta = directory / "metadata"
    first = (meta / "1.root.json").read_bytes()
    assert is_hybrid(Metadata[Root].from_bytes(first).signed, "root")
    (tmp_path / "new").mkdir()
    new_root_key = new_key(tmp_path / "new", "director-root-ml-dsa-65-b", "ml-dsa-65")
    second_ed = new_key(tmp_path / "new", "director-root-ed25519-b", "ed25519")
    # root 2-of-3 from now on: two Ed25519 keys and a new ML-DSA key (the old one leaves)
    rotate_director(directory, role="root", add=[new_root_key, second_ed],
                    remove=["director-root-ml-dsa-65"], threshold=2, keys_dir=keys,
                    passphrases=PLAIN)  # fmt: skip
    new_online = generate_signer("ed25519")
    pub = tmp_path / "director-key.pub.json"
    write_public_key(pub, new_online.public_key)
    rotate_director(directory, role="targets", add=[NewKey(new_online.public_key, None)],
                    remove=[online.public_key.keyid], threshold=None, keys_dir=keys,
                    passphrases=PLAIN)  # fmt: skip
    config = json.loads((directory / "otaguard-director.json").read_text())
    assert config["online_key"] == new_online.public_key.keyid

    def fetch(version: int) -> bytes | None:
        p = meta / f"{version}.root.json"
        return p.read_bytes() if p.exists() else None

    data, root = follow_director_root(first, fetch, now=datetime.now(UTC))
    assert root.version == 3 and root.roles["targets"].keyids == [new_online.public_key.keyid]
    assert data == (meta / "root.json").read_bytes()

    # A director root 4 dropping the policy, signed by the two Ed25519 root keys: both TUF
    # thresholds are met; the hybrid rule of root 3 refuses it.
    v4 = Metadata[Root].from_bytes(data)
    v4.signed.version = 4
    v4.signed.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=9)
    v4.signed.roles["root"].unrecognized_fields.clear()
    v4.signatures.clear()
    config = json.loads((directory / "otaguard-director.json").read_text())
    for ref in config["keys"]:
        if ref["algorithm"] == "ed25519":
            v4.sign(load_signer(resolve_key_uri(ref["uri"], keys), root.keys[ref["keyid"]],
                                name="x", secrets=PLAIN), append=True)  # fmt: skip
    for delegator in (root, v4.signed):
        delegator.verify_delegate("root", v4.signed_bytes, v4.signatures)
    with pytest.raises(DirectorMetadataError, match="marks root hybrid; no valid ML-DSA"):
        follow_director_root(first, lambda v: v4.to_bytes() if v == 4 else fetch(v),
                             now=datetime.now(UTC))  # fmt: skip
    # carried into the director directory, the server refuses it as devices would
    from otaguard.server.director import load_director_roots

    (meta / "4.root.json").write_bytes(v4.to_bytes())
    with pytest.raises(ConfigError, match="marks root hybrid; no valid ML-DSA"):
        load_director_roots(directory, keyid=new_online.public_key.keyid)


def test_server_picks_up_its_rotated_online_key_on_restart(tmp_path: Path) -> None:
    """Server mode: the online (snapshot/timestamp) key rotated in root 2; the server,
    restarted with the new key, signs snapshot and timestamp for the new root by itself
    (targets unchanged) and a device provisioned with root 1 updates through it."""
    from urllib.parse import urlsplit

    from conftest import World
    from otaguard.crypto import read_public_key
    from otaguard.server import ServerSettings, init_data_dir, start_server_in_thread

    paths = init_data_dir(tmp_path / "server")
    repo = ImageRepository.init(
        tmp_path / "repo", keys_dir=tmp_path / "keys", passphrases=PLAIN,
        online_key=read_public_key(paths.online_public_key),
    )  # fmt: skip

    def start(port: int = 0):  # type: ignore[no-untyped-def]
        return start_server_in_thread(
            ServerSettings(data_dir=paths.data_dir, repo_dir=repo.dir, host="127.0.0.1",
                           port=port, sync_interval=0.1)
        )  # fmt: skip

    server = start()
    w = World(tmp_path, repo, server, {}, {})
    try:
        w.release("1.0.0")
        dev = w.device()
        assert dev.update().outcome == "up-to-date"
        # the new online key, made where the server runs; its public half goes to root
        new = generate_signer("ed25519")
        new_pub = tmp_path / "new-online.pub.json"
        write_public_key(new_pub, new.public_key)
        assert main(["repo", "rotate", str(repo.dir), "--role", "timestamp",
                     "--add-key", str(new_pub), "--remove-key", "server-online",
                     "--insecure-plaintext-keys"]) == 0  # fmt: skip
        root2 = repo.latest_root()
        for role in ("snapshot", "timestamp"):  # one server key signs both
            assert root2.roles[role].keyids == [new.public_key.keyid]
            assert [r.name for r in ImageRepository(repo.dir).key_refs(role)] == ["server-online-2"]
        port = urlsplit(server.base_url).port
        assert port is not None
        server.stop()
        # the operator swaps the server's key (a token key: --online-key-uri) and restarts
        private = paths.data_dir / "online-key.pem"
        private.write_bytes(new.private_bytes)
        write_public_key(paths.online_public_key, new.public_key)
        server = start(port)
        w.server = server
        w.wait_served()  # root 2, and a timestamp the new key signed
        w.release("1.1.0")
        result = dev.update()
        assert result.outcome == "updated" and result.to_version == "1.1.0"
        assert json.loads((dev.paths.metadata / "root.json").read_bytes())["signed"]["version"] == 2
    finally:
        server.stop()
