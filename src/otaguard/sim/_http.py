"""A small HTTP/1.1 client over asyncio streams, for the fleet simulator only.

One connection is one TLS session (a fresh mutual-TLS handshake, as a device that wakes
up, checks in and sleeps again makes); several requests may follow on it. Answers are
read under hard caps (header bytes, body bytes, one timeout per step) and every foreign
exception becomes a :class:`TransportError` with ``raise ... from``, so a hostile or
broken server is an error the simulator counts, never a crash or a hang.

Only what the device protocol needs: ``Content-Length`` bodies (the otaguard server and
nginx send those for JSON and metadata), ``chunked`` refused as unexpected.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit

from otaguard.model.errors import TransportError

__all__ = ["MAX_HEADER_BYTES", "AsyncConnection"]

#: the status line and headers of an answer; otaguard's are a few hundred bytes, more is
#: hostile (bounds what a server can make the simulator buffer before the body)
MAX_HEADER_BYTES: Final = 16 * 1024
#: header lines of an answer (the same reason)
MAX_HEADER_LINES: Final = 64


class AsyncConnection:
    """One keep-alive HTTPS connection to ``base_url``, opened with ``tls``.

    ``headers`` go with every request (the operator's bearer token, for instance).
    """

    def __init__(
        self,
        base_url: str,
        *,
        tls: ssl.SSLContext,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme != "https" or not url.hostname:
            raise TransportError(f"the simulator talks HTTPS only, not {base_url!r}")
        self._host = url.hostname
        self._port = url.port or 443
        self._prefix = url.path.rstrip("/")
        self._tls = tls
        self._timeout = timeout
        self._headers = dict(headers or {})
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> AsyncConnection:
        await self.open()
        return self

    async def __aexit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect and complete the TLS handshake.

        Raises:
            TransportError: refused, timed out, or the handshake failed.
        """
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self._host, self._port, ssl=self._tls, server_hostname=self._host
                ),
                self._timeout,
            )
        except ssl.SSLError as e:
            raise TransportError(f"TLS with {self._host}:{self._port} failed: {e.reason}") from e
        except (OSError, TimeoutError) as e:
            raise TransportError(f"cannot connect to {self._host}:{self._port}: {e!r}") from e

    async def close(self) -> None:
        """Close the connection (errors while closing are of no interest)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), self._timeout)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        max_body: int,
    ) -> tuple[int, bytes]:
        """Send one request and read its answer (status, body of at most ``max_body``).

        Raises:
            TransportError: the connection failed, timed out, or the answer is malformed
                or larger than its caps.
        """
        if self._reader is None or self._writer is None:
            raise TransportError("the connection is not open")
        lines = [
            f"{method} {self._prefix}{path} HTTP/1.1",
            f"Host: {self._host}:{self._port}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in {**self._headers, **(headers or {})}.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self._writer.write(head + body)
            await asyncio.wait_for(self._writer.drain(), self._timeout)
            return await asyncio.wait_for(self._answer(self._reader, max_body), self._timeout)
        except TransportError:
            raise
        except ssl.SSLError as e:
            raise TransportError(f"TLS failed during {method} {path}: {e.reason}") from e
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            raise TransportError(f"{method} {path} failed: {e!r}") from e
        except asyncio.LimitOverrunError as e:
            raise TransportError(f"{method} {path}: the answer's header line is too long") from e

    @staticmethod
    async def _answer(reader: asyncio.StreamReader, max_body: int) -> tuple[int, bytes]:
        status_line = await reader.readuntil(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise TransportError("the server's answer is not HTTP/1.1")
        status = int(parts[1])
        length: int | None = None
        seen = len(status_line)
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readuntil(b"\r\n")
            seen += len(line)
            if seen > MAX_HEADER_BYTES:
                raise TransportError(f"the answer's headers exceed {MAX_HEADER_BYTES} bytes")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                if not value.strip().isdigit():
                    raise TransportError("the answer's Content-Length is malformed")
                length = int(value.strip())
            elif key == b"transfer-encoding":
                raise TransportError("the answer is chunked: not what the server sends")
        else:
            raise TransportError(f"the answer has more than {MAX_HEADER_LINES} header lines")
        if length is None:
            raise TransportError("the answer has no Content-Length")
        if length > max_body:
            raise TransportError(f"the answer's body of {length} bytes exceeds {max_body}")
        return status, await reader.readexactly(length)
