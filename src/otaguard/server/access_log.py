"""The access log: one line per HTTP request, on the ``otaguard.access`` logger (INFO).

Each line names the method, the path (never the query string), the status, the time to the
last byte of the response, the TCP peer and the client identity: the subject CN of the
verified client certificate (the device's serial; directly or forwarded by a trusted
proxy), or ``-``. No header, token or body is ever logged. In the JSON log format the same
fields are keys of their own (ADR 0030).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from otaguard.server._tls import TLS_EXTENSION

__all__ = ["ACCESS_LOGGER", "AccessLog"]

ACCESS_LOGGER: Final = "otaguard.access"
logger = logging.getLogger(ACCESS_LOGGER)
#: distinct client certificates whose CN is kept parsed (a fleet's worth of recent ones:
#: each worker sees the whole fleet, as the device gate's kept verifications)
_IDENTITY_CACHE: Final = 16384
#: a request path is shown up to this many characters (a hostile URL stays one short line)
_MAX_PATH_CHARS: Final = 512


@functools.lru_cache(maxsize=_IDENTITY_CACHE)
def _common_name(pem: str) -> str:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return "?"
    return str(names[0].value) if names else "?"


def client_identity(scope: Any) -> str:
    """The CN of the request's verified client certificate, or ``-`` without one."""
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    chain = tls.get("client_cert_chain") or []
    return _common_name(chain[0]) if chain and isinstance(chain[0], str) else "-"


class AccessLog:
    """ASGI middleware logging each HTTP request once its response is finished."""

    def __init__(self, app: Any):
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request through; log it when the response ends (or the app fails)."""
        if scope["type"] != "http" or not logger.isEnabledFor(logging.INFO):
            await self._app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            client = scope.get("client")
            fields = {
                "method": str(scope.get("method", "?")),
                "path": str(scope.get("path", "?"))[:_MAX_PATH_CHARS],
                "status": status or 500,
                "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else "-",
                "identity": client_identity(scope),
            }
            logger.info(
                "%s %s %d %.1f ms client %s identity %s",
                fields["method"], fields["path"], fields["status"], fields["duration_ms"],
                fields["client"], fields["identity"],
                extra=fields,
            )  # fmt: skip
