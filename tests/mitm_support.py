"""A hostile HTTPS server in front of a real otaguard server, for the attack catalogue.

The attacker stole the server's TLS certificate and key (``DATA/tls/server.{pem,key}``),
so a device connecting to it completes the handshake as if it were the server, and a
device's credentials (its key file and certificate), so it can forward the device's
requests upstream and obtain genuine answers. What the device must still refuse is every
byte it changes: the mirror is untrusted by design (docs/design.md §1, §4).

Each request goes through ``rule(method, path)``, which answers with an :class:`Act`:
forward unchanged, forward and transform the body, answer with other bytes, send an
endless body, trickle the head or the body, or drop the connection.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from otaguard.agent import Device

__all__ = ["Act", "Mitm", "mitm", "point_device_at"]

#: how long a trickle lasts at most (bounded, so a test never hangs on it)
TRICKLE_MAX_S = 20.0
#: one byte per this many seconds when trickling: each byte restarts a socket read timeout
TRICKLE_STEP_S = 0.2

Kind = Literal["forward", "transform", "replace", "endless", "trickle-head", "trickle-body", "drop"]


@dataclass(frozen=True)
class Act:
    """What the mirror does with one request."""

    kind: Kind = "forward"
    #: ``transform``: new body from the genuine one; ``replace``: the body to send
    body: Callable[[bytes], bytes] | bytes | None = None
    status: int = 200


FORWARD = Act()
#: headers the mirror sets itself rather than copying from upstream
HOP_HEADERS = ("content-length", "connection", "transfer-encoding", "date", "server")


@dataclass
class Mitm:
    """The running hostile server: its URL and the requests it saw."""

    url: str
    seen: list[tuple[str, str]] = field(default_factory=list)
    rule: Callable[[str, str], Act] = lambda _m, _p: FORWARD


def point_device_at(dev: Device, url: str, **config: object) -> Device:
    """Rewrite ``dev``'s config to talk to ``url`` (and any other settings); reopen it."""
    import dataclasses

    cfg = dataclasses.replace(dev.config, server_url=url, **config)  # type: ignore[arg-type]
    cfg.save(dev.paths.config)
    return Device(dev.paths.root)


def _upstream_context(ca_pem: Path, device: Device) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    # the stolen device identity: its certificate chain and (development) key file
    ctx.load_cert_chain(str(device.paths.device_cert), str(device.paths.device_key))
    return ctx


@contextlib.contextmanager
def mitm(*, data_dir: Path, upstream: str, ca_pem: Path, stolen_identity: Device) -> Iterator[Mitm]:
    """Serve on 127.0.0.1 with the server's stolen certificate, forwarding to ``upstream``.

    Args:
        data_dir: the real server's data directory (the certificate and key are taken there).
        upstream: the real server's base URL.
        ca_pem: the CA the real server's certificate chains to.
        stolen_identity: the device whose key file and certificate the attacker copied.
    """
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(
        str(data_dir / "tls" / "server.pem"), str(data_dir / "tls" / "server.key")
    )
    up_ctx = _upstream_context(ca_pem, stolen_identity)
    host, port = upstream.removeprefix("https://").rstrip("/").rsplit(":", 1)
    state = Mitm(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            pass

        def _genuine(self, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPSConnection(host, int(port), context=up_ctx, timeout=30)
            try:
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "keep-alive")
                }
                conn.request(method, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.getheaders(), resp.read()
            finally:
                conn.close()

        def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in (
                    "content-length",
                    "connection",
                    "transfer-encoding",
                    "date",
                    "server",
                ):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _handle(self, method: str) -> None:
            state.seen.append((method, self.path))
            act = state.rule(method, self.path)
            if act.kind == "drop":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if act.kind == "trickle-head":
                self.close_connection = True
                head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Pad: " + b"p" * 500
                _trickle(self.wfile, head)
                return
            status, headers, body = self._genuine(method)
            if act.kind == "transform":
                assert callable(act.body)
                body = act.body(body)
            elif act.kind == "replace":
                assert isinstance(act.body, bytes)
                status, headers, body = act.status, [("Content-Type", "application/json")], act.body
            elif act.kind in ("endless", "trickle-body"):
                self.close_connection = True
                self.send_response(200)
                if act.kind == "trickle-body":
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if act.kind == "trickle-body":
                    _trickle(self.wfile, body)
                else:
                    _endless(self.wfile)
                return
            self._send(status, headers, body)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> tuple[socket.socket, object]:
            sock, addr = super().get_request()
            sock.settimeout(30)
            try:
                return server_ctx.wrap_socket(sock, server_side=True), addr
            except (OSError, ssl.SSLError):
                sock.close()
                raise

    srv = Server(("127.0.0.1", 0), Handler)
    state.url = f"https://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()


def _trickle(out: object, data: bytes) -> None:
    start = time.monotonic()
    with contextlib.suppress(OSError):
        for b in data:
            if time.monotonic() - start > TRICKLE_MAX_S:
                return
            out.write(bytes([b]))  # type: ignore[attr-defined]
            out.flush()  # type: ignore[attr-defined]
            time.sleep(TRICKLE_STEP_S)


def _endless(out: object) -> None:
    with contextlib.suppress(OSError):
        for _ in range(100_000):  # 6.4 GB at most: the device must stop long before
            out.write(b"{" * 65536)  # type: ignore[attr-defined]


@contextlib.contextmanager
def silent_tls_port() -> Iterator[int]:
    """A TCP port that accepts and never completes the TLS handshake (stalled handshake)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        lst.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(lst.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield lst.getsockname()[1]
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        lst.close()
