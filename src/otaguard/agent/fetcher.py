"""The agent's one network seam: a python-tuf fetcher over verified TLS.

Every byte the device reads from the network passes through :class:`TlsFetcher`:
metadata and images alike. It verifies the server against the provisioned CA (and can
present a client certificate for mutual TLS) and defends against a hostile or broken
server:

* **Slow retrieval** (TUF): one deadline covers a whole request, from the TCP connect
  through the TLS handshake, the status line and headers to the last body byte. A
  watchdog thread shuts the TCP connection down when the deadline passes, which wakes the
  request wherever it is blocked, so a server trickling one byte at a time cannot hold the
  device past it. Connect and read timeouts still bound each single socket operation.
* **Endless data** (TUF): bodies are capped at the caller's ``max_length``; status line
  and headers are capped by :mod:`http.client` (64 KiB per line, 100 header lines).
* **Resume**: :meth:`Fetcher.stream_range` continues a target from a byte offset with an
  HTTP ``Range`` request; the answer's ``Content-Range`` must be exactly the range asked
  for, and a server that ignores ``Range`` (200) is read from the start and the prefix
  skipped.
* **Cancellation**: :meth:`TlsFetcher.cancel` aborts the request in progress within
  :data:`CANCEL_POLL_S` and refuses every later one.

Built on :mod:`http.client` rather than urllib3: a whole-request deadline needs a handle
on the socket from before ``connect()`` to the last body byte, which urllib3 exposes only
through private attributes.
"""

from __future__ import annotations

import abc
import contextlib
import http.client
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final, Literal
from urllib.parse import urlsplit

from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from otaguard.agent.config import FetchLimits
from otaguard.crypto.keys import warn_insecure
from otaguard.model.unsafe import Unsafe

__all__ = [
    "CANCEL_POLL_S",
    "CHUNK",
    "STREAM_CHUNK",
    "DownloadCancelledError",
    "Fetcher",
    "TlsFetcher",
    "create_ssl_context",
]

logger = logging.getLogger(__name__)

#: largest read handed on at once: big enough that a fast link costs few Python calls,
#: small enough that progress and the deadline are seen often (a TLS record is 16 KiB)
CHUNK: Final = 256 * 1024
#: cancel() only sets a flag, so it is safe in a signal handler; the watchdog of the
#: request in progress notices it within this many seconds and aborts the connection
CANCEL_POLL_S: Final = 0.1
#: reads of an image stream: one Python call per MiB instead of one per 16 KiB TLS record
#: (the bytes go straight to the slot; this is the stream's whole buffer)
STREAM_CHUNK: Final = 1024 * 1024
USER_AGENT: Final = "otaguard-agent/0.1"

_Key = tuple[str, str, int]  # (scheme, host, port): what a kept-alive connection serves
_Reason = Literal["cancelled", "deadline"]

# Errors that mean a kept-alive connection was closed by the server while it sat idle,
# found when the next request is sent or its first response byte awaited.
_STALE: Final = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


class DownloadCancelledError(exceptions.DownloadError):
    """The download was aborted, or refused, because the fetcher was cancelled."""


def create_ssl_context(
    *,
    ca_file: Path,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    client_key_tcti: str | None = None,
) -> ssl.SSLContext:
    """TLS context that trusts only ``ca_file``, optionally presenting a client cert.

    Args:
        ca_file: the only CA the server's certificate may chain to.
        client_cert: the client certificate chain (PEM) to present, if any.
        client_key: its key file; a TPM-wrapped key (``TSS2 PRIVATE KEY``) needs
            ``client_key_tcti``.
        client_key_tcti: the TPM holding ``client_key``: the tpm2 OpenSSL provider is
            loaded into this process's ``ssl`` for it (one TPM per process).

    Raises:
        ssl.SSLError, OSError: a file is unusable.
        ConfigError: the tpm2 provider cannot be loaded.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        if client_key_tcti is not None:
            from otaguard.agent._tls_tpm import load_tpm_provider

            load_tpm_provider(client_key_tcti)
        ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return ctx


class Fetcher(FetcherInterface):
    """The agent's network seam: python-tuf's fetcher interface plus what the agent needs.

    Implementations: :class:`TlsFetcher` (the network) and the in-memory repository
    fetcher of :mod:`otaguard.sim` (tests run the real agent without a server).
    """

    #: called with the size of every chunk received (progress display)
    on_chunk: Callable[[int], None] | None = None

    def post(
        self, url: str, body: bytes, *, content_type: str, max_length: int
    ) -> tuple[int, bytes]:
        """POST ``body`` to ``url``: the check-in's requests (nonce, signed manifest).

        Returns:
            The HTTP status and the answer's body (at most ``max_length`` bytes).

        Raises:
            DownloadError: this fetcher cannot post, or the request failed.
        """
        raise exceptions.DownloadError(f"{type(self).__name__} cannot send requests to {url}")

    def stream_range(self, url: str, *, start: int, max_length: int) -> Iterator[bytes]:
        """Body of ``url`` from byte ``start`` on, at most ``max_length - start`` bytes.

        This default fetches the whole body and drops the first ``start`` bytes (a
        fetcher that cannot ask for a range); :class:`TlsFetcher` sends ``Range``.

        Raises:
            DownloadLengthMismatchError: the body is longer than ``max_length``.
            DownloadError: the request failed (raised while iterating).
        """
        if not 0 <= start <= max_length:
            raise ValueError(f"range start {start} outside 0..{max_length}")
        return _skip_and_cap(self.fetch(url), url, skip=start, cap=max_length - start)

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the fetcher may be used again afterwards."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Abort the request in progress and refuse new ones (thread-safe).

        Called from a signal handler or another thread so the agent stops within
        seconds whatever it is waiting on; the aborted request raises ``DownloadError``.
        """


def _skip_and_cap(
    chunks: Iterator[bytes], url: str, *, skip: int, cap: int
) -> Generator[bytes, None, None]:
    """``chunks`` without their first ``skip`` bytes, refusing more than ``cap`` after."""
    sent = 0
    for chunk in chunks:
        if skip:
            dropped = min(skip, len(chunk))
            skip -= dropped
            chunk = chunk[dropped:]  # noqa: PLW2901 - the remainder is the chunk
            if not chunk:
                continue
        sent += len(chunk)
        if sent > cap:
            raise exceptions.DownloadLengthMismatchError(
                f"{url}: more than the expected {cap} bytes"
            )
        yield chunk


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes FIRST-LAST/TOTAL`` (TOTAL may be ``*``) parsed, or ``None`` if malformed."""
    if value is None or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    first, _, last = span.partition("-")
    try:
        return int(first), int(last), (None if total == "*" else int(total))
    except ValueError:
        return None


class _Watchdog:
    """Aborts one request's connection when its deadline passes or the fetcher is cancelled.

    It runs its own thread for the duration of one request. ``shutdown(SHUT_RDWR)`` acts
    on the TCP connection itself, not on one descriptor or wrapper of it, so it wakes the
    request thread wherever that is blocked: connect, TLS handshake, send, or waiting for
    the status line, headers or body. The request thread then sees an error or an early
    end of file and asks :meth:`check` why.
    """

    def __init__(self, url: str, budget: float, cancelled: Callable[[], bool]) -> None:
        self.url = url
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self._cancelled = cancelled
        self._lock = threading.Lock()  # guards _target and _fired
        self._target: socket.socket | None = None
        self._fired: _Reason | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="otaguard-fetch-watchdog", daemon=True
        )
        self._thread.start()

    @property
    def fired(self) -> bool:
        """Whether the watchdog fired (and aborted the connection, if there was one)."""
        return self._fired is not None

    def remaining(self) -> float:
        """Seconds left until the deadline (negative once it passed)."""
        return self.deadline - time.monotonic()

    def _due(self) -> _Reason | None:
        if self._cancelled():
            return "cancelled"
        if time.monotonic() >= self.deadline:
            return "deadline"
        return None

    def error(self) -> exceptions.DownloadError | None:
        """The error the request must fail with now, or ``None`` if it may go on."""
        reason = self._fired or self._due()
        if reason == "cancelled":
            return DownloadCancelledError(f"download of {self.url} cancelled")
        if reason == "deadline":
            return exceptions.SlowRetrievalError(
                f"download of {self.url} exceeded its deadline of {self.budget:.1f} s"
            )
        return None

    def check(self) -> None:
        """Raise the cancellation or deadline error if the request must stop."""
        error = self.error()
        if error is not None:
            raise error

    def watch(self, handle: socket.socket) -> None:
        """Make ``handle`` the connection to abort; raise if the request must stop."""
        with self._lock:
            self._target = handle
        self.check()

    def unwatch(self) -> None:
        """Forget the connection (call before closing it, so it is never shut down late)."""
        with self._lock:
            self._target = None

    def stop(self) -> None:
        """End the watch (the request finished); returns once the thread has exited."""
        self._done.set()
        self._thread.join()
        self.unwatch()

    def _run(self) -> None:
        while not self._done.wait(max(0.0, min(CANCEL_POLL_S, self.remaining()))):
            reason = self._due()
            if reason is None:
                continue
            with self._lock:
                self._fired = reason
                if self._target is not None:
                    with contextlib.suppress(OSError):  # already closed or never connected
                        self._target.shutdown(socket.SHUT_RDWR)
            return


class _HTTPConnection(http.client.HTTPConnection):
    """:mod:`http.client` over a socket the fetcher connected (and wrapped in TLS) itself."""

    def __init__(self, host: str, port: int, sock: socket.socket, default_port: int) -> None:
        super().__init__(host, port)
        self.default_port = default_port  # the Host header omits the scheme's default port
        self.sock = sock

    def connect(self) -> None:
        # http.client reconnects by itself once it dropped its socket; that connection would
        # bypass the watchdog (and TLS), so a dropped connection is never used again.
        raise http.client.NotConnected("connection closed; the fetcher opens a new one")


class _Connection:
    """One HTTP/1.1 connection, with the descriptor the watchdog shuts down."""

    def __init__(self, key: _Key, sock: socket.socket, handle: socket.socket) -> None:
        self.key = key
        self.http = _HTTPConnection(key[1], key[2], sock, 443 if key[0] == "https" else 80)
        #: duplicate of the TCP descriptor: shutting it down aborts the connection whatever
        #: wraps the original (TLS, http.client's buffered reader)
        self.handle = handle

    def close(self) -> None:
        self.http.close()
        self.handle.close()


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    """Announced body length, or ``None`` when the body is chunked or ends at close."""
    if resp.getheader("Transfer-Encoding") is not None:
        return None
    value = resp.getheader("Content-Length")
    try:
        length = int(value) if value is not None else -1
    except ValueError:  # as http.client does: an unusable length means "read to close"
        return None
    return length if length >= 0 else None


class TlsFetcher(Fetcher):
    """Fetcher with verified TLS, timeouts, whole-request deadlines and cancellation.

    At most one idle keep-alive connection is kept per (scheme, host, port); a connection
    goes back only after its response body was read to the end. Requests may run from
    several threads; :meth:`cancel` and :meth:`close` may be called from any thread.

    Args:
        tls: the context that verifies servers (:func:`create_ssl_context`), or
            ``Unsafe.PLAIN_HTTP`` to speak plain HTTP (development only; warns).
        connect_timeout: seconds one TCP connect attempt may take.
        read_timeout: seconds one socket read or write may wait (the TLS handshake too).
        deadline_base: seconds every request may take in total; ``download_file`` adds
            ``max_length / min_rate_bps``.
        min_rate_bps: slowest acceptable transfer rate, in bytes per second.
        staging_dir: where ``download_file`` stores its temporary file.

    Raises:
        TypeError: ``tls`` is neither an ``ssl.SSLContext`` nor ``Unsafe.PLAIN_HTTP``
            (a forgotten ``None`` never means plain HTTP).
        ValueError: a timeout, deadline or rate is not positive.
    """

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | Literal[Unsafe.PLAIN_HTTP],
        connect_timeout: float,
        read_timeout: float,
        deadline_base: float,
        min_rate_bps: int,
        staging_dir: Path | None = None,
    ):
        self._tls: ssl.SSLContext | None
        if isinstance(tls, ssl.SSLContext):
            self._tls = tls
        elif tls is Unsafe.PLAIN_HTTP:
            warn_insecure("plain HTTP fetcher: transport is neither encrypted nor authenticated")
            self._tls = None
        else:
            raise TypeError(f"tls must be an ssl.SSLContext or Unsafe.PLAIN_HTTP, not {tls!r}")
        if not all(v > 0 for v in (connect_timeout, read_timeout, deadline_base, min_rate_bps)):
            raise ValueError("timeouts, deadline and minimum rate must be positive")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._deadline_base = deadline_base
        self._min_rate = min_rate_bps
        self._staging_dir = staging_dir
        self._headers = {"User-Agent": USER_AGENT}
        self._cancelled = False  # only ever set: a plain store is signal-handler safe
        self._pool_lock = threading.Lock()
        self._idle: dict[_Key, _Connection] = {}

    @classmethod
    def from_limits(
        cls,
        limits: FetchLimits,
        *,
        tls: ssl.SSLContext | Literal[Unsafe.PLAIN_HTTP],
        staging_dir: Path | None,
    ) -> TlsFetcher:
        """The agent's fetcher with ``limits`` (a device's config, or the defaults).

        Args:
            limits: timeouts, deadline and minimum rate.
            tls: as for the constructor (``Unsafe.PLAIN_HTTP`` warns).
            staging_dir: where downloads are staged; ``None``: the system's temp dir.
        """
        return cls(
            tls=tls,
            connect_timeout=limits.connect_timeout_s,
            read_timeout=limits.read_timeout_s,
            deadline_base=limits.download_deadline_base_s,
            min_rate_bps=limits.download_min_rate_bps,
            staging_dir=staging_dir,
        )

    # -- python-tuf's FetcherInterface -------------------------------------------------
    def _fetch(self, url: str) -> Iterator[bytes]:
        """Body of ``url``; nothing is sent until the first chunk is asked for.

        The request may take ``deadline_base`` seconds in total. Every error, including
        ``DownloadHTTPError``, is raised while iterating.
        """
        return self._stream(url, self._deadline_base)

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` to a temp file in the staging dir, capped at ``max_length``.

        Same contract as python-tuf's, with a deadline of ``deadline_base + max_length /
        min_rate_bps`` seconds for the whole request.

        Raises:
            DownloadLengthMismatchError: the server sent more than ``max_length`` bytes.
            SlowRetrievalError: the deadline passed or the server stalled.
            DownloadCancelledError: :meth:`cancel` was called.
            DownloadHTTPError: the server answered with another status than 200.
            DownloadError: any other network, TLS or protocol failure.
        """
        budget = self._deadline_base + max_length / self._min_rate
        received = 0
        with (
            tempfile.TemporaryFile(dir=self._staging_dir) as temp_file,
            contextlib.closing(self._stream(url, budget)) as chunks,
        ):
            for chunk in chunks:
                received += len(chunk)
                if received > max_length:
                    raise exceptions.DownloadLengthMismatchError(
                        f"{url}: more than the expected {max_length} bytes"
                    )
                temp_file.write(chunk)
            temp_file.seek(0)
            yield temp_file

    # -- Fetcher -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the idle keep-alive connections; the fetcher may be used again."""
        with self._pool_lock:
            idle = list(self._idle.values())
            self._idle.clear()
        for conn in idle:
            conn.close()

    def cancel(self) -> None:
        """Abort the request in progress within ``CANCEL_POLL_S`` and refuse new ones.

        Safe from any thread and from a signal handler: it only sets a flag, which the
        watchdog of each request in progress polls.
        """
        self._cancelled = True

    def _is_cancelled(self) -> bool:
        return self._cancelled

    # -- one request -------------------------------------------------------------------
    def stream_range(self, url: str, *, start: int, max_length: int) -> Iterator[bytes]:
        """Body of ``url`` from byte ``start`` (an HTTP ``Range`` request when ``start > 0``).

        Read in :data:`STREAM_CHUNK` blocks, at most ``max_length - start`` bytes, within
        ``deadline_base + (max_length - start) / min_rate_bps`` seconds.

        Raises:
            DownloadLengthMismatchError: the body is longer than asked for.
            DownloadError: the request failed, or the server answered another range
                than the one asked for (raised while iterating).
        """
        if not 0 <= start <= max_length:
            raise ValueError(f"range start {start} outside 0..{max_length}")
        budget = self._deadline_base + (max_length - start) / self._min_rate
        return self._stream(url, budget, start=start, cap=max_length - start)

    def _stream(  # noqa: PLR0912 - one request, its checks and its cleanup together
        self, url: str, budget: float, *, start: int = 0, cap: int | None = None
    ) -> Generator[bytes, None, None]:
        key, path = self._target(url)
        if self._cancelled:
            raise DownloadCancelledError(f"download of {url} refused: the fetcher was cancelled")
        wd = _Watchdog(url, budget, self._is_cancelled)
        conn: _Connection | None = None
        resp: http.client.HTTPResponse | None = None
        complete = False
        headers = {"Range": f"bytes={start}-"} if start else None
        try:
            conn, resp = self._exchange(key, path, wd, headers=headers)
            skip = self._check_range(resp, url, start)
            expected = _content_length(resp)
            received = sent = 0
            while chunk := (resp.read1(CHUNK) if cap is None else resp.read(STREAM_CHUNK)):
                wd.check()
                received += len(chunk)
                if skip:  # the server ignored Range: drop the prefix the slot already has
                    dropped = min(skip, len(chunk))
                    skip -= dropped
                    chunk = chunk[dropped:]
                    if not chunk:
                        continue
                sent += len(chunk)
                if cap is not None and sent > cap:
                    raise exceptions.DownloadLengthMismatchError(
                        f"{url}: more than the expected {cap} bytes"
                    )
                if self.on_chunk is not None:
                    self.on_chunk(len(chunk))
                yield chunk
            wd.check()  # an end of file the watchdog caused is not the end of the body
            if expected is not None and received != expected:
                raise exceptions.DownloadError(
                    f"download of {url} ended after {received} of {expected} bytes"
                )
            complete = True
        except (OSError, http.client.HTTPException, UnicodeError) as e:
            raise self._translate(e, url, wd) from e
        finally:
            wd.stop()
            if resp is not None:
                resp.close()  # releases http.client's reader; the socket stays with conn
            if conn is not None:
                # Only a connection whose response was read to the end may serve the next
                # request: otherwise that request would read the rest of this body as its
                # response. http.client drops the socket when the server said it closes.
                if complete and not wd.fired and conn.http.sock is not None:
                    self._checkin(conn)
                else:
                    conn.close()

    @staticmethod
    def _check_range(resp: http.client.HTTPResponse, url: str, start: int) -> int:
        """Check the status (and ``Content-Range``) of an answer; bytes to skip."""
        if start and resp.status == 206:
            parsed = _content_range(resp.getheader("Content-Range"))
            if parsed is None or parsed[0] != start or parsed[1] < start:
                raise exceptions.DownloadError(
                    f"{url}: asked for bytes {start}- but the server answered "
                    f"Content-Range {resp.getheader('Content-Range')!r}"
                )
            return 0
        if resp.status != 200:
            raise exceptions.DownloadHTTPError(
                f"HTTP {resp.status} {resp.reason} for {url}", resp.status
            )
        if start:
            logger.info(
                "%s: the server ignored Range; skipping %d bytes already written", url, start
            )
        return start

    def post(
        self, url: str, body: bytes, *, content_type: str, max_length: int
    ) -> tuple[int, bytes]:
        """POST ``body`` to ``url``; return the status and the answer (at most ``max_length``).

        The same TLS, deadline (``deadline_base``) and cancellation as every fetch. A POST
        always opens a fresh connection: it is never re-sent on a kept-alive connection
        that turns out stale, so the server sees it at most once.

        Raises:
            DownloadLengthMismatchError: the answer is longer than ``max_length``.
            SlowRetrievalError: the deadline passed or the server stalled.
            DownloadCancelledError: :meth:`cancel` was called.
            DownloadError: any other network, TLS or protocol failure.
        """
        key, path = self._target(url)
        if self._cancelled:
            raise DownloadCancelledError(f"request to {url} refused: the fetcher was cancelled")
        wd = _Watchdog(url, self._deadline_base, self._is_cancelled)
        conn: _Connection | None = None
        resp: http.client.HTTPResponse | None = None
        complete = False
        try:
            conn = self._connect(key, wd)
            resp = self._send(
                conn, path, wd, method="POST", body=body, headers={"Content-Type": content_type}
            )
            data = resp.read(max_length + 1)
            wd.check()
            if len(data) > max_length:
                raise exceptions.DownloadLengthMismatchError(
                    f"{url}: answer longer than {max_length} bytes"
                )
            complete = True
        except (OSError, http.client.HTTPException, UnicodeError) as e:
            raise self._translate(e, url, wd) from e
        else:
            return resp.status, data
        finally:
            wd.stop()
            if resp is not None:
                resp.close()
            if conn is not None:
                if complete and not wd.fired and conn.http.sock is not None:
                    self._checkin(conn)
                else:
                    conn.close()

    def _target(self, url: str) -> tuple[_Key, str]:
        """Connection key and request path of ``url``; refuse what this fetcher may not do."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise exceptions.DownloadError(f"invalid URL {url!r}: {e}") from e
        if parts.scheme == "http":
            if self._tls is not None:
                raise exceptions.DownloadError(f"refusing plain HTTP URL {url}")
        elif parts.scheme == "https":
            if self._tls is None:
                raise exceptions.DownloadError(
                    f"refusing {url}: this fetcher was made for plain HTTP and trusts no CA"
                )
        else:
            raise exceptions.DownloadError(f"unsupported URL scheme in {url!r}")
        if not parts.hostname:
            raise exceptions.DownloadError(f"no host in URL {url!r}")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return (parts.scheme, parts.hostname, port), path

    def _exchange(
        self, key: _Key, path: str, wd: _Watchdog, *, headers: dict[str, str] | None = None
    ) -> tuple[_Connection, http.client.HTTPResponse]:
        """Send the request and read the status line and headers.

        A kept-alive connection the server closed while it was idle is noticed here and
        replaced once by a fresh one, within the same deadline.
        """
        conn = self._checkout(key)
        if conn is not None:
            try:
                return conn, self._send(conn, path, wd, headers=headers)
            except _STALE as e:
                if wd.fired:
                    raise
                logger.debug("kept-alive connection to %s:%d went stale (%r)", *key[1:], e)
        conn = self._connect(key, wd)
        return conn, self._send(conn, path, wd, headers=headers)

    def _send(
        self,
        conn: _Connection,
        path: str,
        wd: _Watchdog,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        ok = False
        try:
            wd.watch(conn.handle)
            conn.http.request(method, path, body=body, headers={**self._headers, **(headers or {})})
            resp = conn.http.getresponse()
            ok = True
            return resp
        finally:
            if not ok:
                wd.unwatch()
                conn.close()

    def _connect(self, key: _Key, wd: _Watchdog) -> _Connection:
        """Open a new connection for ``key``: TCP, then TLS for https."""
        scheme, host, port = key
        sock, handle = self._open_tcp(host, port, wd)
        ok = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._read_timeout)
            if scheme == "https":
                if self._tls is None:  # _target() refuses this already
                    raise exceptions.DownloadError("https URL but no TLS context")
                # wrap_socket takes the descriptor over, and closes it if the handshake fails.
                sock = self._tls.wrap_socket(sock, server_hostname=host)
            ok = True
            return _Connection(key, sock, handle)
        finally:
            if not ok:
                wd.unwatch()
                sock.close()
                handle.close()

    def _open_tcp(self, host: str, port: int, wd: _Watchdog) -> tuple[socket.socket, socket.socket]:
        """Connect to the first address of ``host`` that accepts.

        Returns the socket and a duplicate of its descriptor, which the watchdog watches
        from before ``connect()``.
        """
        # Name resolution cannot be interrupted; the system resolver's timeouts bound it.
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error = OSError(f"no address for {host}")
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            handle: socket.socket | None = None
            ok = False
            try:
                handle = sock.dup()
                wd.watch(handle)
                # The watchdog aborts a connect at the deadline; this timeout, just after it,
                # is the backstop should a platform not abort a connect on shutdown().
                backstop = max(0.0, wd.remaining()) + CANCEL_POLL_S
                sock.settimeout(min(self._connect_timeout, backstop))
                sock.connect(address)
            except OSError as e:
                if wd.fired:
                    raise
                error = e
            else:
                ok = True
                return sock, handle
            finally:
                if not ok:
                    wd.unwatch()
                    sock.close()
                    if handle is not None:
                        handle.close()
        raise error

    def _checkout(self, key: _Key) -> _Connection | None:
        with self._pool_lock:
            return self._idle.pop(key, None)

    def _checkin(self, conn: _Connection) -> None:
        with self._pool_lock:
            old = self._idle.pop(conn.key, None)
            self._idle[conn.key] = conn
        if old is not None:
            old.close()

    def _translate(
        self, e: OSError | http.client.HTTPException | UnicodeError, url: str, wd: _Watchdog
    ) -> exceptions.DownloadError:
        """tuf's error for a foreign exception; the watchdog's reason takes precedence."""
        stopped = wd.error()
        if stopped is not None:
            return stopped
        if isinstance(e, TimeoutError):
            return exceptions.SlowRetrievalError(
                f"download of {url} stalled: no progress within the socket timeout"
                f" (connect {self._connect_timeout} s, read {self._read_timeout} s)"
            )
        return exceptions.DownloadError(f"download of {url} failed: {type(e).__name__}: {e}")
