"""Attacks against a running server, for the demo and the attack tests.

Each attack models a threat from docs/design.md §1 with the access that threat grants: a
compromised server can rewrite anything it stores and serves, and sign with the online
(snapshot and timestamp) key it legitimately holds; a thief of one offline key can sign
with that key only. None of them is given what the design keeps out of reach (a
threshold of offline root or targets keys).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from otaguard.crypto.signers import load_signer, resolve_key_uri
from otaguard.model.errors import OperatorError
from otaguard.repo import ImageRepository
from otaguard.server._signal import ChangeSignal
from otaguard.server.online import load_online_signer
from otaguard.server.storage.base import MetadataRecord
from otaguard.server.storage.database import sqlite_url
from otaguard.server.storage.migrate import open_database
from otaguard.server.storage.notify import NotifyingMetadataStore

__all__ = ["AttackOutcome", "CompromisedServer", "steal_key"]


@dataclass
class AttackOutcome:
    """How the fleet answered one attack."""

    name: str
    refused: int
    total: int
    reason: str

    @property
    def ok(self) -> bool:
        """True when every device refused."""
        return self.total > 0 and self.refused == self.total


class CompromisedServer:
    """An attacker who took over a server: its data directory (DB, blobs) and online key.

    The online key signs snapshot and timestamp, so the attacker can serve any
    combination of offline-signed targets it has seen, or freeze on one; it still cannot
    make a device accept targets that a threshold of offline keys did not sign.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        # The running server migrated it; the attacker uses it as it is, and announces
        # what it writes as any server process sharing the data directory does, so the
        # running server serves it at once (ADR 0016).
        self.store = NotifyingMetadataStore(
            open_database(sqlite_url(data_dir / "otaguard.db"), upgrade=False),
            on_change=ChangeSignal(data_dir, "published").touch,
        )
        #: the server's own snapshot and timestamp key, as a compromised server holds it
        self.online_signer = load_online_signer(data_dir)

    def close(self) -> None:
        """Release the database."""
        self.store.close()

    def tamper_blob(self, target_path: str) -> Path:
        """Flip one bit in the middle of the stored blob of ``target_path``."""
        matches = list((self.data_dir / "blobs").glob(f"*.{target_path}"))
        if not matches:
            raise OperatorError(f"no blob for {target_path} on the server")
        blob = matches[0]
        with open(blob, "r+b") as f:
            size = f.seek(0, 2)
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        return blob

    def current_timestamp(self) -> str:
        """Stored name of the timestamp being served."""
        rec = self.store.current_timestamp()
        if rec is None:
            raise OperatorError("server serves no timestamp")
        return rec.filename

    def serve_timestamp(self, filename: str) -> None:
        """Point the served timestamp at an older stored one (replay / rollback)."""
        rec = self.store.get_record(filename)
        if rec is None:
            raise OperatorError(f"server has no {filename}")
        self.store.publish(
            [],
            timestamp=filename,
            now=dt.datetime.now(dt.UTC),
            expected_timestamp=self.current_timestamp(),
        )

    def plant_timestamp(self, data: bytes) -> None:
        """Serve ``data`` as the timestamp, bypassing every check the server makes."""
        ts = Metadata[Timestamp].from_bytes(data)
        version = ts.signed.version
        rec = _rec(f"{version}.timestamp.json", "timestamp", version, data)
        self.store.publish(
            [rec],
            timestamp=rec.filename,
            now=dt.datetime.now(dt.UTC),
            expected_timestamp=self.current_timestamp(),
        )

    def sign_timestamp(self, *, expires: dt.datetime) -> bytes:
        """A validly signed next timestamp for the served snapshot, expiring at ``expires``.

        With ``expires`` in the past this is a freeze attack: serving it keeps devices
        on what they have, and they notice because it is expired.
        """
        ts_rec = self.store.current_timestamp()
        if ts_rec is None:
            raise OperatorError("server serves no timestamp")
        newest = self.store.newest("timestamp")
        ts = Metadata[Timestamp].from_bytes(ts_rec.data)
        ts.signed.version = (newest.version if newest else ts.signed.version) + 1
        ts.signed.expires = expires.replace(microsecond=0)
        ts.sign(self.online_signer)
        return ts.to_bytes()

    def plant_root(self, data: bytes) -> None:
        """Store ``data`` as the next ``N.root.json``, bypassing every check the server makes."""
        root = Metadata[Root].from_bytes(data)
        version = root.signed.version
        self.store.publish(
            [_rec(f"{version}.root.json", "root", version, data)],
            timestamp=None,
            now=dt.datetime.now(dt.UTC),
            expected_timestamp=self.current_timestamp(),
        )

    def serve_targets_version(
        self, targets_version: int, *, snapshot_expires: dt.datetime | None = None
    ) -> None:
        """Serve an older, offline-signed targets version under a fresh snapshot.

        The most a stolen online key can do with targets: mix and match versions that
        the offline keys signed. A device that has seen a newer one refuses the rollback.
        With ``snapshot_expires`` in the past it is a freeze of the snapshot role instead.
        """
        if self.store.get(f"{targets_version}.targets.json") is None:
            raise OperatorError(f"server has no {targets_version}.targets.json")
        newest_snap = self._newest("snapshot")
        snapshot = Metadata[Snapshot].from_bytes(newest_snap.data)
        expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=1)
        snapshot.signed.version = newest_snap.version + 1
        snapshot.signed.expires = (snapshot_expires or expires).replace(microsecond=0)
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets_version)
        snapshot.sign(self.online_signer)
        s_bytes = snapshot.to_bytes()
        ts_rec = self.store.current_timestamp()
        assert ts_rec is not None  # noqa: S101 - a snapshot exists, so a timestamp does
        timestamp = Metadata[Timestamp].from_bytes(self._newest("timestamp").data)
        timestamp.signed.version += 1
        timestamp.signed.expires = expires
        timestamp.signed.snapshot_meta = MetaFile.from_data(
            snapshot.signed.version, s_bytes, ["sha256"]
        )
        timestamp.sign(self.online_signer)
        ts_bytes = timestamp.to_bytes()
        self._serve([snapshot, timestamp], [s_bytes, ts_bytes], replacing=ts_rec.filename)

    def inject_targets(
        self,
        *,
        signers: list[Signer],
        target_path: str,
        payload: bytes,
        custom: dict[str, object],
        snapshot_signer: Signer | None = None,
        timestamp_signer: Signer | None = None,
        targets_expires: dt.datetime | None = None,
    ) -> None:
        """Serve new targets metadata signed by ``signers`` only, listing a malicious image.

        Snapshot and timestamp are signed with the server's online key (or the given
        signers, e.g. stolen local-mode keys) and the blob is planted, so the only thing
        missing is a full threshold on targets. ``targets_expires`` replaces the targets
        expiry (a freeze: targets once validly signed, since expired).
        """
        snapshot_signer = snapshot_signer or self.online_signer
        timestamp_signer = timestamp_signer or self.online_signer
        targets = Metadata[Targets].from_bytes(self._newest("targets").data)
        snapshot = Metadata[Snapshot].from_bytes(self._newest("snapshot").data)
        ts_rec = self.store.current_timestamp()
        assert ts_rec is not None  # noqa: S101
        timestamp = Metadata[Timestamp].from_bytes(ts_rec.data)
        expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=1)

        tf = TargetFile.from_data(target_path, payload)
        tf.unrecognized_fields["custom"] = custom
        targets.signed.targets[target_path] = tf
        targets.signed.version += 1
        if targets_expires is not None:
            targets.signed.expires = targets_expires.replace(microsecond=0)
        targets.signatures.clear()
        for s in signers:
            targets.sign(s, append=True)
        t_bytes = targets.to_bytes()

        snapshot.signed.version += 1
        snapshot.signed.expires = expires
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        snapshot.sign(snapshot_signer)
        s_bytes = snapshot.to_bytes()

        timestamp.signed.version += 1
        timestamp.signed.expires = expires
        timestamp.signed.snapshot_meta = MetaFile.from_data(
            snapshot.signed.version, s_bytes, ["sha256"]
        )
        timestamp.sign(timestamp_signer)
        ts_bytes = timestamp.to_bytes()

        digest = hashlib.sha256(payload).hexdigest()
        blobs = self.data_dir / "blobs"
        (blobs / f"{digest}.{target_path}").write_bytes(payload)
        self._serve(
            [targets, snapshot, timestamp], [t_bytes, s_bytes, ts_bytes], replacing=ts_rec.filename
        )

    def _serve(self, mds: list[Metadata[Any]], data: list[bytes], *, replacing: str) -> None:
        """Write signed files straight into the store and point the timestamp at the last."""
        records = [
            _rec(f"{md.signed.version}.{md.signed.type}.json", md.signed.type, md.signed.version, b)
            for md, b in zip(mds, data, strict=True)
        ]
        self.store.publish(
            records,
            timestamp=records[-1].filename,
            now=dt.datetime.now(dt.UTC),
            expected_timestamp=replacing,
        )

    def _newest(self, role: str) -> MetadataRecord:
        rec = self.store.newest(role)
        if rec is None:
            raise OperatorError(f"server has no {role} metadata")
        return rec


def _rec(filename: str, role: str, version: int, data: bytes) -> MetadataRecord:
    return MetadataRecord(filename, role, version, data, hashlib.sha256(data).hexdigest())


def steal_key(repo: ImageRepository, name: str, passphrase: bytes) -> Signer:
    """Load one offline private key (e.g. ``targets-ed25519``), as a thief of that key would.

    Args:
        repo: the repository whose keys directory holds the key.
        name: the key's name.
        passphrase: that key's passphrase (the thief has both the file and the secret).
    """
    for role in ("root", "targets", "snapshot", "timestamp"):
        for ref in repo.key_refs(role):
            if ref.name == name and ref.uri is not None:
                root = Metadata[Root].from_file(str(repo.metadata_dir / "root.json")).signed
                return load_signer(
                    resolve_key_uri(ref.uri, repo.keys_dir),
                    root.keys[ref.keyid],
                    name=name,
                    secrets=lambda _name: passphrase,
                )
    raise OperatorError(f"the repository has no key named {name}")
