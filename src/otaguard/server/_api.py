"""Response models shared by every router of the server."""

from __future__ import annotations

from pydantic import BaseModel, Field

from otaguard.model.errors import (
    AccessDeniedError,
    ConflictError,
    DeviceExistsError,
    NotReadyError,
    OperatorError,
    OtaguardError,
    ServerStorageError,
    TransportError,
    UnknownDeviceError,
    VerificationError,
)

__all__ = ["ErrorBody", "status_for"]


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="one line saying what went wrong")


def status_for(error: OtaguardError) -> int:  # noqa: PLR0911 - one status per fault
    """The HTTP status of an error, by whose fault it is (every route and fast path)."""
    if isinstance(error, AccessDeniedError):
        return 403
    if isinstance(error, UnknownDeviceError):
        return 404
    if isinstance(error, DeviceExistsError):
        return 409
    if isinstance(error, VerificationError):
        return 422
    if isinstance(error, OperatorError):
        return 400
    if isinstance(error, ConflictError):
        return 409
    if isinstance(error, (NotReadyError, ServerStorageError)):
        return 503
    if isinstance(error, TransportError):
        return 502
    return 500
