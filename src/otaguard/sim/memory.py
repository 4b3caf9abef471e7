"""An in-memory repository behind the agent's fetcher interface.

Unit tests run the real agent (ngclient, selection, the install machine, the simulated
bootloader) against repository files held in a dict, without a server or a socket, the
way python-tuf's own ``RepositorySimulator`` does. It counts fetches and can be changed
between calls (publish, tamper, replay) like a hostile mirror.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
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
    """Serves ``files`` (URL path without the leading slash -> bytes); 404 otherwise.

    Ranges are served as a server answering ``Range`` would. ``on_serve(path, offset)``
    runs before each chunk leaves with the offset just after it; a test raises there to
    cut the power (or the connection) at a byte offset.
    """

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        chunk: int = CHUNK,
        on_serve: Callable[[str, int], None] | None = None,
    ):
        self.files = files
        self.chunk = chunk
        self.on_serve = on_serve
        #: how often each path was requested
        self.fetches: Counter[str] = Counter()
        #: bytes of each path handed to the agent
        self.served: Counter[str] = Counter()
        #: the start offset of every range request, per path
        self.ranges: dict[str, list[int]] = {}
        self._cancelled = threading.Event()

    def _lookup(self, url: str) -> tuple[str, bytes]:
        if self._cancelled.is_set():
            raise exceptions.DownloadError(f"cancelled before fetching {url}")
        path = urlsplit(url).path.lstrip("/")
        self.fetches[path] += 1
        data = self.files.get(path)
        if data is None:
            raise exceptions.DownloadHTTPError(f"HTTP 404 for {url}", 404)
        return path, data

    def _fetch(self, url: str) -> Iterator[bytes]:
        path, data = self._lookup(url)
        return self._chunks(path, data, 0)

    def stream_range(self, url: str, *, start: int, max_length: int) -> Iterator[bytes]:
        """Serve ``url`` from ``start``, refusing more than ``max_length - start`` bytes."""
        if not 0 <= start <= max_length:
            raise ValueError(f"range start {start} outside 0..{max_length}")
        path, data = self._lookup(url)
        self.ranges.setdefault(path, []).append(start)
        if len(data) > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"{url}: more than the expected {max_length - start} bytes"
            )
        return self._chunks(path, data, start)

    def _chunks(self, path: str, data: bytes, start: int) -> Iterator[bytes]:
        for i in range(start, len(data), self.chunk):
            chunk = data[i : i + self.chunk]
            if self.on_serve is not None:
                self.on_serve(path, i + len(chunk))
            self.served[path] += len(chunk)
            if self.on_chunk is not None:
                self.on_chunk(len(chunk))
            yield chunk

    def close(self) -> None:
        """Nothing to release."""

    def cancel(self) -> None:
        """Refuse every later fetch."""
        self._cancelled.set()
