"""The agent's fetcher against hostile servers on real TCP and TLS sockets."""

from __future__ import annotations

import contextlib
import http.server
import logging
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions

from otaguard.agent import TlsFetcher, create_ssl_context
from otaguard.agent.checkin import check_in
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.fetcher import DownloadCancelledError
from otaguard.crypto import CertificateAuthority
from otaguard.crypto.ca import ServerCredentials
from otaguard.model.errors import (
    AccessDeniedError,
    InsecureModeWarning,
    TransportError,
    VerificationError,
)
from otaguard.model.unsafe import Unsafe

#: whole-request deadline of the fetchers that must give up; the hostile servers below
#: would hold a request for 20 s or more
DEADLINE = 1.5
#: generous upper bound on how long giving up may take on a loaded 2-core machine
GIVE_UP_BOUND = 5.0
#: one byte per this many seconds: each byte restarts a socket read timeout
TRICKLE_S = 0.5
BODY = b"hello world"


# -- an HTTPS server with hostile paths ---------------------------------------------------
class _Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse can be observed
    server: _CountingServer

    def log_message(self, *_: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections.append(self.client_address)

    def _respond(self, status: int, body: bytes, *, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/ok":
            self._respond(200, BODY)
        elif self.path == "/big":
            self._respond(200, b"x" * 1_000_000)
        elif self.path == "/stale":
            # Announces keep-alive, then closes: the client finds out on its next request.
            self._respond(200, BODY)
            self.close_connection = True
        elif self.path == "/endless":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(10_000):  # bounded: stops by itself
                    self.wfile.write(b"x" * 65536)
        elif self.path.startswith("/range"):
            self._range()
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(40):  # at most 4 s of one byte per 0.1 s
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
        else:
            self._respond(404, b"not found")

    def _range(self) -> None:
        """``/range``: honours ``Range``; ``-ignored`` answers 200 with the whole body;
        ``-wrong`` answers another range than asked; ``-long`` sends more than asked."""
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        if header is None or self.path == "/range-ignored":
            self._respond(200, RANGED)
            return
        start = int(header.removeprefix("bytes=").rstrip("-"))
        first = start + 1 if self.path == "/range-wrong" else start
        body = RANGED[first:] + (b"y" * 100 if self.path == "/range-long" else b"")
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{len(RANGED) - 1}/{len(RANGED)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


RANGED = bytes(range(256)) * 64  # 16 KiB


class _CountingServer(http.server.ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Hostile)
        self.connections: list[tuple[str, int]] = []
        self.ranges: list[str | None] = []


@dataclass
class Site:
    url: str
    ca: Path
    server: _CountingServer


@contextlib.contextmanager
def _serve(
    creds: ServerCredentials | None, host: str = "127.0.0.1"
) -> Iterator[tuple[str, _CountingServer]]:
    server = _CountingServer((host, 0))
    if creds is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(creds.cert_path, creds.key_path)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        scheme = "https" if creds is not None else "http"
        yield f"{scheme}://{host}:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def creds(ca: CertificateAuthority, tmp_path: Path) -> ServerCredentials:
    """A server certificate for localhost and 127.0.0.1 (and nothing else)."""
    return ca.server_credentials(tmp_path / "tls", hosts=["127.0.0.1"])


@pytest.fixture
def site(ca: CertificateAuthority, creds: ServerCredentials) -> Iterator[Site]:
    with _serve(creds) as (url, server):
        yield Site(url, ca.cert_path, server)


# -- raw servers that misbehave below HTTP ------------------------------------------------
Behaviour = Callable[[socket.socket, threading.Event], None]


class _RawServer:
    """Accepts TCP connections (and does the TLS handshake when given a context), then
    runs ``behave(conn, stop)`` for each in its own thread until the test ends."""

    def __init__(self, behave: Behaviour, tls: ssl.SSLContext | None) -> None:
        self._behave = behave
        self._tls = tls
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._threads: list[threading.Thread] = []
        self.port = self._listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            self._behave(conn, self._stop)
        except OSError:
            pass  # the client gave up, which is what the tests want
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._accepter.join()
        self._listener.close()
        for t in self._threads:
            t.join(timeout=10)


@pytest.fixture
def raw_server(creds: ServerCredentials) -> Iterator[Callable[[Behaviour, bool], str]]:
    """Start a raw server; returns its base URL (``https`` when it speaks TLS)."""
    servers: list[_RawServer] = []

    def start(behave: Behaviour, tls: bool) -> str:
        ctx = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(creds.cert_path, creds.key_path)
        servers.append(_RawServer(behave, ctx))
        return f"{'https' if tls else 'http'}://127.0.0.1:{servers[-1].port}"

    yield start
    for s in servers:
        s.close()


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(4096)
        if not more:
            raise ConnectionResetError("client went away")
        data += more


def _trickle(data: bytes, *, read_request: bool = True) -> Behaviour:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        if read_request:
            _read_request(conn)
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            if stop.wait(TRICKLE_S):
                return

    return behave


def _silent(*, read_request: bool) -> Behaviour:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        if read_request:
            _read_request(conn)
        stop.wait(30)

    return behave


# -- fetchers -------------------------------------------------------------------------
@pytest.fixture
def make_fetcher() -> Iterator[Callable[..., TlsFetcher]]:
    """Fetchers trusting ``ca`` (or plain HTTP), closed when the test ends."""
    made: list[TlsFetcher] = []

    def make(
        ca: Path | None,
        *,
        deadline: float = 30.0,
        read_timeout: float = 30.0,
    ) -> TlsFetcher:
        f = TlsFetcher(
            tls=create_ssl_context(ca_file=ca) if ca is not None else Unsafe.PLAIN_HTTP,
            connect_timeout=5.0,
            read_timeout=read_timeout,
            deadline_base=deadline,
            min_rate_bps=10**9,
        )
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def _elapsed_since(start: float) -> float:
    return time.monotonic() - start


# -- endless data, slow retrieval -------------------------------------------------------
def test_endless_data_is_cut_at_the_length_cap(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    with (
        pytest.raises(exceptions.DownloadLengthMismatchError),
        f.download_file(f"{site.url}/endless", 1_000_000),
    ):
        pass


def test_trickled_body_hits_the_deadline(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca, deadline=0.5)
    start = time.monotonic()
    with (
        pytest.raises(exceptions.SlowRetrievalError, match=re.escape("deadline of 0.5 s")),
        f.download_file(f"{site.url}/trickle", 1000),
    ):
        pass
    assert _elapsed_since(start) < 3.0


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_trickled_status_line_and_headers_hit_the_deadline(
    tls: bool,
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    # Every byte arrives well within the 30 s read timeout: only the deadline stops this.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Padding: " + b"p" * 60 + b"\r\n\r\nhello"
    url = raw_server(_trickle(head), tls)
    f = make_fetcher(ca.cert_path if tls else None, deadline=DEADLINE)
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError, match=re.escape(f"deadline of {DEADLINE} s")):
        f.download_bytes(f"{url}/x", 100)
    assert DEADLINE - 0.2 < _elapsed_since(start) < GIVE_UP_BOUND


@pytest.mark.parametrize("mode", ["silent", "trickle"])
def test_stalled_tls_handshake_hits_the_deadline(
    mode: str,
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    # A plain TCP server that never completes the handshake: it says nothing, or starts a
    # 16 KiB TLS handshake record and sends it one byte at a time.
    if mode == "silent":
        behave = _silent(read_request=False)
    else:
        behave = _trickle(b"\x16\x03\x03\x40\x00" + b"\x02" * 100, read_request=False)
    port = raw_server(behave, False).rsplit(":", 1)[1]
    f = make_fetcher(ca.cert_path, deadline=DEADLINE)
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError, match="deadline"):
        f.download_bytes(f"https://127.0.0.1:{port}/x", 100)
    assert DEADLINE - 0.2 < _elapsed_since(start) < GIVE_UP_BOUND


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose accept queue is full: the kernel ignores new connection attempts."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            s = socket.socket()
            fillers.append(s)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_unanswered_connect_hits_the_deadline(
    unanswered_port: int, ca: CertificateAuthority, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(ca.cert_path, deadline=DEADLINE)  # connect timeout 5 s
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError, match="deadline"):
        f.download_bytes(f"https://127.0.0.1:{unanswered_port}/x", 100)
    assert DEADLINE - 0.2 < _elapsed_since(start) < GIVE_UP_BOUND


def test_stalled_read_fails_at_the_read_timeout(
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    url = raw_server(_silent(read_request=True), True)
    f = make_fetcher(ca.cert_path, read_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError, match="socket timeout"):
        f.download_bytes(f"{url}/x", 100)
    assert _elapsed_since(start) < GIVE_UP_BOUND


def test_truncated_body_is_an_error(
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    def behave(conn: socket.socket, _: threading.Event) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)

    url = raw_server(behave, True)
    f = make_fetcher(ca.cert_path)
    with pytest.raises(exceptions.DownloadError, match="ended after 10 of 100 bytes"):
        f.download_bytes(f"{url}/x", 100)


# -- cancellation -----------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["handshake", "response"])
def test_cancel_aborts_the_request_in_progress_and_refuses_later_ones(
    phase: str,
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    if phase == "handshake":  # plain TCP: the TLS handshake waits for ever
        url = "https" + raw_server(_silent(read_request=False), False).removeprefix("http")
    else:  # the server takes the request and never answers
        url = raw_server(_silent(read_request=True), True)
    f = make_fetcher(ca.cert_path)  # 30 s deadline and read timeout: only cancel() stops it
    canceller = threading.Timer(0.5, f.cancel)
    canceller.start()
    start = time.monotonic()
    with pytest.raises(DownloadCancelledError, match="cancelled") as e:
        f.download_bytes(f"{url}/x", 100)
    assert _elapsed_since(start) < 0.5 + 2.0
    assert isinstance(e.value, exceptions.DownloadError)
    assert not isinstance(e.value, exceptions.SlowRetrievalError)
    canceller.join()

    start = time.monotonic()
    with pytest.raises(DownloadCancelledError, match="cancelled"):
        f.download_bytes(f"{url}/x", 100)
    with pytest.raises(DownloadCancelledError, match="cancelled"):
        next(iter(f.fetch(f"{url}/x")))
    assert _elapsed_since(start) < 1.0


def test_cancel_from_a_signal_handler(
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    assert threading.current_thread() is threading.main_thread()
    url = raw_server(_silent(read_request=True), True)
    f = make_fetcher(ca.cert_path)
    previous = signal.signal(signal.SIGUSR1, lambda *_: f.cancel())
    main = threading.main_thread().ident
    assert main is not None
    sender = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGUSR1))
    try:
        sender.start()
        start = time.monotonic()
        with pytest.raises(DownloadCancelledError, match="cancelled"):
            f.download_bytes(f"{url}/x", 100)
        assert _elapsed_since(start) < 0.5 + 2.0
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, previous)


# -- ranges (resuming a streamed install) -------------------------------------------------
def test_stream_range_continues_from_the_offset(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    got = b"".join(f.stream_range(f"{site.url}/range", start=5000, max_length=len(RANGED)))
    assert got == RANGED[5000:]
    assert site.server.ranges == ["bytes=5000-"]
    assert b"".join(f.stream_range(f"{site.url}/range", start=0, max_length=len(RANGED))) == RANGED
    assert site.server.ranges[-1] is None, "no Range header for a download from the start"


def test_a_server_ignoring_range_is_read_from_the_start_and_the_prefix_dropped(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    url = f"{site.url}/range-ignored"
    assert b"".join(f.stream_range(url, start=7000, max_length=len(RANGED))) == RANGED[7000:]


def test_another_range_than_asked_for_is_refused(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    with pytest.raises(exceptions.DownloadError, match=r"asked for bytes 5000- but .*5001-"):
        b"".join(f.stream_range(f"{site.url}/range-wrong", start=5000, max_length=len(RANGED)))


def test_a_range_longer_than_the_target_is_cut_at_the_cap(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    with pytest.raises(exceptions.DownloadLengthMismatchError, match="more than the expected"):
        b"".join(f.stream_range(f"{site.url}/range-long", start=5000, max_length=len(RANGED)))


# -- connections ----------------------------------------------------------------------
def test_connection_is_reused_after_a_full_read(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    for _ in range(3):
        assert f.download_bytes(f"{site.url}/ok", 100) == BODY
    assert len(site.server.connections) == 1


def test_http_error_status_is_reported_and_connection_not_reused(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    for _ in range(3):
        with pytest.raises(exceptions.DownloadHTTPError) as e:
            f.download_bytes(f"{site.url}/missing", 100)
        assert e.value.status_code == 404
    # Each 404 left its body unread: reusing that connection would read it as a response.
    assert f.download_bytes(f"{site.url}/ok", 100) == BODY
    assert len(site.server.connections) == 4


def test_connection_with_unread_body_is_not_reused(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        f.download_bytes(f"{site.url}/big", 1000)
    assert f.download_bytes(f"{site.url}/ok", 100) == BODY
    assert len(site.server.connections) == 2


def test_stale_kept_alive_connection_is_replaced(
    site: Site, make_fetcher: Callable[..., TlsFetcher], caplog: pytest.LogCaptureFixture
) -> None:
    f = make_fetcher(site.ca)
    assert f.download_bytes(f"{site.url}/stale", 100) == BODY
    with caplog.at_level(logging.DEBUG, logger="otaguard.agent.fetcher"):
        assert f.download_bytes(f"{site.url}/ok", 100) == BODY
    assert "went stale" in caplog.text
    assert len(site.server.connections) == 2


# -- TLS verification (each fails if certificate verification is switched off) -----------
def test_server_not_signed_by_provisioned_ca_is_refused(
    site: Site, tmp_path: Path, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    other_ca = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    f = make_fetcher(other_ca.cert_path)
    with pytest.raises(exceptions.DownloadError) as e:
        f.download_bytes(f"{site.url}/ok", 100)  # would succeed without verification
    assert "certificate verify failed" in str(e.value)
    assert isinstance(e.value.__cause__, ssl.SSLCertVerificationError)
    assert not site.server.connections  # no request got through


def test_certificate_for_another_host_is_refused(
    ca: CertificateAuthority,
    creds: ServerCredentials,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    # Signed by the trusted CA, but for localhost and 127.0.0.1, served at 127.0.0.2.
    with _serve(creds, host="127.0.0.2") as (url, server):
        f = make_fetcher(ca.cert_path)
        with pytest.raises(exceptions.DownloadError) as e:
            f.download_bytes(f"{url}/ok", 100)  # would succeed without verification
        cause = e.value.__cause__
        assert isinstance(cause, ssl.SSLCertVerificationError)
        assert "mismatch" in cause.verify_message
        assert "certificate verify failed" in str(e.value)
        assert not server.connections


# -- plain HTTP only when asked for by name ---------------------------------------------
def test_plain_http_url_refused_by_tls_fetcher(
    site: Site, make_fetcher: Callable[..., TlsFetcher]
) -> None:
    f = make_fetcher(site.ca)
    with pytest.raises(exceptions.DownloadError, match="plain HTTP"):
        f.download_bytes("http://127.0.0.1:1/x", 10)


def test_tls_none_is_refused() -> None:
    with pytest.raises(TypeError, match=re.escape("Unsafe.PLAIN_HTTP")):
        TlsFetcher(
            tls=None,  # type: ignore[arg-type]
            connect_timeout=5.0,
            read_timeout=5.0,
            deadline_base=5.0,
            min_rate_bps=1000,
        )


def test_plain_http_needs_the_named_unsafe_mode(site: Site) -> None:
    with pytest.warns(InsecureModeWarning, match="plain HTTP"):
        f = TlsFetcher(
            tls=Unsafe.PLAIN_HTTP,
            connect_timeout=5.0,
            read_timeout=5.0,
            deadline_base=5.0,
            min_rate_bps=1000,
        )
    try:
        with _serve(None) as (url, _):
            assert f.download_bytes(f"{url}/ok", 100) == BODY
        # No trust anchor: it cannot speak TLS, rather than speak it unverified.
        with pytest.raises(exceptions.DownloadError, match="plain HTTP"):
            f.download_bytes(f"{site.url}/ok", 100)
    finally:
        f.close()


# -- POST (the check-in) ----------------------------------------------------------------
def _answer(status: int, body: bytes) -> Behaviour:
    def behave(conn: socket.socket, _: threading.Event) -> None:
        _read_request(conn)
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    return behave


def _config(url: str) -> DeviceConfig:
    return DeviceConfig(server_url=url, hardware_id="hw", serial="dev1", health_command=["true"])


@pytest.mark.parametrize(
    "case",
    [
        (200, b"<html>", VerificationError, "the server's answer is not JSON"),
        (200, b'{"nonce": 7}', VerificationError, "nonce answer is malformed"),
        (200, b"x" * 40_000, TransportError, "answer longer than 32768 bytes"),
        (403, b'{"error": "access denied: device dev1 is revoked"}', AccessDeniedError,
         r"refused \(HTTP 403\): device dev1 is revoked"),
        (500, b"{}", TransportError, "server answered 500"),
    ],
)  # fmt: skip
def test_a_hostile_check_in_answer_is_a_clean_error(
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
    tmp_path: Path,
    case: tuple[int, bytes, type[Exception], str],
) -> None:
    status, body, error, message = case
    url = raw_server(_answer(status, body), True)
    signer = CryptoSigner(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(error, match=message):
        check_in(
            make_fetcher(ca.cert_path),
            paths=DevicePaths(tmp_path),
            config=_config(url),
            signer=signer,
        )


def test_a_trickled_post_answer_hits_the_deadline(
    raw_server: Callable[[Behaviour, bool], str],
    ca: CertificateAuthority,
    make_fetcher: Callable[..., TlsFetcher],
) -> None:
    url = raw_server(_trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100), True)
    f = make_fetcher(ca.cert_path, deadline=DEADLINE)
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError):
        f.post(f"{url}/api/v1/device/nonce", b"", content_type="application/json", max_length=1000)
    assert _elapsed_since(start) < GIVE_UP_BOUND
