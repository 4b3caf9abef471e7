"""Handing the verified client certificate from the TLS layer to the application.

uvicorn does not put the peer certificate into the ASGI scope. :class:`TlsScopeProtocol`
is uvicorn's httptools protocol (llhttp, the C parser) that does, following the ASGI TLS extension
(``scope["extensions"]["tls"]``, https://asgi.readthedocs.io/en/latest/specs/tls.html):
``client_cert_chain`` holds the PEM of the certificate the client presented, which the
server's TLS context already verified against the device CA (a certificate that does not
verify fails the handshake, so a certificate in the scope is a verified one).

The server pins uvicorn to this protocol: a protocol that did not fill the extension would
make every device request look anonymous, which the device routes refuse. httptools (and
uvloop) are dependencies of the ``server`` extra; the pure-Python h11 parser cost a third
of the server CPU of a metadata request (ADR 0016).

Behind a reverse proxy that terminates mutual TLS (nginx, see ``deploy/nginx/``),
:class:`ForwardedClientCert` puts the certificate the proxy verified and forwarded
(header ``X-Client-Cert``: URL-encoded PEM, nginx's ``$ssl_client_escaped_cert``, with
``X-Client-Verify: SUCCESS``, nginx's ``$ssl_client_verify``) into the same place, but only
when the TCP peer is a configured trusted proxy. From any other peer the headers are
ignored and logged: the request has only the certificate of its own TLS connection. A
forwarded certificate was verified by the proxy, not by this process, so the device gate
checks its signature against the device CA again (defence in depth), as it does for all.

Slow clients (slowloris): :class:`TlsScopeProtocol` gives every request a header
deadline (``ServerSettings.header_timeout``), from the end of the handshake or of the
previous response until the request line and every header have arrived. A connection that
trickles or idles past it is aborted (no TLS close_notify exchange to wait for), so no
unauthenticated client can hold a connection slot longer than that. A request line and
headers longer than :data:`MAX_REQUEST_HEADER_BYTES` are answered 431 and the connection
closed (llhttp itself sets no such bound).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import unquote

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from otaguard.server.settings import DEFAULT_HEADER_TIMEOUT_SECONDS

__all__ = [
    "CLIENT_CERT_HEADER",
    "CLIENT_VERIFY_HEADER",
    "MAX_FORWARDED_CERT_BYTES",
    "MAX_REQUEST_HEADER_BYTES",
    "TLS_EXTENSION",
    "ForwardedClientCert",
    "TlsScopeProtocol",
    "client_certificate_der",
    "client_certificate_error",
    "client_certificate_proxy",
]

logger = logging.getLogger(__name__)

TLS_EXTENSION: Final = "tls"
#: the verified client certificate a trusted proxy forwards (URL-encoded PEM)
CLIENT_CERT_HEADER: Final = "x-client-cert"
#: the proxy's verification result; only ``SUCCESS`` makes the certificate count
CLIENT_VERIFY_HEADER: Final = "x-client-verify"
# A URL-encoded P-256 certificate is about 1.2 KB; a header this long is not one.
MAX_FORWARDED_CERT_BYTES: Final = 16 * 1024
#: peer addresses whose trust is kept decided (the proxies, and any others that connect)
PEERS_KEPT: Final = 1024
#: a request line and headers may be this long (a device's request is a few hundred bytes;
#: a forwarded certificate header about 1.2 KB); more is answered 431 and the connection closed
MAX_REQUEST_HEADER_BYTES: Final = 16 * 1024
_HEADERS_TOO_LARGE: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 31\r\nconnection: close\r\n\r\nrequest headers are too large.\n"
)
_NetworkType = ipaddress.IPv4Network | ipaddress.IPv6Network
# ASGI TLS extension: tls_version is the TLS protocol version number, e.g. 0x0304.
_TLS_VERSIONS: Final = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def _tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


class _WithTls:
    """ASGI middleware for one connection: adds the connection's TLS facts to each scope."""

    def __init__(self, app: Any, tls: dict[str, Any]):
        self._app = app
        self._tls = tls

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions[TLS_EXTENSION] = self._tls
        await self._app({**scope, "extensions": extensions}, receive, send)


class _CoalescingTransport:
    """A transport that joins the writes of one event-loop step into one.

    uvicorn writes a response's head and body separately; under TLS each write is a TLS
    record and a ``send`` system call (on loopback the most expensive part of a small
    response). They are joined and written once the current step is over. Everything
    else is the wrapped transport's; closing writes what is pending first.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Queue ``data``; written with the rest of this step's writes."""
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def close(self) -> None:
        """Write what is pending, then close."""
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        """Drop what is pending and abort."""
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TlsScopeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, putting the verified peer certificate into the ASGI
    scope, with a deadline and a size bound for each request's headers (module docstring).

    The deadline is a class attribute so that the runner can set it from the settings
    (uvicorn builds protocols itself): :meth:`with_header_timeout`.
    """

    header_timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    #: connections this process cut for slow headers (tests and logs read it)
    headers_timed_out: int = 0
    _header_timer: asyncio.TimerHandle | None = None
    # when the awaited request's headers are due (loop time), None when none is awaited; one
    # timer per connection follows it (re-armed when it fires early), not one per request
    _header_deadline: float | None = None
    # the request cycle that was current when the deadline was armed: a new one means the
    # headers of the next request arrived
    _armed_after: object = None
    # bytes received since the deadline was armed (the awaited request line and headers)
    _header_bytes: int = 0
    # a request's headers are complete and its body is still arriving: those bytes are the
    # body's, not the next request's headers (an early answer, e.g. 413, leaves the rest of
    # the body on the connection, which the parser reads as that request's body)
    _in_body: bool = False

    @classmethod
    def with_header_timeout(cls, seconds: float) -> type[TlsScopeProtocol]:
        """A subclass whose header deadline is ``seconds`` (positive)."""
        if not seconds > 0:
            raise ValueError("the header timeout must be positive")
        return type(cls.__name__, (cls,), {"header_timeout": float(seconds)})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Record the connection's TLS facts (the handshake is complete by now)."""
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            self.app = _WithTls(self.app, _tls_extension(ssl_object))
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._armed_after = self.cycle
        self._header_bytes = 0
        self._header_deadline = self.loop.time() + self.header_timeout
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(self._header_deadline, self._check_headers)

    def _cancel_header_deadline(self) -> None:
        self._header_deadline = None  # the timer, if any, finds nothing due and ends

    def _check_headers(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < deadline:  # re-armed since: wait for the new deadline
            self._header_timer = self.loop.call_at(deadline, self._check_headers)
            return
        type(self).headers_timed_out += 1
        logger.info(
            "closed a connection from %s: no complete request headers within %g s",
            self.client[0] if self.client else "?",
            self.header_timeout,
        )
        # abort, not close: a slow client need not read the TLS close_notify, and closing
        # would wait for it with the socket still held
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        """Feed the parser; the deadline ends when a request's headers are complete, and
        headers still incomplete after :data:`MAX_REQUEST_HEADER_BYTES` are refused."""
        # Bytes that reach the parser while a body is still arriving are the body's: only
        # a chunk that starts outside one counts (one that ends a body and starts the next
        # request is not counted, so the bound may be one read late, never early).
        counts = not self._in_body
        super().data_received(data)
        if self._header_deadline is None:
            return
        if self.cycle is not self._armed_after:
            self._cancel_header_deadline()
            return
        if counts:
            self._header_bytes += len(data)
        if self._header_bytes > MAX_REQUEST_HEADER_BYTES and not self.transport.is_closing():
            self._cancel_header_deadline()
            logger.info(
                "refused a request from %s: headers longer than %d bytes",
                self.client[0] if self.client else "?",
                MAX_REQUEST_HEADER_BYTES,
            )
            self.transport.write(_HEADERS_TOO_LARGE)
            self.transport.close()

    def on_headers_complete(self) -> None:
        """A request's headers are complete: its body (if any) follows."""
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """A request's body is complete: what follows is the next request."""
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """The next request's headers are due within the deadline (keep-alive)."""
        finished = self.cycle
        super().on_response_complete()
        if self.transport.is_closing():
            self._cancel_header_deadline()
        elif self.cycle is finished:  # no pipelined request started meanwhile
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._cancel_header_deadline()
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def client_certificate_der(scope: Any) -> bytes | None:
    """Return the client certificate (DER) of a request's scope, or ``None``.

    Verified by this process's TLS layer, or by a trusted proxy that forwarded it (the
    device gate checks its signature again either way).

    Raises:
        ValueError: the certificate in the scope is not PEM.
    """
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])


def client_certificate_error(scope: Any) -> str | None:
    """Why a forwarded client certificate could not be taken, or ``None``."""
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    error = tls.get("client_cert_error")
    return error if isinstance(error, str) else None


def client_certificate_proxy(scope: Any) -> str | None:
    """The trusted proxy that forwarded the request's client certificate, or ``None``."""
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    proxy = tls.get("client_cert_forwarded_by")
    return proxy if isinstance(proxy, str) else None


def _forwarded_pem(values: list[bytes], verify: list[bytes]) -> tuple[str | None, str | None]:
    """(PEM, None) for a usable forwarded certificate, (None, why) otherwise, (None, None)
    when none was forwarded."""
    if not values:
        return None, None
    if len(values) != 1 or len(verify) != 1:
        return None, "the proxy forwarded several client certificate headers"
    if verify[0] != b"SUCCESS":
        return None, "the proxy did not verify the forwarded client certificate"
    if len(values[0]) > MAX_FORWARDED_CERT_BYTES:
        return None, "the forwarded client certificate is too large"
    try:
        pem = unquote(values[0].decode("ascii"), errors="strict")
        der = ssl.PEM_cert_to_DER_cert(pem.strip())
    except (UnicodeDecodeError, ValueError):
        return None, "the forwarded client certificate is unreadable"
    return ssl.DER_cert_to_PEM_cert(der), None


class ForwardedClientCert:
    """ASGI middleware: the client certificate a trusted proxy forwarded (module docstring).

    The forwarding headers are removed from every request, trusted or not, so nothing
    further in can read them by mistake.
    """

    def __init__(self, app: Any, *, trusted_proxies: Sequence[_NetworkType]):
        """Wrap ``app``; ``trusted_proxies`` are the only peers whose headers count."""
        self._app = app
        self._trusted = tuple(trusted_proxies)
        # Every request asks, from the same few proxies: parsing the address each time was
        # a visible share of a check-in's event-loop work.
        self._trusted_address = functools.lru_cache(maxsize=PEERS_KEPT)(self._check_address)

    def _check_address(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers this way
        return any(addr in net for net in self._trusted)

    def _is_trusted(self, peer: Any) -> bool:
        if not self._trusted or not peer:
            return False
        return bool(self._trusted_address(str(peer[0])))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Handle one ASGI call (only HTTP requests are touched)."""
        if scope.get("type") != "http":
            await self._app(scope, receive, send)
            return
        names = (CLIENT_CERT_HEADER.encode(), CLIENT_VERIFY_HEADER.encode())
        headers = list(scope.get("headers") or [])
        certs = [v for k, v in headers if k.lower() == names[0]]
        verify = [v for k, v in headers if k.lower() == names[1]]
        scope = {**scope, "headers": [(k, v) for k, v in headers if k.lower() not in names]}
        peer = scope.get("client")
        if self._is_trusted(peer):
            pem, error = _forwarded_pem(certs, verify)
            if error is not None:
                logger.warning("proxy %s: %s", peer[0], error)
            extensions = dict(scope.get("extensions") or {})
            # The proxy's own TLS identity (if any) is not the device's: replaced.
            extensions[TLS_EXTENSION] = {
                **(extensions.get(TLS_EXTENSION) or {}),
                "client_cert_chain": [pem] if pem is not None else [],
                "client_cert_error": error,
                "client_cert_forwarded_by": str(peer[0]),
            }
            scope["extensions"] = extensions
        elif certs or verify:
            logger.warning(
                "ignored a forwarded client certificate header from %s: not a trusted proxy",
                peer[0] if peer else "an unknown peer",
            )
        await self._app(scope, receive, send)
