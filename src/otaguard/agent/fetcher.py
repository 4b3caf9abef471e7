"""The agent's one network seam: a python-tuf fetcher over verified TLS.

Every byte the device reads from the network passes through :class:`TlsFetcher`:
metadata and images alike. It verifies the server against the provisioned CA (and can
present a client certificate for mutual TLS), applies connect and read timeouts, and
enforces a total deadline per download so a server trickling bytes cannot hold the
device forever (TUF "slow retrieval" attack).
"""

from __future__ import annotations

import abc
import logging
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

import urllib3
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from otaguard.crypto.keys import warn_insecure

__all__ = ["CHUNK", "Fetcher", "TlsFetcher", "create_ssl_context"]

logger = logging.getLogger(__name__)

CHUNK: Final = 256 * 1024
USER_AGENT: Final = "otaguard-agent/0.1"


def create_ssl_context(
    *, ca_file: Path, client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext:
    """TLS context that trusts only ``ca_file``, optionally presenting a client cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return ctx


class Fetcher(FetcherInterface):
    """The agent's network seam: python-tuf's fetcher interface plus what the agent needs.

    Implementations: :class:`TlsFetcher` (the network) and the in-memory repository
    fetcher of :mod:`otaguard.sim` (tests run the real agent without a server).
    """

    #: called with the size of every chunk received (progress display)
    on_chunk: Callable[[int], None] | None = None

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the fetcher may be used again afterwards."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Abort the request in progress and refuse new ones (thread-safe).

        Called from a signal handler or another thread so the agent stops within
        seconds whatever it is waiting on; the aborted request raises ``DownloadError``.
        """


class TlsFetcher(Fetcher):
    """Fetcher with verified TLS, timeouts and per-download deadlines."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        deadline_base: float,
        min_rate_bps: int,
        staging_dir: Path | None = None,
    ):
        if ssl_context is None:
            warn_insecure("plain HTTP fetcher: transport is neither encrypted nor authenticated")
        self._pool = urllib3.PoolManager(
            ssl_context=ssl_context,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=2, connect=2, read=0, redirect=0, backoff_factor=0.2),
            headers={"User-Agent": USER_AGENT},
            maxsize=2,
        )
        self._plain_ok = ssl_context is None
        self._deadline_base = deadline_base
        self._min_rate = min_rate_bps
        self._deadline: float | None = None
        self._staging_dir = staging_dir
        self._cancelled = False

    def _fetch(self, url: str) -> Iterator[bytes]:
        if self._cancelled:
            raise exceptions.DownloadError(f"cancelled before fetching {url}")
        if url.startswith("http://") and not self._plain_ok:
            raise exceptions.DownloadError(f"refusing plain HTTP URL {url}")
        deadline = self._deadline or time.monotonic() + self._deadline_base
        try:
            resp = self._pool.request("GET", url, preload_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"cannot reach {url}: {e}") from e
        if resp.status != 200:
            # Never hand a connection with an unread body back to the pool: the next
            # request would read that body as its response.
            resp.close()
            raise exceptions.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
        return self._chunks(resp, url, deadline)

    def _chunks(self, resp: urllib3.BaseHTTPResponse, url: str, deadline: float) -> Iterator[bytes]:
        complete = False
        try:
            # read1() returns whatever has arrived, so the deadline is checked at least
            # once per read timeout even when a server trickles one byte at a time.
            while chunk := resp.read1(CHUNK):
                if time.monotonic() > deadline:
                    raise exceptions.SlowRetrievalError(f"download of {url} exceeded its deadline")
                if self.on_chunk is not None:
                    self.on_chunk(len(chunk))
                yield chunk
            complete = True
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"download of {url} failed: {e}") from e
        finally:
            # Only a fully read response may return its connection to the pool.
            if complete:
                resp.release_conn()
            else:
                resp.close()

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` to a temp file in the staging dir, capped at ``max_length``.

        Same contract as python-tuf's, plus a deadline proportional to the length.
        """
        self._deadline = time.monotonic() + self._deadline_base + max_length / self._min_rate
        received = 0
        try:
            with tempfile.TemporaryFile(dir=self._staging_dir) as temp_file:
                for chunk in self.fetch(url):
                    received += len(chunk)
                    if received > max_length:
                        raise exceptions.DownloadLengthMismatchError(
                            f"{url}: more than the expected {max_length} bytes"
                        )
                    temp_file.write(chunk)
                temp_file.seek(0)
                yield temp_file
        finally:
            self._deadline = None

    def close(self) -> None:
        """Close pooled connections."""
        self._pool.clear()

    def cancel(self) -> None:
        """Refuse new requests (a request in progress is not yet interrupted)."""
        self._cancelled = True
