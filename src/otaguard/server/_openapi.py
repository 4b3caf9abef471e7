"""The OpenAPI schema's finishing pass: the answers every route shares, stated once.

FastAPI writes each route's own responses; what the server adds around them is declared
here, so ``/openapi.json`` lists every status a route can answer (schemathesis holds the
running server to it, ``tests/integration/test_schemathesis.py``):

* the error body: every error is ``{"error": "..."}`` (:class:`~._api.ErrorBody`), the
  request-validation 422 included (FastAPI would declare its own ``HTTPValidationError``);
* no 422 on the repository routes: the fast path in front of them answers any name it
  cannot serve with 404;
* 404 on every operation whose path names something (it may not exist);
* 400 on every operation with a JSON body (FastAPI's answer to one that does not parse);
* 409 on every audited (state-changing) operator action: a revoked device, a taken
  name, the built-in group, a concurrent change;
* 403 on every device route (the gate refuses a quarantined or revoked device);
* 401 and 403 on every operation that needs an operator token;
* 503 (storage failed or not ready, with ``Retry-After``) on every operation that reads
  the database or the blob store.

Route-specific answers (404 for an unknown resource, 409 for a conflict with its state,
413 for a body over its cap) stay with the route that raises them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from fastapi import FastAPI

__all__ = ["STORAGE_FREE_PATHS", "finish_schema", "install_schema"]

_VALIDATION_REF: Final = "#/components/schemas/HTTPValidationError"
_ERROR_REF: Final = "#/components/schemas/ErrorBody"
#: operations that touch neither the database nor the blob store: no 503
STORAGE_FREE_PATHS: Final = ("/healthz", "/dashboard/", "/.well-known/est/cacerts")


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _ERROR_REF}}},
    }


def _needs_token(op: dict[str, Any]) -> bool:
    return any("operatorToken" in req for req in op.get("security") or ())


def _touches_storage(path: str) -> bool:
    return not any(
        path == p or (p.endswith("/") and path.startswith(p)) for p in STORAGE_FREE_PATHS
    )


def finish_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the shared answers to ``schema`` (FastAPI's ``openapi()`` output), in place.

    Returns:
        ``schema``.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            responses: dict[str, Any] = op.setdefault("responses", {})
            for status, response in list(responses.items()):
                content = response.get("content", {}).get("application/json", {})
                if content.get("schema", {}).get("$ref") == _VALIDATION_REF:
                    responses[status] = _error("Invalid request (the parameter and reason given)")
            if "repository" in op.get("tags", ()):
                # answered by the fast path (.fastpath), which validates nothing but
                # looks the name up: a name no file can have is a 404 like any unknown one
                responses.pop("422", None)
            if any(p.get("in") == "path" for p in op.get("parameters", ())):
                responses.setdefault("404", _error("Nothing of that name"))
            if "application/json" in op.get("requestBody", {}).get("content", {}):
                # FastAPI's own answer to a body that is not JSON at all
                responses.setdefault("400", _error("The body is not parseable JSON"))
            if "x-audit-action" in op:
                # every state-changing operator action meets the state it changes
                responses.setdefault("409", _error("The current state forbids it (reason given)"))
            if {"device", "repository"} & set(op.get("tags", ())):
                # the device gate on every request: quarantined, revoked, unknown certificate
                responses.setdefault("403", _error("Device refused (reason given)"))
            if _needs_token(op):
                responses.setdefault("401", _error("Operator token missing, wrong or revoked"))
                responses.setdefault("403", _error("The token's role is too low for this"))
            if _touches_storage(path):
                responses.setdefault("503", _error("Storage failed or not ready (Retry-After)"))
    return schema


def install_schema(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the finished schema (built once, then kept)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish_schema(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
