"""Attacks against a running server, for the demo and the attack tests.

Each attack models a threat from DESIGN.md §1 with the access that threat grants: a
compromised server or mirror can rewrite anything it stores and serves; a thief of one
offline key can sign with that key only. None of them is given what the design keeps
out of reach (a threshold of offline keys).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

from otaguard.crypto.keys import load_signer
from otaguard.model.errors import OperatorError
from otaguard.server.storage.base import MetadataRecord
from otaguard.server.storage.sql import SQLMetadataStore, sqlite_url

__all__ = ["AttackOutcome", "CompromisedServer"]


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
    """An attacker with write access to a server's data directory (DB and blobs)."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.store = SQLMetadataStore(sqlite_url(data_dir / "otaguard.db"))

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

    def inject_targets(
        self,
        *,
        signers: list[CryptoSigner],
        snapshot_signer: CryptoSigner,
        timestamp_signer: CryptoSigner,
        target_path: str,
        payload: bytes,
        custom: dict[str, object],
    ) -> None:
        """Serve new targets metadata signed by ``signers`` only, listing a malicious image.

        Snapshot and timestamp are re-signed with the (stolen) online keys and the blob
        is planted, so the only thing missing is a full threshold on targets.
        """
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
        records = [
            _rec(
                f"{targets.signed.version}.targets.json", "targets", targets.signed.version, t_bytes
            ),
            _rec(
                f"{snapshot.signed.version}.snapshot.json",
                "snapshot",
                snapshot.signed.version,
                s_bytes,
            ),
            _rec(
                f"{timestamp.signed.version}.timestamp.json",
                "timestamp",
                timestamp.signed.version,
                ts_bytes,
            ),
        ]
        self.store.publish(
            records,
            timestamp=records[-1].filename,
            now=dt.datetime.now(dt.UTC),
            expected_timestamp=ts_rec.filename,
        )

    def _newest(self, role: str) -> MetadataRecord:
        rec = self.store.newest(role)
        if rec is None:
            raise OperatorError(f"server has no {role} metadata")
        return rec


def _rec(filename: str, role: str, version: int, data: bytes) -> MetadataRecord:
    return MetadataRecord(filename, role, version, data, hashlib.sha256(data).hexdigest())


def steal_key(
    repo_dir: Path, filename: str, algorithm: str, passphrase: bytes | None
) -> CryptoSigner:
    """Load one private key from a repository, as an insider or thief would."""
    return load_signer(repo_dir / "keys" / filename, algorithm=algorithm, passphrase=passphrase)
