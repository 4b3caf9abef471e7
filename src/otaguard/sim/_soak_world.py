"""The soak's world: a real ``otaguard server`` process, the offline repository it follows,
the releases published into it, and an independent check of what the server serves.

The server runs as the operator runs it (``python -m otaguard server --data --repo
--port``) in a process group of its own, so the soak can SIGKILL it at any instant and
start it again on the same data directory and port. The repository is in server mode
(the server's online key signs snapshot and timestamp), with hybrid offline root and
targets keys, as in production.

:class:`RepositoryAudit` is the "fresh client": from the offline root it verifies the whole
chain the server serves now (root rotations, timestamp, snapshot, targets) with
python-tuf's :class:`TrustedMetadataSet`, remembers the highest timestamp and snapshot
versions it ever saw (a restarted server must never serve lower ones), and can download
every target and check it against the signed length and hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from otaguard.crypto import read_public_key
from otaguard.model.errors import NotReadyError, OtaguardError, VerificationError
from otaguard.model.limits import MAX_ROOT_ROTATIONS, METADATA_MAX_LENGTHS
from otaguard.repo import ImageRepository
from otaguard.repo.transfer import TransferRequest
from otaguard.server import init_data_dir
from otaguard.server.auth import OPERATOR_TOKEN_FILE
from otaguard.sim.fleet import make_image
from otaguard.sim.sbom import make_sbom

__all__ = [
    "HARDWARE_ID",
    "AuditResult",
    "PublishedImage",
    "RepositoryAudit",
    "ServerProcess",
    "SoakRepository",
    "agent_env",
    "free_port",
]

logger = logging.getLogger(__name__)

#: the soak's devices' hardware id
HARDWARE_ID: Final = "soak-board"
#: a server process imports, opens its store and binds within seconds; a minute is broken
SERVER_START_TIMEOUT_S: Final = 60.0
#: how long a published release may take to be served (the server follows its repository
#: directory about once a second)
SERVE_TIMEOUT_S: Final = 30.0
#: one request of the audit (the server is on loopback)
AUDIT_TIMEOUT_S: Final = 10.0
#: patched regions per release: a release differs from the previous one in a few KiB, as
#: a security fix does, so its delta is small and its full image is not
PATCHES_PER_RELEASE: Final = 32
PATCH_BYTES: Final = 256


def agent_env() -> dict[str, str]:
    """The environment for otaguard child processes: this one without otaguard settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}


def free_port() -> int:
    """A TCP port on loopback that is free now (the server binds it; it keeps it across
    restarts, as a deployment's address does)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


class ServerProcess:
    """``otaguard server`` in a process group of its own: start, SIGKILL, start again."""

    def __init__(self, *, data_dir: Path, repo_dir: Path, port: int, log_path: Path) -> None:
        self.data_dir = data_dir
        self.repo_dir = repo_dir
        self.port = port
        self.base_url = f"https://127.0.0.1:{port}"
        self.ca_cert = data_dir / "ca" / "ca.pem"
        self.operator_token = (data_dir / OPERATOR_TOKEN_FILE).read_text().strip()
        self.log_path = log_path
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        #: set while the server answers; cleared from a kill until it is up again
        self.up = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the server and wait until it answers ``/healthz``.

        Raises:
            NotReadyError: it exited or did not answer within the timeout.
        """
        with self._lock:
            self._start()

    def _start(self) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "otaguard", "server", "--data", str(self.data_dir),
             "--repo", str(self.repo_dir), "--port", str(self.port)],
            env=agent_env(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.starts += 1
        self._wait_healthy(self._proc)
        self.up.set()

    def _wait_healthy(self, proc: subprocess.Popen[bytes]) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise NotReadyError(
                    f"the server exited with {proc.returncode} (log: {self.log_path})"
                )
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=2)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        raise NotReadyError(f"the server did not answer within {SERVER_START_TIMEOUT_S:.0f} s")

    def kill_and_restart(self) -> None:
        """SIGKILL the server's process group (a crash or power loss), start it again on
        the same data directory and port."""
        with self._lock:
            self.up.clear()
            self._kill()
            self._start()

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        if self._log is not None:
            self._log.close()
        self._proc = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers); idempotent."""
        with self._lock:
            self.up.clear()
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=20)
            self._kill()


@dataclass(frozen=True)
class PublishedImage:
    """A published release's image: what a device running it must hold."""

    version: str
    path: str
    length: int
    sha256: str


class SoakRepository:
    """The offline image repository (server mode) and its releases, each a few KiB away
    from the previous one; encodings rotate: full only, zstd, zstd and a delta."""

    def __init__(self, repo: ImageRepository, work: Path, *, image_size: int, seed: int):
        self.repo = repo
        self.work = work
        self.image_size = image_size
        self._rng = random.Random(seed)  # noqa: S311 - test content, not a secret
        self.images: dict[str, PublishedImage] = {}
        self.versions: list[str] = []

    @classmethod
    def create(cls, work: Path, *, image_size: int, seed: int) -> tuple[SoakRepository, Path]:
        """Prepare the server's data directory and the offline repository naming its key.

        Returns the repository and the server's data directory.
        """
        paths = init_data_dir(work / "server")
        passphrase = secrets.token_urlsafe(24).encode()
        repo = ImageRepository.init(
            work / "repo",
            keys_dir=work / "offline-keys",
            passphrases=lambda _name: passphrase,
            online_key=read_public_key(paths.online_public_key),
        )
        return cls(repo, work, image_size=image_size, seed=seed), paths.data_dir

    def image_file(self, version: str) -> Path:
        """The image file of a published (or the next) version."""
        return self.work / "images" / f"{version}.img"

    def _make_image(self, version: str) -> Path:
        path = self.image_file(version)
        path.parent.mkdir(exist_ok=True)
        if not self.versions:
            return make_image(path, size=self.image_size, seed=version)
        data = bytearray(self.image_file(self.versions[-1]).read_bytes())
        for _ in range(PATCHES_PER_RELEASE):
            at = self._rng.randrange(len(data) - PATCH_BYTES)
            data[at : at + PATCH_BYTES] = self._rng.randbytes(PATCH_BYTES)
        path.write_bytes(bytes(data))
        return path

    def publish(self, version: str) -> PublishedImage:
        """Sign ``version`` into the repository (the server picks it up by itself)."""
        image = self._make_image(version)
        n = len(self.versions)
        transfer = None
        if n % 3 == 1:
            transfer = TransferRequest(compress="zstd")
        elif n % 3 == 2:
            transfer = TransferRequest(compress="zstd", delta_from=(self.versions[-1],))
        rel = self.repo.add_release(
            image,
            version=version,
            hardware_ids=[HARDWARE_ID],
            security=False,
            security_counter=None,
            sbom=make_sbom(image.with_suffix(".cdx.json"), name="soak-fw", version=version),
            transfer=transfer,
        )
        published = PublishedImage(version, rel.path, rel.length, rel.sha256)
        self.images[version] = published
        self.versions.append(version)
        return published


@dataclass(frozen=True)
class AuditResult:
    """What a fresh client verified the server serves."""

    timestamp: int
    snapshot: int
    targets: int
    target_files: dict[str, TargetFile] = field(repr=False)


class RepositoryAudit:
    """A fresh TUF client, each time, over the operator's HTTPS access to the server."""

    def __init__(self, *, trusted_root: bytes, server: ServerProcess) -> None:
        self._trusted_root = trusted_root
        self._server = server
        self.highest_timestamp = 0
        self.highest_snapshot = 0
        #: chains verified
        self.checks = 0
        self._http = urllib3.PoolManager(
            ca_certs=str(server.ca_cert),
            timeout=AUDIT_TIMEOUT_S,
            retries=False,
            headers={"Authorization": f"Bearer {server.operator_token}"},
        )

    def close(self) -> None:
        """Close the audit's connections."""
        self._http.clear()

    def _get(self, path: str, cap: int) -> bytes | None:
        try:
            resp = self._http.request("GET", self._server.base_url + path, preload_content=False)
            try:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise VerificationError(f"GET {path}: the server answered {resp.status}")
                data = resp.read(cap + 1)
            finally:
                resp.release_conn()
        except urllib3.exceptions.HTTPError as e:
            raise NotReadyError(f"GET {path}: {e}") from e
        if len(data) > cap:
            raise VerificationError(f"GET {path}: more than {cap} bytes")
        return data

    def _need(self, role: str, name: str) -> bytes:
        data = self._get(f"/metadata/{name}", METADATA_MAX_LENGTHS[role])
        if data is None:
            raise VerificationError(f"the server serves no metadata/{name}")
        return data

    def check(self) -> AuditResult:
        """Verify what the server serves now, from the offline root.

        Raises:
            VerificationError: the chain does not verify, or the timestamp or snapshot
                version went below one served before.
            NotReadyError: the server could not be reached.
        """
        try:
            tms = TrustedMetadataSet(self._trusted_root, EnvelopeType.METADATA)
            for _ in range(MAX_ROOT_ROTATIONS):
                nxt = self._get(f"/metadata/{tms.root.version + 1}.root.json", 1 << 20)
                if nxt is None:
                    break
                tms.update_root(nxt)
            tms.update_timestamp(self._need("timestamp", "timestamp.json"))
            snap = tms.timestamp.snapshot_meta.version
            tms.update_snapshot(self._need("snapshot", f"{snap}.snapshot.json"))
            tgt = tms.snapshot.meta["targets.json"].version
            tms.update_targets(self._need("targets", f"{tgt}.targets.json"))
        except (tuf_exc.RepositoryError, DeserializationError, KeyError, ValueError) as e:
            raise VerificationError(f"served metadata: {type(e).__name__}: {e}") from e
        ts, sn = tms.timestamp.version, tms.snapshot.version
        if ts < self.highest_timestamp or sn < self.highest_snapshot:
            raise VerificationError(
                f"the server went back: timestamp {ts} (served {self.highest_timestamp} "
                f"before), snapshot {sn} (served {self.highest_snapshot} before)"
            )
        self.highest_timestamp, self.highest_snapshot = ts, sn
        self.checks += 1
        return AuditResult(ts, sn, tms.targets.version, dict(tms.targets.targets))

    def wait_targets(self, version: int) -> AuditResult:
        """Audit until the server serves targets ``version`` (just published).

        Raises:
            NotReadyError: not served within the timeout.
            VerificationError: as :meth:`check`.
        """
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            try:
                result = self.check()
                if result.targets == version:
                    return result
            except NotReadyError:
                if not self._server.up.is_set():  # a restart in progress: wait for it
                    self._server.up.wait(SERVER_START_TIMEOUT_S)
            if time.monotonic() > deadline:
                raise NotReadyError(f"targets version {version} not served in time")
            time.sleep(0.1)

    def check_blobs(self, result: AuditResult) -> int:
        """Download every target ``result`` lists and check its signed length and hashes.

        Returns the number of targets checked.

        Raises:
            VerificationError: a blob is missing or differs from its target.
        """
        for name, target in sorted(result.target_files.items()):
            # consistent snapshots: blobs are served under their digest
            data = self._get(f"/targets/{target.hashes['sha256']}.{name}", target.length)
            if data is None:
                raise VerificationError(f"the server serves no targets/{name}")
            try:
                target.verify_length_and_hashes(data)
            except tuf_exc.LengthOrHashMismatchError as e:
                raise VerificationError(f"targets/{name}: {e}") from e
        return len(result.target_files)


def sha256_prefix(path: Path, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of ``path`` (a slot holds an image and slack)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        left = length
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def error_line(e: OtaguardError | OSError) -> str:
    """One line naming an error and its kind."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
