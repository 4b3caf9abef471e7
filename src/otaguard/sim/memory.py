"""An in-memory repository behind the agent's fetcher interface.

Unit tests run the real agent (ngclient, selection, the install machine, the simulated
bootloader) against repository files held in a dict, without a server or a socket, the
way python-tuf's own ``RepositorySimulator`` does. It counts fetches and can be changed
between calls (publish, tamper, replay) like a hostile mirror.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from tuf.api import exceptions

from otaguard.agent.fetcher import Fetcher

__all__ = ["MemoryFetcher", "read_repository_files"]

# Chunks as the network would deliver them, so progress and length caps are exercised.
CHUNK: Final = 64 * 1024


def read_repository_files(repo_dir: Path) -> dict[str, bytes]:
    """Read a repository directory into ``{"metadata/<name>" | "targets/<blob>": bytes}``."""
    files: dict[str, bytes] = {}
    for sub in ("metadata", "targets"):
        for p in sorted((Path(repo_dir) / sub).iterdir()):
            if p.is_file() and not p.name.startswith("."):
                files[f"{sub}/{p.name}"] = p.read_bytes()
    return files


class MemoryFetcher(Fetcher):
    """Serves ``files`` (URL path without the leading slash -> bytes); 404 otherwise."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        #: how often each path was requested
        self.fetches: Counter[str] = Counter()
        self._cancelled = threading.Event()

    def _fetch(self, url: str) -> Iterator[bytes]:
        if self._cancelled.is_set():
            raise exceptions.DownloadError(f"cancelled before fetching {url}")
        path = urlsplit(url).path.lstrip("/")
        self.fetches[path] += 1
        data = self.files.get(path)
        if data is None:
            raise exceptions.DownloadHTTPError(f"HTTP 404 for {url}", 404)
        return self._chunks(data)

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), CHUNK):
            chunk = data[i : i + CHUNK]
            if self.on_chunk is not None:
                self.on_chunk(len(chunk))
            yield chunk

    def close(self) -> None:
        """Nothing to release."""

    def cancel(self) -> None:
        """Refuse every later fetch."""
        self._cancelled.set()
