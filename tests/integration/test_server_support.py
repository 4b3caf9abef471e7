"""A small TUF repository writer for the server tests (python-tuf Metadata API, ed25519).

Writes the same on-disk layout as otaguard.repo: metadata/N.<role>.json, root.json,
timestamp.json (last), targets/<sha256>.<path>. No tests here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from otaguard._fs import atomic_write_bytes

ROLES = ("root", "targets", "snapshot", "timestamp")


class RepoWriter:
    """Builds and signs a consistent-snapshot repository in ``path``."""

    def __init__(self, path: Path, *, expires_in: dt.timedelta = dt.timedelta(days=7)):
        self.path = path
        self.meta_dir = path / "metadata"
        self.targets_dir = path / "targets"
        self.meta_dir.mkdir(parents=True)
        self.targets_dir.mkdir()
        self.expires = (dt.datetime.now(dt.UTC) + expires_in).replace(microsecond=0)
        self.signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        root = Root(expires=self.expires, consistent_snapshot=True)
        for role, signer in self.signers.items():
            root.add_key(signer.public_key, role)
        self.root: Metadata[Root] = Metadata(root)
        self.targets: Metadata[Targets] = Metadata(Targets(expires=self.expires))
        self.snapshot: Metadata[Snapshot] = Metadata(Snapshot(expires=self.expires))
        self.timestamp: Metadata[Timestamp] = Metadata(Timestamp(expires=self.expires))
        self.write_root()
        self.publish(bump=False)

    def sign(self, md: Metadata[Any], role: str) -> bytes:
        md.signatures.clear()
        md.sign(self.signers[role])
        return md.to_bytes()

    def write_root(self) -> None:
        data = self.sign(self.root, "root")
        atomic_write_bytes(self.meta_dir / f"{self.root.signed.version}.root.json", data)
        atomic_write_bytes(self.meta_dir / "root.json", data)

    def rotate_timestamp_key(self) -> None:
        """Write a new root version with a new timestamp key (signed by the root key)."""
        old = self.signers["timestamp"]
        self.root.signed.revoke_key(old.public_key.keyid, "timestamp")
        self.signers["timestamp"] = CryptoSigner.generate_ed25519()
        self.root.signed.add_key(self.signers["timestamp"].public_key, "timestamp")
        self.root.signed.version += 1
        self.write_root()

    def add_target(self, name: str, content: bytes, *, version: str = "1.0.0") -> str:
        """Store a blob and list it in targets; returns the blob name. Call publish() after."""
        sha = hashlib.sha256(content).hexdigest()
        blob = f"{sha}.{name}"
        atomic_write_bytes(self.targets_dir / blob, content)
        tf = TargetFile.from_data(name, content, ["sha256"])
        tf.unrecognized_fields["custom"] = {
            "version": version,
            "security_counter": 0,
            "hardware_ids": ["hw1"],
            "release_type": "feature",
        }
        self.targets.signed.targets[name] = tf
        return blob

    def publish(self, *, bump: bool = True, write_timestamp: bool = True) -> dict[str, bytes]:
        """Sign new targets/snapshot/timestamp versions; timestamp.json is written last."""
        if bump:
            self.targets.signed.version += 1
            self.snapshot.signed.version += 1
            self.timestamp.signed.version += 1
        tv = self.targets.signed.version
        t_bytes = self.sign(self.targets, "targets")
        atomic_write_bytes(self.meta_dir / f"{tv}.targets.json", t_bytes)
        self.snapshot.signed.meta["targets.json"] = MetaFile(version=tv)
        sv = self.snapshot.signed.version
        s_bytes = self.sign(self.snapshot, "snapshot")
        atomic_write_bytes(self.meta_dir / f"{sv}.snapshot.json", s_bytes)
        self.timestamp.signed.snapshot_meta = MetaFile.from_data(sv, s_bytes, ["sha256"])
        ts_bytes = self.sign(self.timestamp, "timestamp")
        if write_timestamp:
            atomic_write_bytes(self.meta_dir / "timestamp.json", ts_bytes)
        return {
            f"{tv}.targets.json": t_bytes,
            f"{sv}.snapshot.json": s_bytes,
            "timestamp.json": ts_bytes,
        }

    def files(self) -> dict[str, bytes]:
        """Every metadata file on disk, by name."""
        return {p.name: p.read_bytes() for p in sorted(self.meta_dir.iterdir())}
