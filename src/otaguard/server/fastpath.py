"""The device repository routes' fast path: ``/metadata`` and ``/targets`` in front of
FastAPI's middleware and routing.

A device poll is a few GETs of files that change only when a release lands; the path
through FastAPI (middlewares, dependency injection, a worker thread, a database query)
cost tens of times the bytes it served. :class:`RepositoryFastPath` is a plain ASGI
middleware that answers ``GET`` and ``HEAD`` of these two prefixes itself and hands
everything else to the application:

1. Authorization first, with the same rules as the routes (ADR 0004, ADR 0007): an
   operator token of any role, or a device certificate the gate admits
   (:class:`~otaguard.server.device_auth.DeviceGate`: signature, validity, registry
   status) that checked in within :data:`~otaguard.server.checkin.CHECKIN_WINDOW`. A
   device's admission is kept in memory (:class:`DeviceAdmissions`) until the registry
   changes (any process sharing the data directory signals it, so a quarantine refuses
   the device's next request) and at most :data:`ADMISSION_SECONDS`.
2. Metadata from memory as the exact signed bytes (:mod:`.served`), ``HEAD`` too.
3. Blobs from the blob store in large reads (:data:`BLOB_CHUNK_BYTES`), ``Range`` kept.
4. :data:`MAY_READ_PATH`: 204 for whoever may read the repository (nginx's
   ``auth_request`` in front of a static tree, ``deploy/nginx/otaguard-static.conf``).

Everything the gate or the store needs to block on runs in a worker thread; the event
loop never waits on the database.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio.to_thread
from starlette.responses import FileResponse

from otaguard.model.errors import AccessDeniedError, OtaguardError
from otaguard.server._names import parse_blob_name
from otaguard.server._signal import ChangeSignal
from otaguard.server._tls import TLS_EXTENSION, client_certificate_error
from otaguard.server.auth import OperatorAuth
from otaguard.server.checkin import CHECKIN_WINDOW, CheckinServices
from otaguard.server.device_auth import DeviceGate
from otaguard.server.served import ServedMetadata
from otaguard.server.storage.base import BlobStore, MetadataRecord

__all__ = [
    "ADMISSION_SECONDS",
    "BLOB_CHUNK_BYTES",
    "IMMUTABLE_CACHE",
    "MAX_ADMISSIONS_KEPT",
    "MAY_READ_PATH",
    "NO_CACHE",
    "DeviceAdmissions",
    "RepositoryFastPath",
]

logger = logging.getLogger(__name__)

# Versioned metadata and blobs never change, so caches may keep them; the mutable names
# (timestamp.json, root.json) and 404s must be re-fetched every time.
IMMUTABLE_CACHE: Final = "public, max-age=31536000, immutable"
NO_CACHE: Final = "no-store"
#: an admitted certificate is re-checked against the registry at least this often even
#: when no change was signalled: the bound for a process that does not share the data
#: directory (or a signal file that could not be written); the check-in window and the
#: certificate's expiry are checked on every request regardless
ADMISSION_SECONDS: Final = 5.0
#: admitted certificates kept (one per device polling now, about 2 KiB each)
MAX_ADMISSIONS_KEPT: Final = 16384
#: reads of a blob being served: large, so a 256 MiB image is 256 reads and writes of
#: the event loop, not 4,096 (starlette's default is 64 KiB)
BLOB_CHUNK_BYTES: Final = 1024 * 1024
# A 503 for "not ready yet" tells clients when to come back.
_RETRY_AFTER_SECONDS: Final = 2

_METADATA_PREFIX: Final = "/metadata/"
_TARGETS_PREFIX: Final = "/targets/"
#: nginx's ``auth_request`` asks here whether a device may read the static tree
MAY_READ_PATH: Final = "/api/v1/device/may-read"


@dataclass(frozen=True)
class _Admission:
    signal: object  # the registry signal's token when the registry was read
    at: float  # monotonic time of that read
    not_after: dt.datetime  # the certificate's expiry
    window_ends: dt.datetime  # its last accepted check-in + CHECKIN_WINDOW


class DeviceAdmissions:
    """Device certificates that passed the gate and the check-in window, kept briefly."""

    def __init__(
        self,
        *,
        gate: DeviceGate,
        checkins: CheckinServices,
        signal: ChangeSignal,
        clock: Callable[[], dt.datetime],
        monotonic: Callable[[], float] = time.monotonic,
    ):
        """Admit through ``gate`` and ``checkins``; ``signal`` announces registry changes."""
        self._gate = gate
        self._checkins = checkins
        self._signal = signal
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # keyed by the certificate's PEM as the TLS layer (or the proxy) handed it over: the
        # same text for the same certificate, no decoding per request
        self._kept: OrderedDict[str, _Admission] = OrderedDict()

    def admitted(self, scope: Any) -> bool:
        """Whether the request's certificate was admitted since the registry last changed,
        is unexpired and within its check-in window (memory and one ``stat``)."""
        key = _certificate_key(scope)
        if key is None:
            return False
        entry = self._kept.get(key)
        if entry is None:
            return False
        now = self._clock()
        if (
            entry.signal != self._signal.token()
            or self._monotonic() - entry.at > ADMISSION_SECONDS
            or entry.not_after <= now
            or entry.window_ends <= now
        ):
            with self._lock:
                self._kept.pop(key, None)
            return False
        return True

    def admit(self, scope: Any) -> None:
        """Run every check of the device routes and keep a success (blocking: the registry
        and the check-in history are read).

        Raises:
            AccessDeniedError: refused; the message is the reason.
        """
        token = self._signal.token()  # before the reads: a change during them re-checks
        at = self._monotonic()
        dev = self._gate.authenticate(scope)
        if dev is None:
            return  # no certificate, and none required (the named insecure mode)
        last = self._checkins.checkins.last_accepted(dev.identity.cert_serial)
        if last is None or last + CHECKIN_WINDOW <= self._clock():
            # refused with the routes' own reason and log line
            self._checkins.require_recent(dev, window=CHECKIN_WINDOW)
            return  # pragma: no cover - require_recent refuses what was found stale
        key = _certificate_key(scope)
        if key is None:  # pragma: no cover - authenticate found one
            return
        admission = _Admission(
            signal=token,
            at=at,
            not_after=dev.certificate.not_valid_after_utc,
            window_ends=last + CHECKIN_WINDOW,
        )
        with self._lock:
            self._kept[key] = admission
            self._kept.move_to_end(key)
            while len(self._kept) > MAX_ADMISSIONS_KEPT:
                self._kept.popitem(last=False)


def _certificate_key(scope: Any) -> str | None:
    """The request's client certificate PEM (the admissions' key), or ``None`` when there
    is none or a forwarded one was refused."""
    if client_certificate_error(scope) is not None:
        return None
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    chain = tls.get("client_cert_chain") or []
    return chain[0] if chain and isinstance(chain[0], str) else None


class _BlobResponse(FileResponse):
    chunk_size = BLOB_CHUNK_BYTES


def _header(scope: Any, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value)
    return None


async def _send_json_error(send: Any, status: int, message: str, *, retry: bool = False) -> None:
    body = json.dumps({"error": " ".join(message.split())}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", NO_CACHE.encode()),
    ]
    if retry:
        headers.append((b"retry-after", str(_RETRY_AFTER_SECONDS).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RepositoryFastPath:
    """ASGI middleware serving the repository routes itself (module docstring)."""

    def __init__(
        self,
        app: Any,
        *,
        served: ServedMetadata,
        blobs: BlobStore,
        admissions: DeviceAdmissions,
        auth: OperatorAuth,
    ):
        """Serve ``/metadata`` and ``/targets`` from ``served`` and ``blobs``; the rest
        goes to ``app``."""
        self._app = app
        self._served = served
        self._blobs = blobs
        self._admissions = admissions
        self._auth = auth

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self._app(scope, receive, send)
            return
        path: str = scope["path"]
        serve: Callable[[str, Any, Any, Any], Awaitable[None]]
        if path.startswith(_METADATA_PREFIX):
            serve = self._metadata
            name = path[len(_METADATA_PREFIX) :]
        elif path.startswith(_TARGETS_PREFIX):
            serve = self._target
            name = path[len(_TARGETS_PREFIX) :]
        elif path == MAY_READ_PATH:
            serve = self._may_read
            name = ""
        else:
            await self._app(scope, receive, send)
            return
        try:
            await self._authorize(scope)
            await serve(name, scope, receive, send)
        except AccessDeniedError as e:
            await _send_json_error(send, 403, e.diagnostics())
        except OtaguardError as e:
            # one line naming the cause (a storage fault), not a traceback
            logger.error("serving %s failed: %s", path, e.diagnostics())  # noqa: TRY400
            await _send_json_error(send, 503, e.diagnostics(), retry=True)

    async def _authorize(self, scope: Any) -> None:
        if self._admissions.admitted(scope):
            return
        header = _header(scope, b"authorization")
        if header is not None:
            scheme, _, presented = header.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                who = await anyio.to_thread.run_sync(self._auth.identify, presented.strip())
                if who is not None:
                    return
        await anyio.to_thread.run_sync(self._admissions.admit, scope)

    async def _may_read(self, _name: str, _scope: Any, _receive: Any, send: Any) -> None:
        # Authorized by now (a refusal is a 403 with the reason): nothing else to say.
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _metadata(self, name: str, scope: Any, _receive: Any, send: Any) -> None:
        if self._served.stale():
            await anyio.to_thread.run_sync(self._served.refresh)
        found = self._served.lookup(name)
        record: MetadataRecord | None
        if found is None or isinstance(found, MetadataRecord):
            record = found
        else:  # not in memory: a versioned file outside the current publication
            record = await anyio.to_thread.run_sync(self._served.load, name)
        if record is None:
            await _send_json_error(send, 404, f"{name} not found")
            return
        mutable = record.filename != name  # served under timestamp.json or root.json
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(record.data)).encode()),
            (b"cache-control", (NO_CACHE if mutable else IMMUTABLE_CACHE).encode()),
            (b"etag", f'"{record.sha256}"'.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else record.data
        await send({"type": "http.response.body", "body": body})

    async def _target(self, name: str, scope: Any, receive: Any, send: Any) -> None:
        path = self._blobs.local_path(name) if parse_blob_name(name) else None
        try:
            st = os.stat(path) if path is not None else None
        except FileNotFoundError:
            st = None
        if path is None or st is None:
            await _send_json_error(send, 404, f"{name} not found")
            return
        response = _BlobResponse(
            path,
            media_type="application/octet-stream",
            headers={"Cache-Control": IMMUTABLE_CACHE},
            stat_result=st,
        )
        await response(scope, receive, send)
