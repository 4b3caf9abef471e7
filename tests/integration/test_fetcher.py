"""The agent's fetcher against hostile servers on real TLS sockets."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions

from otaguard.agent import TlsFetcher, create_ssl_context
from otaguard.crypto import CertificateAuthority


class _Hostile(http.server.BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(10_000):  # bounded: stops by itself
                    self.wfile.write(b"x" * 65536)
            except OSError:
                pass
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(40):  # at most 4 s of one byte per 0.1 s
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    creds = ca.server_credentials(tmp_path / "tls", hosts=["127.0.0.1"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(creds.cert_path, creds.key_path)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca.cert_path
    finally:
        server.shutdown()
        server.server_close()


def _fetcher(ca: Path, *, deadline: float = 30.0, read_timeout: float = 5.0) -> TlsFetcher:
    return TlsFetcher(
        ssl_context=create_ssl_context(ca_file=ca),
        connect_timeout=5.0,
        read_timeout=read_timeout,
        deadline_base=deadline,
        min_rate_bps=10**9,
    )


def test_endless_data_is_cut_at_the_length_cap(hostile: tuple[str, Path]) -> None:
    url, ca = hostile
    f = _fetcher(ca)
    with (
        pytest.raises(exceptions.DownloadLengthMismatchError),
        f.download_file(f"{url}/endless", 1_000_000),
    ):
        pass
    f.close()


def test_trickled_download_hits_the_deadline(hostile: tuple[str, Path]) -> None:
    url, ca = hostile
    f = _fetcher(ca, deadline=0.5)
    start = time.monotonic()
    with pytest.raises(exceptions.SlowRetrievalError), f.download_file(f"{url}/trickle", 1000):
        pass
    assert time.monotonic() - start < 3.0
    f.close()


def test_http_error_status_is_reported_and_connection_not_reused(hostile: tuple[str, Path]) -> None:
    url, ca = hostile
    f = _fetcher(ca)
    for _ in range(3):
        with (
            pytest.raises(exceptions.DownloadHTTPError) as e,
            f.download_file(f"{url}/missing", 100),
        ):
            pass
        assert e.value.status_code == 404
    f.close()


def test_server_not_signed_by_provisioned_ca_is_refused(
    hostile: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = hostile
    other_ca = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    f = _fetcher(other_ca.cert_path)
    with pytest.raises(exceptions.DownloadError), f.download_file(f"{url}/missing", 100):
        pass
    f.close()


def test_plain_http_url_refused_by_tls_fetcher(hostile: tuple[str, Path]) -> None:
    _, ca = hostile
    f = _fetcher(ca)
    with (
        pytest.raises(exceptions.DownloadError, match="plain HTTP"),
        f.download_file("http://127.0.0.1:1/x", 10),
    ):
        pass
    f.close()
