"""The update server as an ASGI application (FastAPI), built by :func:`create_app`.

URL layout::

    GET  /healthz                     liveness
    GET  /metadata/{filename}         exact signed bytes from memory (HEAD too);
                                      timestamp.json via the pointer, root.json = newest
                                      root, N.<role>.json immutable
    GET  /targets/{sha256}.{path}     target blob, HTTP Range supported (HEAD too)

(these two are answered by :mod:`.fastpath` in front of the middleware stack, with the
same authorization; the routes below describe them in the OpenAPI schema)
    PUT  /api/v1/blobs/{filename}     operator: upload a blob (streamed, hash verified)
    POST /api/v1/publish              operator: publish metadata in one transaction
    /api/v1/device/...                device: whoami, check-in (:mod:`.checkin`)
    /api/v1/devices...                operator: the device registry (:mod:`.fleet`) and
                                      inventory (:mod:`.inventory`)
    /api/v1/groups...                 operator: device groups (:mod:`.inventory`)
    /api/v1/operators, /api/v1/audit  admin: operator tokens; viewer: the audit log
                                      (:mod:`.audit`)
    /.well-known/est/...              device enrollment, EST (:mod:`.fleet`)
    /dashboard/                       the operator's web page over this API
                                      (:mod:`.dashboard`; its data calls need a token)

Mirrors and CDNs in front of ``/metadata`` and ``/targets`` are untrusted by design; the
device verifies everything. The operator API needs an operator token with the role each
route names (:mod:`.auth`): the bootstrap admin's in ``DATA/operator-token``, or a named
one; every state-changing operator request is written to the audit log.

The server signs snapshot and timestamp with its online key (:mod:`.online`) when the
repository's root names that key, and re-signs them before they expire; it never holds a
root or targets key, and refuses to follow a repository directory holding private keys.
"""

import base64
import binascii
import datetime as dt
import logging
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from otaguard import __version__
from otaguard.crypto.device_ca import DEVICE_CA_DIR, DeviceCA
from otaguard.crypto.manufacturer import load_manufacturer_cas
from otaguard.model.errors import (
    AccessDeniedError,
    NotReadyError,
    OperatorError,
    OtaguardError,
    ServerStorageError,
)
from otaguard.server._api import ErrorBody, StrictRequest, status_for
from otaguard.server._names import (
    BLOB_NAME_PATTERN,
    MAX_BLOB_NAME,
    MAX_METADATA_NAME,
    METADATA_NAME_PATTERN,
    parse_blob_name,
)
from otaguard.server._openapi import install_schema
from otaguard.server._repo_dir import refuse_private_keys
from otaguard.server._signal import ChangeSignal
from otaguard.server.audit import (
    AuditMiddleware,
    annotate_roles,
    audit_router,
    operators_router,
    role_route,
    whoami_router,
)
from otaguard.server.auth import (
    AUDIT_SCOPE_KEY,
    AuditContext,
    OperatorAuth,
    Role,
    load_or_create_operator_token,
)
from otaguard.server.checkin import (
    CHECKIN_WINDOW,
    CheckinServices,
    checkin_router,
    checkins_router,
)
from otaguard.server.checkin_fastpath import CheckinFastPath
from otaguard.server.dashboard import dashboard_router
from otaguard.server.device_auth import DeviceGate
from otaguard.server.director import Director, load_director_roots, load_director_signer
from otaguard.server.director_routes import director_router
from otaguard.server.fastpath import (
    IMMUTABLE_CACHE,
    NO_CACHE,
    DeviceAdmissions,
    RepositoryFastPath,
)
from otaguard.server.fleet import FleetServices, est_router, fleet_router
from otaguard.server.inventory import Inventory, inventory_router
from otaguard.server.monitoring import build_monitoring
from otaguard.server.online import OnlineLifetimes, OnlineSigner, ResignLoop, load_online_signer
from otaguard.server.publish import publish_files
from otaguard.server.rollout_routes import rollout_router
from otaguard.server.rollouts import ChannelPolicy, RolloutEvaluator, Rollouts
from otaguard.server.sbom_index import SbomIndex
from otaguard.server.sbom_routes import sbom_router
from otaguard.server.served import ServedMetadata
from otaguard.server.settings import ServerSettings
from otaguard.server.static_tree import StaticTreeExporter
from otaguard.server.storage.base import (
    MAX_BLOB_BYTES,
    BlobStore,
    MetadataRecord,
    MetadataStore,
)
from otaguard.server.storage.checkins import SQLCheckinStore
from otaguard.server.storage.database import sqlite_url
from otaguard.server.storage.files import FileBlobStore
from otaguard.server.storage.inventory import SQLInventoryStore
from otaguard.server.storage.migrate import open_database
from otaguard.server.storage.notify import (
    NotifyingAssignmentStore,
    NotifyingDeviceStore,
    NotifyingMetadataStore,
    NotifyingRolloutStore,
)
from otaguard.server.storage.operators import SQLAuditStore, SQLOperatorStore
from otaguard.server.storage.sboms import SQLSbomStore
from otaguard.server.storage.unit import unit_of_work
from otaguard.server.storage.vulns import SQLVulnStore
from otaguard.server.sync import RepoSync
from otaguard.server.vuln_routes import vuln_router
from otaguard.server.vulns import VulnService

__all__ = ["DATA_DIR_MODE", "MAX_PUBLISH_REQUEST_BYTES", "create_app", "prepare_data_dir"]

logger = logging.getLogger(__name__)

# A publication is the root history plus three roles, base64-encoded; bounds memory use.
MAX_PUBLISH_REQUEST_BYTES: Final = 64 * 1024 * 1024
# A 503 for "not ready yet" tells clients when to come back: a repository caught
# mid-write or a server starting up is ready again within a sync interval or two.
RETRY_AFTER_SECONDS: Final = 2
# The data directory holds the database, blobs, the CA key and the operator token:
# owner only, so no other local user can read a secret or swap a blob.
DATA_DIR_MODE: Final = 0o700

TAGS: Final = [
    {"name": "health", "description": "Liveness of the server."},
    {
        "name": "repository",
        "description": "The image repository as TUF clients fetch it: exact signed metadata "
        "and target blobs. Every byte is verified by the device; the server serves only "
        "enrolled devices (verified client certificate, checked against the registry on "
        "every request) and the operator (bearer token).",
    },
    {
        "name": "operator",
        "description": "Release operations (upload blobs, publish metadata): role release-manager.",
    },
    {
        "name": "fleet",
        "description": "The device registry and inventory: register devices (enrollment "
        "tokens), quarantine, release, revoke, tag (role operator); list and show devices "
        "with tags, groups, last check-in, running version (role viewer).",
    },
    {
        "name": "groups",
        "description": "Device groups: the built-in 'all', static lists of serials and "
        "dynamic tag filters (reads: viewer; changes: operator).",
    },
    {
        "name": "rollouts",
        "description": "Staged rollouts (phases, thresholds, automatic halt), channel "
        "settings of groups and devices, releases for unknown hardware (ADR 0011).",
    },
    {
        "name": "sboms",
        "description": "The SBOM index: releases containing a component (purl or name) and "
        "the devices running them (role viewer; ADR 0015).",
    },
    {
        "name": "vulns",
        "description": "Vulnerability response: OSV or CycloneDX VEX advisories imported "
        "(role operator, audited), matched against the SBOM index by purl and version "
        "range: affected releases and devices, fixing releases, time-to-patch (ADR 0034).",
    },
    {
        "name": "operators",
        "description": "Operator tokens with roles viewer < operator < release-manager < "
        "admin (role admin). A token is shown once and stored as its SHA-256.",
    },
    {
        "name": "dashboard",
        "description": "The operator's web page (static HTML and JavaScript, no token "
        "needed to load it): it calls this API with the operator token pasted into its "
        "login form; a viewer token is enough to look (docs/dashboard.md).",
    },
    {
        "name": "audit",
        "description": "The append-only, hash-chained audit log of every state-changing "
        "operator request (role viewer).",
    },
    {
        "name": "device",
        "description": "A device asking about itself and checking in (verified client "
        "certificate): a fresh nonce, then a manifest signed by the device key; metadata and "
        "images are served to a certificate only within 15 minutes of its last check-in.",
    },
    {
        "name": "enrollment",
        "description": "EST (RFC 7030): devices get their certificate with a single-use "
        "enrollment token.",
    },
]


class HealthBody(BaseModel):
    """The health check response."""

    status: str = "ok"


class BlobBody(BaseModel):
    """A stored blob."""

    filename: str
    length: int
    sha256: str


class PublishRequest(StrictRequest):
    """Signed metadata files to publish together."""

    metadata: dict[str, str] = Field(
        description="file name (e.g. 3.snapshot.json, timestamp.json) to base64 of the "
        "exact signed bytes"
    )


class PublishBody(BaseModel):
    """What a publication changed."""

    added: list[str]
    unchanged: list[str]
    timestamp: str | None = Field(description="stored name of the newly served timestamp")


@dataclass(frozen=True)
class _Services:
    store: MetadataStore
    served: ServedMetadata
    blobs: BlobStore
    clock: Callable[[], dt.datetime]
    online: OnlineSigner
    #: indexed after each publication through the API (ADR 0015)
    sboms: SbomIndex


_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorBody, "description": "Unknown file, or a name no file can have"}
}
_AUTH_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": ErrorBody, "description": "Operator token missing or wrong"},
    400: {"model": ErrorBody, "description": "Malformed request"},
    409: {"model": ErrorBody, "description": "A concurrent publication won; retry"},
    422: {"model": ErrorBody, "description": "Refused by verification"},
    503: {"model": ErrorBody, "description": "Storage failed or not ready (Retry-After)"},
}


# The path parameters state the names the server can answer (otaguard.server._names):
# any other name is refused before it reaches a store.
_TARGET_PARAM: Final = PathParam(
    description="<sha256 hex>.<target path>",
    pattern=BLOB_NAME_PATTERN,
    max_length=MAX_BLOB_NAME,
)
_METADATA_PARAM: Final = PathParam(
    description="timestamp.json, root.json, <role>.json or <version>.<role>.json",
    pattern=METADATA_NAME_PATTERN,
    max_length=MAX_METADATA_NAME,
    examples=["timestamp.json", "root.json", "1.root.json"],
)


_status_for = status_for


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def otaguard_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OtaguardError)  # noqa: S101 - registered for this type only
        status = _status_for(exc)
        log = logger.warning if status < 500 else logger.error
        # The request id (also in X-Request-ID and the audit log) ties the three together.
        ctx = request.scope.get(AUDIT_SCOPE_KEY)
        rid = ctx.request_id if isinstance(ctx, AuditContext) else "-"
        log("request refused (%d): %s [request %s]", status, exc.diagnostics(), rid)
        headers = (
            {"Retry-After": str(RETRY_AFTER_SECONDS)} if isinstance(exc, NotReadyError) else None
        )
        return _error(status, exc.diagnostics(), headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route of the path; RFC 9110 wants them all.
            headers["Allow"] = _allowed_methods(request)
        return _error(exc.status_code, str(exc.detail), headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        if first.get("type") == "string_pattern_mismatch":
            # the pattern itself is in /openapi.json; a regex is no message for a person
            shown = str(first.get("input", ""))[:80]
            return _error(422, f"invalid request: {where}: {shown!r} is not of the form the "
                          "API schema gives for it (see /openapi.json)")  # fmt: skip
        return _error(422, f"invalid request: {where}: {first.get('msg', 'invalid')}")

    app.add_exception_handler(OtaguardError, otaguard_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def _allowed_methods(request: Request) -> str:
    """Every method some route answers on this request's path (the ``Allow`` of a 405)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _not_found(what: str) -> HTTPException:
    return HTTPException(404, f"{what} not found", headers={"Cache-Control": NO_CACHE})


def _metadata_response(record: MetadataRecord, *, mutable: bool) -> Response:
    return Response(
        content=record.data,
        media_type="application/json",
        headers={
            "Cache-Control": NO_CACHE if mutable else IMMUTABLE_CACHE,
            "ETag": f'"{record.sha256}"',
        },
    )


class WhoAmIBody(BaseModel):
    """The device the server sees, from the verified client certificate."""

    serial: str
    hardware_id: str
    status: str
    certificate_serial: str = Field(description="serial number (hex) of the certificate")
    certificate_expires: dt.datetime


_DEVICE_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    403: {"model": ErrorBody, "description": "No valid device certificate (reason given)"}
}


def _device_dependency(
    gate: DeviceGate, auth: OperatorAuth, checkins: CheckinServices
) -> Callable[..., None]:
    """Devices by their verified certificate, checked in within the window (zero trust:
    every update check is re-authenticated by a signed check-in); an operator token of
    any role may read too."""

    def require_device(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and auth.identify(presented.strip()) is not None:
            return
        dev = gate.authenticate(request.scope)
        if dev is not None:
            checkins.require_recent(dev, window=CHECKIN_WINDOW)

    return require_device


def _device_router(gate: DeviceGate, require_device: Callable[..., None]) -> APIRouter:
    router = APIRouter(prefix="/api/v1/device", tags=["device"], responses=_DEVICE_ERRORS)

    @router.get(
        "/may-read",
        summary="Whether this client may read the repository (nginx auth_request)",
        status_code=204,
        response_class=Response,
        dependencies=[Depends(require_device)],
    )
    def may_read() -> Response:
        """204 for a device the repository routes would serve (or an operator), 403 with
        the reason otherwise: nginx asks this before serving the static tree."""
        return Response(status_code=204)

    @router.get("/whoami", summary="The device identity the server sees")
    def whoami(request: Request) -> WhoAmIBody:
        """Serial and status taken from the verified client certificate and the registry."""
        dev = gate.authenticate(request.scope)
        if dev is None:
            raise AccessDeniedError("no client certificate was presented")
        return WhoAmIBody(
            serial=dev.record.serial,
            hardware_id=dev.record.hardware_id,
            status=dev.record.status.value,
            certificate_serial=dev.identity.cert_serial,
            certificate_expires=dev.certificate.not_valid_after_utc,
        )

    return router


def _repository_router(svc: _Services, require_device: Callable[..., None]) -> APIRouter:
    router = APIRouter(
        tags=["repository"], dependencies=[Depends(require_device)], responses=_DEVICE_ERRORS
    )

    @router.get(
        "/metadata/{filename}",
        summary="Signed metadata file (exact bytes)",
        response_class=Response,
        responses={200: {"content": {"application/json": {}}}, **_ERRORS},
    )
    def get_metadata(filename: Annotated[str, _METADATA_PARAM]) -> Response:
        """Serve a metadata file byte for byte as it was signed, from memory.

        ``timestamp.json`` is the currently published timestamp and ``root.json`` the
        newest root; ``<version>.<role>.json`` never changes once published. Unknown
        names are 404, which is how a TUF client learns there is no newer root.
        """
        return _metadata_file(filename)

    @router.head(
        "/metadata/{filename}",
        summary="Signed metadata file: length and ETag (its sha256)",
        response_class=Response,
        responses={200: {"content": {"application/json": {}}}, **_ERRORS},
    )
    def head_metadata(filename: Annotated[str, _METADATA_PARAM]) -> Response:
        """Like GET without the body."""
        return _metadata_file(filename)

    def _metadata_file(filename: str) -> Response:
        if svc.served.stale():
            svc.served.refresh()
        found = svc.served.lookup(filename)
        record: MetadataRecord | None
        if found is None or isinstance(found, MetadataRecord):
            record = found
        else:
            record = svc.served.load(filename)
        if record is None:
            raise _not_found(filename)
        return _metadata_response(record, mutable=record.filename != filename)

    def _blob_response(filename: str) -> FileResponse:
        path = svc.blobs.local_path(filename) if parse_blob_name(filename) else None
        if path is None:
            raise _not_found(filename)
        # FileResponse answers Range requests (206 + Content-Range) and HEAD itself.
        return FileResponse(
            path,
            media_type="application/octet-stream",
            headers={"Cache-Control": IMMUTABLE_CACHE},
        )

    blob_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/octet-stream": {}}, "description": "The whole blob"},
        206: {"content": {"application/octet-stream": {}}, "description": "A byte range"},
        # Starlette's own answers to a bad Range header: plain text, not the error body
        400: {"content": {"text/plain": {}}, "description": "Malformed Range header"},
        416: {"content": {"text/plain": {}}, "description": "Range not satisfiable"},
        **_ERRORS,
    }

    @router.get(
        "/targets/{filename}",
        summary="Target blob (Range supported)",
        response_class=FileResponse,
        responses=blob_responses,
    )
    def get_target(filename: Annotated[str, _TARGET_PARAM]) -> FileResponse:
        """Serve a target blob by its consistent-snapshot name; supports ``Range``."""
        return _blob_response(filename)

    @router.head(
        "/targets/{filename}",
        summary="Target blob length and presence",
        response_class=FileResponse,
        responses=blob_responses,
    )
    def head_target(filename: Annotated[str, _TARGET_PARAM]) -> FileResponse:
        """Like GET without the body: tells uploaders whether a blob is already stored."""
        return _blob_response(filename)

    return router


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"request body exceeds {limit} bytes")
    return bytes(body)


def _decode_publication(body: bytes) -> dict[str, bytes]:
    try:
        req = PublishRequest.model_validate_json(body)
    except ValidationError as e:
        raise OperatorError('publish body must be {"metadata": {filename: base64}}') from e
    files: dict[str, bytes] = {}
    for name, encoded in req.metadata.items():
        try:
            files[name] = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise OperatorError(f"{name} is not valid base64") from e
    return files


def _operator_router(svc: _Services, auth: OperatorAuth) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["operator"])

    _upload_route = role_route(auth, Role.RELEASE_MANAGER, "release.upload-blob")
    _publish_route = role_route(auth, Role.RELEASE_MANAGER, "release.publish")

    @router.put(
        "/blobs/{filename}",
        summary="Upload a target blob",
        dependencies=_upload_route["dependencies"],
        responses={
            **_AUTH_ERRORS,
            **_upload_route["responses"],
            413: {"model": ErrorBody, "description": "Blob larger than the size cap"},
        },
        openapi_extra={
            **_upload_route["openapi_extra"],
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
        },
    )
    async def put_blob(
        filename: Annotated[str, _TARGET_PARAM],
        request: Request,
    ) -> BlobBody:
        """Store a blob, streamed to disk and verified against the sha256 in its name.

        Idempotent: uploading the same blob again replaces it with identical bytes.
        """
        if parse_blob_name(filename) is None:
            raise OperatorError(f"{filename!r} is not a blob name (<sha256 hex>.<target path>)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BLOB_BYTES:
            raise HTTPException(413, f"blob exceeds {MAX_BLOB_BYTES} bytes")
        writer = await run_in_threadpool(svc.blobs.writer, filename, max_length=MAX_BLOB_BYTES)
        with writer:
            async for chunk in request.stream():
                writer.write(chunk)
            info = await run_in_threadpool(writer.commit)
        return BlobBody(filename=info.filename, length=info.length, sha256=info.sha256)

    @router.post(
        "/publish",
        summary="Publish signed metadata atomically",
        dependencies=_publish_route["dependencies"],
        responses={
            **_AUTH_ERRORS,
            **_publish_route["responses"],
            413: {"model": ErrorBody, "description": "Body too large"},
        },
        openapi_extra={
            **_publish_route["openapi_extra"],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PublishRequest.model_json_schema()}},
            },
        },
    )
    async def publish(request: Request) -> PublishBody:
        """Verify metadata files and serve them in one transaction.

        Every target must already be uploaded; the set must verify against the newest
        served root; the timestamp pointer moves only when everything is stored. A set
        without a timestamp (new root or targets of a server-mode repository) gets the
        snapshot and timestamp this server signs.
        """
        files = _decode_publication(await _read_capped(request, MAX_PUBLISH_REQUEST_BYTES))
        outcome = await run_in_threadpool(
            publish_files, svc.store, svc.blobs, files, now=svc.clock(), online=svc.online
        )
        if outcome.added:
            await run_in_threadpool(svc.sboms.refresh_quietly)
        return PublishBody(
            added=list(outcome.added),
            unchanged=list(outcome.unchanged),
            timestamp=outcome.timestamp_filename,
        )

    return router


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def prepare_data_dir(data_dir: Path) -> None:
    """Create the server's data directory with mode 0700, or tighten an existing one.

    An existing directory that group or others may access is set to 0700 with a warning
    (it holds the operator token, the CA key and the database).

    Raises:
        ServerStorageError: the directory cannot be created or its mode not changed.
    """
    try:
        existed = data_dir.exists()
        data_dir.mkdir(parents=True, exist_ok=True, mode=DATA_DIR_MODE)
        mode = stat.S_IMODE(data_dir.stat().st_mode)
        if mode & ~DATA_DIR_MODE:
            if existed:
                logger.warning(
                    "data directory %s had mode %04o; tightening it to %04o",
                    data_dir,
                    mode,
                    DATA_DIR_MODE,
                )
            data_dir.chmod(DATA_DIR_MODE)
    except OSError as e:
        raise ServerStorageError(f"cannot prepare data directory {data_dir}: {e.strerror}") from e


def create_app(  # noqa: PLR0915 - the app factory wires every store and router
    settings: ServerSettings, *, clock: Callable[[], dt.datetime] = _utcnow
) -> FastAPI:
    """Build the server application: stores, online key, token, repository sync, routes.

    Nothing happens at import time; the database engine lives in the returned app and
    is disposed of when the app shuts down.

    Args:
        settings: server configuration.
        clock: reference time for verification (tests pass a fixed clock).

    Returns:
        The ASGI application. Its lifespan starts and stops the re-signing of online
        metadata and the repository sync.

    Raises:
        ConfigError: the repository directory holds a private key, or the bootstrap
            operator token or online key file is unusable.
        ServerStorageError: the database or blob directory cannot be opened.
    """
    data_dir = settings.data_dir
    prepare_data_dir(data_dir)
    if settings.repo_dir is not None:
        refuse_private_keys(settings.repo_dir)
    token = load_or_create_operator_token(data_dir)
    online = OnlineSigner(
        load_online_signer(data_dir, uri=settings.online_key_uri, pin=settings.hsm_pin),
        lifetimes=OnlineLifetimes(
            timestamp=settings.timestamp_expiry, snapshot=settings.snapshot_expiry
        ),
    )
    # The embedded SQLite file is this process's own: it is migrated here. A shared
    # database (--database-url) is migrated by the operator; a stale one is refused.
    engine = open_database(
        settings.database_url or sqlite_url(data_dir / "otaguard.db"),
        upgrade=settings.database_url is None,
    )
    # Publications and registry changes, announced to every process sharing DATA: the
    # fast path's caches (metadata, admitted devices) are rebuilt on the next request.
    published = ChangeSignal(data_dir, "published")
    registry = ChangeSignal(data_dir, "registry")
    rollout_signal = ChangeSignal(data_dir, "rollouts")
    assignment_signal = ChangeSignal(data_dir, "assignments")
    for signal in (published, registry, rollout_signal, assignment_signal):
        signal.ensure()  # the caches kept "until the next announcement" need the file
    store = NotifyingMetadataStore(engine, on_change=published.touch, changes=published.token)
    served = ServedMetadata(store, signal=published)
    served_recheck = served.rechecker()
    devices = NotifyingDeviceStore(engine, on_change=registry.touch)
    checkin_store = SQLCheckinStore(engine)
    director: Director | None = None
    if settings.director_dir is not None:
        refuse_private_keys(settings.director_dir)
        director_signer = load_director_signer(
            data_dir, uri=settings.director_key_uri, pin=settings.hsm_pin
        )
        roots = load_director_roots(settings.director_dir, keyid=director_signer.public_key.keyid)
        director = Director(
            signer=director_signer,
            roots=roots,
            director_dir=settings.director_dir,
            assignments=NotifyingAssignmentStore(
                engine, on_change=assignment_signal.touch, changes=assignment_signal.token
            ),
            metadata=store,
            clock=clock,
            unit=partial(unit_of_work, engine),
        )
    operator_store = SQLOperatorStore(engine)
    audit_store = SQLAuditStore(engine)
    inventory = Inventory(devices=devices, checkins=checkin_store, store=SQLInventoryStore(engine))
    rollouts: Rollouts | None = None
    evaluator: RolloutEvaluator | None = None
    if director is not None:
        rollouts = Rollouts(
            store=NotifyingRolloutStore(
                engine, on_change=rollout_signal.touch, changes=rollout_signal.token
            ),
            inventory=inventory,
            releases=director.releases,
            clock=clock,
        )
        director.policy = ChannelPolicy(rollouts=rollouts)
        evaluator = RolloutEvaluator(rollouts, interval=settings.rollout_interval)
    auth = OperatorAuth(bootstrap_token=token, operators=operator_store)
    checkins = CheckinServices(
        checkins=checkin_store,
        devices=devices,
        metadata=store,
        clock=clock,
        director=director,
        unit=partial(unit_of_work, engine),
        # one unit for a check-in and its answer where locks are per row (ADR 0019)
        answer_in_unit=engine.dialect.name == "postgresql",
    )
    fleet = FleetServices(
        devices=devices,
        ca=DeviceCA.load_or_create(data_dir / DEVICE_CA_DIR),
        clock=clock,
        cert_lifetime=settings.device_cert_lifetime,
        token_lifetime=settings.enrollment_token_lifetime,
        manufacturer_cas=tuple(load_manufacturer_cas(settings.manufacturer_ca))
        if settings.manufacturer_ca is not None
        else (),
    )
    blobs = FileBlobStore(data_dir / "blobs")
    blobs.remove_interrupted_uploads()
    exporter = (
        StaticTreeExporter(served, blobs, settings.static_tree)
        if settings.static_tree is not None
        else None
    )
    sboms = SbomIndex(store=SQLSbomStore(engine), metadata=store, blobs=blobs, clock=clock)
    vulns = VulnService(store=SQLVulnStore(engine), sboms=sboms, clock=clock)
    svc = _Services(
        store=store, served=served, blobs=blobs, clock=clock, online=online, sboms=sboms
    )
    resign = ResignLoop(online, store=store, blobs=blobs, clock=clock)
    sync = (
        RepoSync(
            settings.repo_dir,
            store=store,
            blobs=blobs,
            interval=settings.sync_interval,
            clock=clock,
            online=online,
            on_published=sboms.refresh_quietly,
        )
        if settings.repo_dir is not None
        else None
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Fresh online metadata first: after downtime the served timestamp may have expired.
        await run_in_threadpool(resign.start)
        await run_in_threadpool(monitoring.start)
        await run_in_threadpool(served_recheck.start)
        if exporter is not None:
            await run_in_threadpool(exporter.start)
        if sync is not None:
            await run_in_threadpool(sync.start)
        if evaluator is not None:
            await run_in_threadpool(evaluator.start)
        try:
            yield
        finally:
            if evaluator is not None:
                await run_in_threadpool(evaluator.stop)
            if sync is not None:
                await run_in_threadpool(sync.stop)
            if exporter is not None:
                await run_in_threadpool(exporter.stop)
            await run_in_threadpool(served_recheck.stop)
            await run_in_threadpool(monitoring.stop)
            await run_in_threadpool(resign.stop)
            engine.dispose()

    app = FastAPI(
        title="otaguard update server",
        version=__version__,
        description="Serves a TUF image repository to devices and takes releases from "
        "operators. Devices verify every byte; this server is not trusted by them.",
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.blobs = blobs
    app.state.sync = sync
    app.state.online = online
    app.state.resign = resign
    app.state.devices = devices
    app.state.checkins = checkin_store
    app.state.director = director
    app.state.device_ca = fleet.ca
    app.state.operators = operator_store
    app.state.audit = audit_store
    app.state.inventory = inventory
    app.state.rollouts = rollouts
    app.state.sboms = sboms
    app.state.vulns = vulns
    _install_error_handlers(app)
    app.add_middleware(AuditMiddleware, audit=audit_store, clock=clock)

    @app.get("/healthz", tags=["health"], summary="Liveness check")
    def healthz() -> HealthBody:
        """Return ``{"status": "ok"}`` while the server runs."""
        return HealthBody()

    gate = DeviceGate(
        devices,
        issuing_ca=fleet.ca.issuing,
        clock=clock,
        required=not (settings.insecure_http or settings.insecure_no_client_auth),
    )
    app.state.gate = gate
    monitoring = build_monitoring(
        settings,
        engine=engine,
        devices=devices,
        metadata=store,
        checkins=checkins,
        director=director,
        rollouts=rollouts,
        device_ca=fleet.ca,
        gate=gate,
        auth=auth,
        clock=clock,
    )
    app.state.monitoring = monitoring
    require_device = _device_dependency(gate, auth, checkins)
    app.include_router(_repository_router(svc, require_device))
    # Outermost of the middlewares (added last): the repository routes skip the rest. The
    # runner puts the same fast path in front of the whole application as well (the
    # options below), so a repository request skips Starlette's own layers too.
    app.state.fast_path_options = {
        "served": served,
        "blobs": blobs,
        "admissions": DeviceAdmissions(gate=gate, checkins=checkins, signal=registry, clock=clock),
        "auth": auth,
    }
    app.add_middleware(RepositoryFastPath, **app.state.fast_path_options)
    # The check-in's lean path (ADR 0019), outermost: the same functions as its routes
    # (which stay, for the OpenAPI schema), without the framework around them.
    app.state.checkin_fast_path_options = {"checkins": checkins, "gate": gate}
    app.add_middleware(CheckinFastPath, **app.state.checkin_fast_path_options)
    app.state.served = served
    app.state.static_tree = exporter
    app.include_router(_device_router(gate, require_device))
    app.include_router(checkin_router(checkins, gate))
    app.include_router(_operator_router(svc, auth))
    app.include_router(fleet_router(fleet, auth))
    devices_routes, groups_routes = inventory_router(inventory, auth, clock)
    app.include_router(devices_routes)
    app.include_router(groups_routes)
    app.include_router(annotate_roles(checkins_router(checkins, auth.require(Role.VIEWER))))
    app.include_router(director_router(director, gate=gate, devices=devices, auth=auth))
    app.include_router(rollout_router(rollouts, auth))
    app.include_router(sbom_router(sboms, auth))
    app.include_router(vuln_router(vulns, auth))
    app.include_router(operators_router(auth, operator_store, clock))
    app.include_router(whoami_router(auth))
    app.include_router(audit_router(auth, audit_store))
    app.include_router(est_router(fleet, gate, before_renewal=checkins.before_renewal))
    app.include_router(monitoring.router)
    app.include_router(dashboard_router())
    install_schema(app)
    return app
