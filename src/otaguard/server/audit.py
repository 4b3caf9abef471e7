"""The audit log's write path (ASGI middleware) and the operator-account and audit routes.

URL layout::

    GET  /api/v1/audit                      viewer: entries (after a seq, since a time)
    GET  /api/v1/operators                  admin: operator tokens (names, roles)
    POST /api/v1/operators                  admin: a new named token, shown once
    POST /api/v1/operators/{name}/revoke    admin: refuse that token from now on
    GET  /api/v1/operator/whoami            viewer: the presented token's name and role

Every request gets an id (a well-formed ``X-Request-ID`` it brings, or a fresh one),
returned in ``X-Request-ID`` and put in the server's log line when the request is refused
with an otaguard error. A route declared with
``OperatorAuth.require(role, action=...)`` fills the request's audit intent (who, what,
which target); after the response, :class:`AuditMiddleware` appends it to the audit log
with the result (``ok``, or the status and the error's one line), so refused attempts are
recorded as well as successful ones. Nothing of the request's credentials is recorded:
the actor is the token's name.
"""

import datetime as dt
import json
import logging
import re
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otaguard.model.errors import OperatorError, OtaguardError
from otaguard.server._api import RFC3339_PATTERN, ErrorBody, StrictRequest
from otaguard.server.audit_chain import AuditEntry
from otaguard.server.auth import (
    AUDIT_SCOPE_KEY,
    OPERATOR_NAME_PATTERN,
    RESERVED_OPERATOR_NAMES,
    ROLE_ATTRIBUTE,
    AuditContext,
    Operator,
    OperatorAuth,
    Role,
    check_operator_name,
    hash_operator_token,
    new_operator_token,
    note_audit,
)
from otaguard.server.storage.fleet_base import (
    AuditStore,
    NameExistsError,
    NewAuditEntry,
    OperatorStore,
)

__all__ = [
    "MAX_AUDIT_PAGE",
    "AuditEntryBody",
    "AuditMiddleware",
    "NewOperatorBody",
    "OperatorBody",
    "WhoAmIOperatorBody",
    "annotate_roles",
    "audit_router",
    "operators_router",
    "role_route",
    "whoami_router",
]

logger = logging.getLogger(__name__)

#: entries per page of ``GET /api/v1/audit``: a page stays well under a megabyte
MAX_AUDIT_PAGE: Final = 1000
# A client's own request id is taken only if short and plain (it is logged and stored).
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{8,64}")
# Error bodies are one-line JSON; only that much is read to record the reason.
_ERROR_BODY_BYTES: Final = 2048


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = str(bytes(value), "latin-1")
            if _REQUEST_ID_RE.fullmatch(text):
                return text
    return uuid.uuid4().hex


def _result(status: int, body: bytes) -> str:
    if status < 400:
        return "ok"
    try:
        reason = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        reason = ""
    word = "refused" if status < 500 else "failed"
    return f"{word} {status}" + (f": {' '.join(str(reason).split())}" if reason else "")


class AuditMiddleware:
    """Pure ASGI middleware: request ids, and the audit entry of audited routes."""

    def __init__(self, app: ASGIApp, *, audit: AuditStore, clock: Callable[[], dt.datetime]):
        """Wrap ``app``; entries go to ``audit``, timed by ``clock``."""
        self.app = app
        self._audit = audit
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request; append its audit entry (if the route asked for one) after."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = AuditContext(request_id=_request_id(scope))
        scope[AUDIT_SCOPE_KEY] = ctx
        status = 500
        error_body = bytearray()
        recorded = False

        async def record() -> None:
            nonlocal recorded
            if ctx.intent is not None and not recorded:
                recorded = True
                await run_in_threadpool(self._record, ctx, _result(status, bytes(error_body)))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", ctx.request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                if status >= 400:
                    room = _ERROR_BODY_BYTES - len(error_body)
                    error_body.extend(bytes(message.get("body", b""))[: max(room, 0)])
                if not message.get("more_body", False):
                    # Written before the response completes: an operator who has the answer
                    # finds the entry, and entries keep the order of the actions.
                    await record()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            await record()  # the application failed before completing its response

    def _record(self, ctx: AuditContext, result: str) -> None:
        intent = ctx.intent
        assert intent is not None  # noqa: S101 - checked by the caller
        entry = NewAuditEntry(
            actor=intent.actor,
            role=intent.role,
            action=intent.action,
            target=intent.target,
            result=result,
            request_id=ctx.request_id,
            detail=intent.detail,
        )
        try:
            self._audit.append(entry, now=self._clock())
        except OtaguardError as e:
            # The action has happened; losing its record is an incident to alarm on.
            logger.error(  # noqa: TRY400 - one line, the cause is in it; no traceback
                "AUDIT LOG WRITE FAILED for %s %s %s by %s (request %s): %s",
                intent.action,
                intent.target,
                result,
                intent.actor,
                ctx.request_id,
                e.diagnostics(),
            )


def annotate_roles(router: APIRouter) -> APIRouter:
    """Name the required role (``x-required-role``) in the OpenAPI operation of every
    route of ``router`` that checks one, for routers built elsewhere with a bare
    :meth:`OperatorAuth.require` dependency. Returns ``router``."""

    def role_of(dep: Dependant) -> str | None:
        role = getattr(dep.call, ROLE_ATTRIBUTE, None)
        if isinstance(role, Role):
            return role.value
        return next((r for d in dep.dependencies if (r := role_of(d)) is not None), None)

    for route in router.routes:
        if isinstance(route, APIRoute):
            role = role_of(route.dependant)
            extra = route.openapi_extra or {}
            if role is not None and "x-required-role" not in extra:
                route.openapi_extra = {**extra, "x-required-role": role}
    return router


def role_route(auth: OperatorAuth, role: Role, action: str | None = None) -> dict[str, Any]:
    """Keyword arguments for a route decorator: its role check, audit and OpenAPI notes.

    ``action`` names a state-changing action (it is audited); reads pass none.
    """
    return {
        "dependencies": [Depends(auth.require(role, action=action))],
        "openapi_extra": {"x-required-role": role.value}
        | ({"x-audit-action": action} if action else {}),
        "responses": {
            401: {"model": ErrorBody, "description": "Operator token missing, wrong or revoked"},
            403: {"model": ErrorBody, "description": f"The token's role is below {role.value}"},
        },
    }


class AuditEntryBody(BaseModel):
    """One audit entry with its place in the hash chain."""

    seq: int
    time: dt.datetime
    actor: str = Field(description="operator token name (never the token)")
    role: str
    action: str
    target: str
    result: str = Field(description="ok, or refused/failed with status and reason")
    request_id: str
    detail: str
    prev: str = Field(description="hash of the entry before (64 zeros for the first)")
    hash: str

    @classmethod
    def of(cls, e: AuditEntry) -> "AuditEntryBody":
        """The body of a stored entry."""
        return cls(
            seq=e.seq, time=e.time, actor=e.actor, role=e.role, action=e.action,
            target=e.target, result=e.result, request_id=e.request_id, detail=e.detail,
            prev=e.prev, hash=e.hash,
        )  # fmt: skip


def audit_router(auth: OperatorAuth, audit: AuditStore) -> APIRouter:
    """``GET /api/v1/audit``: the audit log, a page at a time, oldest first."""
    router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

    viewer = role_route(auth, Role.VIEWER)

    @router.get(
        "",
        summary="Audit log entries",
        dependencies=viewer["dependencies"],
        openapi_extra=viewer["openapi_extra"],
        responses={
            **viewer["responses"],
            400: {"model": ErrorBody, "description": "since names no calendar day (Feb 30)"},
        },
    )
    def entries(
        after: Annotated[int, Query(ge=0, le=2**62, description="entries after this seq")] = 0,
        since: Annotated[
            str | None,
            Query(pattern=RFC3339_PATTERN, description="entries at or after (RFC 3339 time)"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_PAGE)] = MAX_AUDIT_PAGE,
    ) -> list[AuditEntryBody]:
        """Entries with ``seq > after`` (and ``time >= since``), oldest first, at most
        ``limit``. A client verifying the chain reads from ``after=0`` to the end."""
        # The pattern guarantees an offset; only an impossible day (Feb 30) is left.
        try:
            when = dt.datetime.fromisoformat(since) if since is not None else None
        except ValueError as e:
            raise OperatorError(f"since {since!r} is not a calendar time") from e
        found = audit.entries(after_seq=after, since=when, limit=limit)
        return [AuditEntryBody.of(e) for e in found]

    return router


class OperatorBody(BaseModel):
    """An operator token's account (never the token)."""

    name: str
    role: str
    created_at: dt.datetime
    created_by: str
    revoked_at: dt.datetime | None


class NewOperatorRequest(StrictRequest):
    """A named operator token to make."""

    name: str = Field(pattern=f"^{OPERATOR_NAME_PATTERN}$", max_length=64)
    # FastAPI validates the parsed body as Python data, where strict mode wants a Role
    # instance: the enum takes its JSON string (and only one of its values) here.
    role: Role = Field(strict=False)


class NewOperatorBody(BaseModel):
    """A new operator account and its token (shown only here)."""

    operator: OperatorBody
    token: str = Field(description="the bearer token; stored only as its SHA-256")


def operators_router(
    auth: OperatorAuth, operators: OperatorStore, clock: Callable[[], dt.datetime]
) -> APIRouter:
    """``/api/v1/operators``: admins make, list and revoke operator tokens."""
    router = APIRouter(prefix="/api/v1/operators", tags=["operators"])
    name_param = PathParam(description="operator name", pattern=f"^{OPERATOR_NAME_PATTERN}$")

    @router.get("", summary="List operator tokens", **role_route(auth, Role.ADMIN))
    def list_operators() -> list[OperatorBody]:
        """Every named operator token's account, revoked ones too."""
        return [OperatorBody(**vars(r)) for r in operators.list()]

    @router.post(
        "",
        summary="Make an operator token",
        status_code=201,
        **role_route(auth, Role.ADMIN, "operator.add"),
    )
    def add_operator(
        req: NewOperatorRequest,
        request: Request,
        op: Annotated[Operator, Depends(auth.require(Role.ADMIN, action="operator.add"))],
    ) -> NewOperatorBody:
        """Make a named token with a role; the answer is the only place the token appears."""
        note_audit(request, target=req.name, detail=f"role {req.role.value}")
        if req.name in RESERVED_OPERATOR_NAMES:
            raise NameExistsError(f"operator name {req.name!r} is reserved")
        try:
            check_operator_name(req.name)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        token = new_operator_token()
        rec = operators.add(
            req.name,
            role=req.role.value,
            token_hash=hash_operator_token(token),
            created_by=op.name,
            now=clock(),
        )
        return NewOperatorBody(operator=OperatorBody(**vars(rec)), token=token)

    @router.post(
        "/{name}/revoke",
        summary="Revoke an operator token",
        **role_route(auth, Role.ADMIN, "operator.revoke"),
    )
    def revoke_operator(name: Annotated[str, name_param]) -> OperatorBody:
        """Refuse the token from its next request on (revocation is final)."""
        return OperatorBody(**vars(operators.revoke(name, now=clock())))

    return router


class WhoAmIOperatorBody(BaseModel):
    """The operator a token belongs to (never the token)."""

    name: str = Field(description="the token's name (bootstrap for DATA/operator-token)")
    role: Role = Field(description="viewer < operator < release-manager < admin")


def whoami_router(auth: OperatorAuth) -> APIRouter:
    """``GET /api/v1/operator/whoami``: which operator and role a token is.

    A client (the dashboard, a script) learns what it may offer the person holding the
    token, without trying an action and leaving a refused entry in the audit log.
    """
    router = APIRouter(prefix="/api/v1/operator", tags=["operators"])
    viewer = auth.require(Role.VIEWER)

    @router.get("/whoami", summary="The presented operator token's name and role",
                **role_route(auth, Role.VIEWER))  # fmt: skip
    def whoami(op: Annotated[Operator, Depends(viewer)]) -> WhoAmIOperatorBody:
        """Name and role of the bearer token presented (any role may ask)."""
        return WhoAmIOperatorBody(name=op.name, role=op.role)

    return router
