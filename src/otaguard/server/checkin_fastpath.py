"""The check-in routes' lean path: ``POST /api/v1/device/nonce`` and ``.../checkin`` in
front of FastAPI's middleware, routing and validation.

A device check-in is two small requests, and on the production topology's workers the
framework around them cost more CPU than the check-in itself (ADR 0019: Starlette's
request/response wrappers, the middleware stack, routing through every route of the
application, dependency injection and response-model validation). :class:`CheckinFastPath`
is a plain ASGI middleware that answers those two routes itself, with **the same
functions the FastAPI routes call** (:func:`~otaguard.server.checkin.issue_nonce`,
:func:`~otaguard.server.checkin.run_checkin`), so no check differs between the two paths:

1. the certificate's own checks (:meth:`DeviceGate.certificate`: signature against the
   device CA, identity, validity period; no I/O) before anything else;
2. for a check-in, the body read with the same cap (:data:`MAX_ENVELOPE_BYTES`, 413
   beyond it, declared or streamed); the manifest is parsed by the pure manifest code
   (:func:`~otaguard.server.checkin_verify.verify_manifest`), which bounds its input;
3. the blocking part in one thread of its own pool (:data:`CHECKIN_THREADS`): the
   registry check (every request, never cached), the nonce, or the manifest's
   verification, the nonce claim, the boot check, the record and the director's answer;
4. the answer as the routes' models serialise it (``model_dump_json``), refusals as
   ``{"error": ...}`` with the status the application gives the same error
   (:func:`~otaguard.server._api.status_for`).

The FastAPI routes stay: they describe the API in the OpenAPI schema and answer when
this middleware is not in front (a test's in-process application without it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from pydantic import BaseModel

from otaguard.crypto.envelope import MAX_ENVELOPE_BYTES
from otaguard.model.errors import AccessDeniedError, NotReadyError, OtaguardError
from otaguard.server._api import status_for
from otaguard.server.checkin import CheckinServices, issue_nonce, run_checkin
from otaguard.server.device_auth import DeviceGate
from otaguard.server.storage.database import POOL_SIZE

__all__ = ["CHECKIN_PATH", "CHECKIN_THREADS", "NONCE_PATH", "CheckinFastPath"]

logger = logging.getLogger(__name__)

NONCE_PATH: Final = "/api/v1/device/nonce"
CHECKIN_PATH: Final = "/api/v1/device/checkin"
#: threads running check-ins' blocking parts, per process: the database pool's kept
#: connections (storage/database.py POOL_SIZE), so none waits for a connection, and few
#: enough that they do not fight over the GIL. A pool of its own: handing a call to it
#: costs about a third of what anyio's thread pool costs (a C queue, no Condition), which
#: counts twice per check-in (ADR 0019).
CHECKIN_THREADS: Final = POOL_SIZE
# A 503 (storage failed or not ready) tells the device when to come back, as the routes do.
_RETRY_AFTER_SECONDS: Final = 2


class _TooLargeError(Exception):
    """The request body passed :data:`MAX_ENVELOPE_BYTES` (a 413, not a domain error)."""


def _declared_length(scope: Any) -> int | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == b"content-length":
            text = bytes(value).decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _read_body(scope: Any, receive: Any) -> bytes:
    """The request body, at most :data:`MAX_ENVELOPE_BYTES` (declared or streamed)."""
    declared = _declared_length(scope)
    if declared is not None and declared > MAX_ENVELOPE_BYTES:
        raise _TooLargeError
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body.extend(message.get("body", b""))
        if len(body) > MAX_ENVELOPE_BYTES:
            raise _TooLargeError
        if not message.get("more_body", False):
            break
    return bytes(body)


async def _send(send: Any, status: int, body: bytes, *, retry: bool = False) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if retry:
        headers.append((b"retry-after", str(_RETRY_AFTER_SECONDS).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_body(message: str) -> bytes:
    # The application's error shape: one line under "error" (json escapes what it must).
    return json.dumps({"error": " ".join(message.split())}).encode()


class CheckinFastPath:
    """ASGI middleware answering the two check-in routes itself (module docstring)."""

    def __init__(self, app: Any, *, checkins: CheckinServices, gate: DeviceGate):
        """Answer the nonce and check-in routes with ``checkins`` and ``gate``; the rest
        goes to ``app``."""
        self._app = app
        self._svc = checkins
        self._gate = gate
        self._pool = ThreadPoolExecutor(max_workers=CHECKIN_THREADS, thread_name_prefix="checkin")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http" or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        if path not in (NONCE_PATH, CHECKIN_PATH):
            await self._app(scope, receive, send)
            return
        try:
            answer = await self._answer(path, scope, receive)
        except _TooLargeError:
            await _send(send, 413, _error_body(f"the manifest exceeds {MAX_ENVELOPE_BYTES} bytes"))
            return
        except OtaguardError as e:
            status = status_for(e)
            log = logger.warning if status < 500 else logger.error
            log("request refused (%d): %s [%s]", status, e.diagnostics(), path)
            retry = isinstance(e, NotReadyError)
            await _send(send, status, _error_body(e.diagnostics()), retry=retry)
            return
        await _send(send, 200, answer.model_dump_json().encode())

    async def _answer(self, path: str, scope: Any, receive: Any) -> BaseModel:
        # The certificate's own checks first (no I/O), as the routes do.
        presented = self._gate.certificate(scope)
        if presented is None:
            raise AccessDeniedError("a check-in needs the device's client certificate")
        call: Callable[[], BaseModel]
        if path == NONCE_PATH:

            def call() -> BaseModel:
                return issue_nonce(self._svc, self._gate, presented, scope)

        else:
            data = await _read_body(scope, receive)

            def call() -> BaseModel:
                return run_checkin(self._svc, self._gate, presented, scope, data)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)
