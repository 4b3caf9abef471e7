"""Handing the verified client certificate from the TLS layer to the application.

uvicorn does not put the peer certificate into the ASGI scope. :class:`TlsScopeH11Protocol`
is uvicorn's h11 protocol that does, following the ASGI TLS extension
(``scope["extensions"]["tls"]``, https://asgi.readthedocs.io/en/latest/specs/tls.html):
``client_cert_chain`` holds the PEM of the certificate the client presented, which the
server's TLS context already verified against the device CA (a certificate that does not
verify fails the handshake, so a certificate in the scope is a verified one).

The server pins uvicorn to this protocol (h11): httptools is not a dependency, and a
protocol that did not fill the extension would make every device request look anonymous,
which the device routes refuse.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Final

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["TLS_EXTENSION", "TlsScopeH11Protocol", "client_certificate_der"]

TLS_EXTENSION: Final = "tls"
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


class TlsScopeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, putting the verified peer certificate into the ASGI scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Record the connection's TLS facts (the handshake is complete by now)."""
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            self.app = _WithTls(self.app, _tls_extension(ssl_object))


def client_certificate_der(scope: Any) -> bytes | None:
    """Return the verified client certificate (DER) of a request's scope, or ``None``."""
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return ssl.PEM_cert_to_DER_cert(chain[0])
