"""Routes of fleet monitoring (ADR 0026).

URL layout::

    POST /api/v1/device/telemetry          device (mutual TLS): one telemetry report
    GET  /api/v1/devices/{serial}/telemetry viewer: a device's latest reports
    GET  /api/v1/alerts                    viewer: alerts, newest first
    POST /api/v1/alerts/{id}/ack           operator (audited): acknowledge an alert
    GET  /metrics                          viewer: Prometheus text exposition
"""

# No "from __future__ import annotations": FastAPI evaluates the route's Annotated
# dependency (a closure variable) from the real annotation.
import datetime as dt
import json
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import CollectorRegistry as Registry
from pydantic import BaseModel, Field

from otaguard.model.errors import AccessDeniedError
from otaguard.model.names import DEVICE_SERIAL_PATTERN
from otaguard.model.telemetry import (
    MAX_TELEMETRY_BYTES,
    TELEMETRY_SCHEMA,
    telemetry_json_schema,
)
from otaguard.server._api import ErrorBody
from otaguard.server.audit import role_route
from otaguard.server.auth import Operator, OperatorAuth, Role, note_audit
from otaguard.server.device_auth import DeviceGate
from otaguard.server.metrics import render
from otaguard.server.monitor import Monitor
from otaguard.server.storage.monitoring import AlertRecord

__all__ = ["monitor_router"]

#: alerts one list request returns at most
MAX_ALERTS: Final = 1000
#: telemetry reports one request returns at most
MAX_REPORTS: Final = 100


class TelemetryAccepted(BaseModel):
    """A stored telemetry report."""

    serial: str
    schema_: str = Field(alias="schema", serialization_alias="schema")
    seq: int


class AlertBody(BaseModel):
    """One alert: what was observed against which threshold, and what was done."""

    id: int
    time: dt.datetime
    signal: str = Field(description="unpublished-image, attestation-mismatch, attack-flags, "
                        "cloned-credentials, silent-after-install, cohort-anomaly or "
                        "rollout-phase-failure")  # fmt: skip
    subject: str = Field(description="device:SERIAL, cohort:HW@VERSION or rollout:NAME")
    serial: str | None
    rollout: str | None
    observed: str
    threshold: str
    detail: str
    action: str = Field(description="record, quarantine or pause-rollout")
    outcome: str = Field(description="what the action did")
    acked_at: dt.datetime | None
    acked_by: str | None

    @classmethod
    def of(cls, a: AlertRecord) -> "AlertBody":
        """From a stored alert."""
        return cls(**a.__dict__)


class TelemetryReport(BaseModel):
    """One stored report as received."""

    time: dt.datetime
    transport: str
    report: dict[str, Any]


_TELEMETRY_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    **telemetry_json_schema(),
                    "description": f"a telemetry report, schema {TELEMETRY_SCHEMA} "
                    f"(docs/telemetry.md), at most {MAX_TELEMETRY_BYTES} bytes; serial is "
                    "the sending device's own (another's: 422)",
                }
            }
        },
    }
}


def monitor_router(
    monitor: Monitor, *, gate: DeviceGate, auth: OperatorAuth, registry: Registry
) -> APIRouter:
    """The monitoring routes (device telemetry, alerts, metrics)."""
    router = APIRouter()
    ack_operator = auth.require(Role.OPERATOR, action="alert.ack")

    @router.post(
        "/api/v1/device/telemetry",
        tags=["device"],
        summary="Send one telemetry report",
        openapi_extra=_TELEMETRY_BODY,
        responses={
            403: {"model": ErrorBody, "description": "Device refused (reason given)"},
            413: {"model": ErrorBody, "description": "Report too large"},
            422: {"model": ErrorBody, "description": "Malformed report (problem named)"},
        },
    )
    async def post_telemetry(request: Request) -> TelemetryAccepted:
        """Store a health report of the device the client certificate names."""
        dev = await run_in_threadpool(gate.authenticate, request.scope)
        if dev is None:
            raise AccessDeniedError("telemetry needs the device's client certificate")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_TELEMETRY_BYTES:
            raise HTTPException(413, f"telemetry exceeds {MAX_TELEMETRY_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_TELEMETRY_BYTES:
                raise HTTPException(413, f"telemetry exceeds {MAX_TELEMETRY_BYTES} bytes")
        report = await run_in_threadpool(
            lambda: monitor.telemetry(serial=dev.record.serial, body=bytes(body), transport="https")
        )
        return TelemetryAccepted(serial=report.serial, schema=TELEMETRY_SCHEMA, seq=report.seq)

    @router.get(
        "/api/v1/devices/{serial}/telemetry",
        tags=["fleet"],
        summary="A device's latest telemetry reports",
        **role_route(auth, Role.VIEWER),
    )
    def device_telemetry(
        serial: Annotated[
            str, PathParam(description="device serial", pattern=f"^{DEVICE_SERIAL_PATTERN}$")
        ],
        limit: Annotated[int, Query(ge=1, le=MAX_REPORTS)] = 10,
    ) -> list[TelemetryReport]:
        """Newest first, as received (each was parsed and bounded when it arrived)."""
        return [
            TelemetryReport(time=t, transport=transport, report=json.loads(body))
            for t, transport, body in monitor.store.telemetry(serial, limit=limit)
        ]

    @router.get(
        "/api/v1/alerts", tags=["alerts"], summary="Alerts", **role_route(auth, Role.VIEWER)
    )
    def list_alerts(
        include_acked: Annotated[bool, Query(alias="all")] = False,
        limit: Annotated[int, Query(ge=1, le=MAX_ALERTS)] = 100,
    ) -> list[AlertBody]:
        """Open alerts (``all=true``: acknowledged ones too), newest first."""
        return [
            AlertBody.of(a) for a in monitor.store.alerts(include_acked=include_acked, limit=limit)
        ]

    @router.post(
        "/api/v1/alerts/{alert_id}/ack",
        tags=["alerts"],
        summary="Acknowledge an alert",
        **role_route(auth, Role.OPERATOR, "alert.ack"),
    )
    def ack_alert(
        alert_id: Annotated[int, PathParam(ge=1, le=2**62)],
        request: Request,
        op: Annotated[Operator, Depends(ack_operator)],
    ) -> AlertBody:
        """Mark the alert seen; the same anomaly found again raises a new alert."""
        note_audit(request, target=str(alert_id))
        return AlertBody.of(monitor.ack(alert_id, by=op.name))

    metrics_route = role_route(auth, Role.VIEWER)
    metrics_route["responses"][200] = {
        "content": {CONTENT_TYPE_LATEST: {}},
        "description": "Prometheus text format",
    }

    @router.get(
        "/metrics",
        tags=["metrics"],
        summary="Prometheus metrics",
        response_class=Response,
        **metrics_route,
    )
    def metrics() -> Response:
        """Server and fleet gauges in the Prometheus text format (viewer token)."""
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    return router
