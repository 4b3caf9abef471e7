"""Response models shared by every router of the server."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["ErrorBody"]


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="one line saying what went wrong")
