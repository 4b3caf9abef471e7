"""``otaguard-conformance`` end to end: tuf-conformance's client protocol over real HTTP.

A repository made with otaguard's own tooling (hybrid Ed25519 + ML-DSA-65 keys, local
mode) is served from its directory by Python's ``http.server`` on loopback, started by
the test and logging every request. The console script runs as the suite runs it: one
process per command, ``--insecure-http`` (the suite serves plain HTTP). The full suite is
``make conformance`` (docs/conformance.md); these tests keep the protocol and the two
refusals the suite cares most about in ``make test``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from otaguard.agent.fetcher import USER_AGENT
from otaguard.model import Unsafe
from otaguard.repo import ImageRepository
from sbom_support import sbom_beside

SCRIPT = Path(sys.executable).parent / "otaguard-conformance"


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]
    user_agents: set[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.user_agents.add(self.headers.get("User-Agent", ""))
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the requests list is the log


class Served:
    """A repository directory served over HTTP, its requests recorded."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = ImageRepository.init(
            tmp / "repo", keys_dir=tmp / "keys", passphrases=Unsafe.PLAINTEXT_KEYS
        )
        self.requests: list[str] = []
        self.user_agents: set[str] = set()
        handler = type(
            "Handler", (_Handler,), {"requests": self.requests, "user_agents": self.user_agents}
        )
        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(handler, directory=str(self.repo.dir))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.metadata_dir = tmp / "client" / "metadata"
        self.target_dir = tmp / "client" / "targets"
        self.metadata_dir.mkdir(parents=True)
        self.target_dir.mkdir()

    def release(self, version: str) -> str:
        """Publish ``version`` (local mode: targets, snapshot, timestamp re-signed)."""
        image = self.tmp / f"fw-{version}.img"
        image.write_bytes(os.urandom(4096))
        return self.repo.add_release(
            image,
            version=version,
            hardware_ids=["hw"],
            security=False,
            security_counter=None,
            sbom=sbom_beside(image),
        ).path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The console script with the suite's arguments (``args`` end with the command)."""
        assert SCRIPT.is_file(), f"{SCRIPT} is not installed: pip install -e . (make test does)"
        return subprocess.run(
            [str(SCRIPT), "--insecure-http", "--metadata-dir", str(self.metadata_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def init(self) -> subprocess.CompletedProcess[str]:
        return self.run("init", str(self.repo.metadata_dir / "1.root.json"))

    def refresh(self) -> subprocess.CompletedProcess[str]:
        return self.run("--metadata-url", f"{self.url}/metadata", "refresh")

    def download(self, *names: str) -> subprocess.CompletedProcess[str]:
        target_args = [a for n in names for a in ("--target-name", n)]
        return self.run(
            "--metadata-url", f"{self.url}/metadata", *target_args,
            "--target-base-url", f"{self.url}/targets", "--target-dir", str(self.target_dir),
            "download",
        )  # fmt: skip

    def trusted_version(self, role: str) -> int:
        signed = json.loads((self.metadata_dir / f"{role}.json").read_bytes())["signed"]
        return int(signed["version"])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line besides the development-mode warning; fails unless there is one."""
    lines = [ln for ln in result.stderr.splitlines() if ln and "INSECURE" not in ln]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_init_refresh_download_over_the_agent_path(served: Served) -> None:
    name = served.release("1.0.0")

    init = served.init()
    assert init.returncode == 0, init.stderr
    assert served.requests == []  # init makes no request (the protocol's rule)
    # The trust anchor is kept apart: the suite reads every top-level *.json as trusted.
    assert sorted(p.name for p in served.metadata_dir.glob("*.json")) == []

    refresh = served.refresh()
    assert refresh.returncode == 0, refresh.stderr
    # Every run warns: plain HTTP is the agent's development-only mode.
    assert "INSECURE development mode: plain HTTP" in refresh.stderr
    assert sorted(p.name for p in served.metadata_dir.glob("*.json")) == [
        "root.json", "snapshot.json", "targets.json", "timestamp.json",
    ]  # fmt: skip
    assert served.requests[0] == "/metadata/2.root.json"  # the root update comes first
    assert served.requests[1] == "/metadata/timestamp.json"
    # The agent's own fetcher made them (python-tuf's default would say "python-tuf/...").
    assert served.user_agents == {USER_AGENT}

    served.requests.clear()
    download = served.download(name)
    assert download.returncode == 0, download.stderr
    image = (served.tmp / "fw-1.0.0.img").read_bytes()
    stored = served.target_dir / name
    assert stored.read_bytes() == image
    assert [r for r in served.requests if r.startswith("/targets/")] == [
        f"/targets/{served.repo.latest_targets().targets[name].hashes['sha256']}.{name}"
    ]

    served.requests.clear()
    again = served.download(name)  # already there and verified: not fetched again
    assert again.returncode == 0, again.stderr
    assert not [r for r in served.requests if r.startswith("/targets/")]

    missing = served.download("no-such-target")
    assert missing.returncode == 1
    assert "'no-such-target' is not in the repository's verified metadata" in error_line(missing)


def test_replayed_timestamp_is_refused(served: Served) -> None:
    """Rollback: a mirror serves the older, validly signed timestamp again."""
    served.release("1.0.0")
    old_timestamp = (served.repo.metadata_dir / "timestamp.json").read_bytes()
    served.release("1.1.0")
    assert served.init().returncode == 0
    assert served.refresh().returncode == 0
    trusted = served.trusted_version("timestamp")

    (served.repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    replay = served.refresh()

    assert replay.returncode == 1
    line = error_line(replay)
    assert line.startswith("otaguard-conformance refresh: ")
    assert "timestamp" in line and f"must be >= {trusted}" in line, line
    assert served.trusted_version("timestamp") == trusted  # the replay was not stored


def test_tampered_target_is_refused(served: Served) -> None:
    """Arbitrary software: the image blob on the mirror is changed, the metadata is not."""
    name = served.release("1.0.0")
    sha = served.repo.latest_targets().targets[name].hashes["sha256"]
    blob = served.repo.targets_dir / f"{sha}.{name}"
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x01
    blob.write_bytes(bytes(data))
    assert served.init().returncode == 0

    result = served.download(name)

    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith("otaguard-conformance download: ")
    assert "hash" in line.lower(), line
    assert not (served.target_dir / name).exists()  # nothing unverified is stored


def test_refresh_without_init_fails_in_one_line(served: Served) -> None:
    result = served.refresh()
    assert result.returncode == 1
    assert "run init first" in error_line(result)
    assert served.requests == []
    shutil.rmtree(served.metadata_dir)
