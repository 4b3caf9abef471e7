"""Response models shared by every router of the server."""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from otaguard.model.errors import (
    AccessDeniedError,
    ConflictError,
    DeviceExistsError,
    NotReadyError,
    OperatorError,
    OtaguardError,
    ServerStorageError,
    StateConflictError,
    TransportError,
    UnknownDeviceError,
    VerificationError,
)

__all__ = ["RFC3339_PATTERN", "ErrorBody", "StrictRequest", "status_for"]

#: an RFC 3339 time with its offset, as a query parameter states it (ASCII digits only)
RFC3339_PATTERN: Final = (
    r"^(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)


class StrictRequest(BaseModel):
    """A request body that accepts exactly what its schema says: no coercion of ``0`` to
    ``false``, ``false`` to ``0`` or ``"1"`` to ``1`` (schemathesis holds the server to
    it: a schema-invalid request must be refused)."""

    model_config = ConfigDict(strict=True)


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="one line saying what went wrong")


def status_for(error: OtaguardError) -> int:  # noqa: PLR0911 - one status per fault
    """The HTTP status of an error, by whose fault it is (every route and fast path)."""
    if isinstance(error, AccessDeniedError):
        return 403
    if isinstance(error, UnknownDeviceError):
        return 404
    if isinstance(error, (DeviceExistsError, StateConflictError)):
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
