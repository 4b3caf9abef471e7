"""The operator's dashboard: static pages over the operator API (ADR 0035).

URL layout::

    GET /dashboard/           the page: a login form, then the fleet, rollouts, alerts,
                              a device's history and vulnerabilities
    GET /dashboard/{asset}    its JavaScript modules, style sheet and icon

The files are package data (``static/``), shipped as written: no build step, no
third-party code, nothing loaded from another origin. The page holds no data and these
routes need no token: every value it shows is fetched by the browser from the operator
API with the operator's bearer token, which the person pastes into the login form and
which stays in the tab's ``sessionStorage`` (no cookie, so no request carries it by
itself: nothing to forge across sites). A viewer token is enough to look; the page
offers an alert's acknowledgement only to a role that may do it, and the API decides
anyway.

Every response carries :data:`DASHBOARD_CSP`: scripts only from these files (no inline
script, no ``eval``), connections only to this server, no framing, forms that submit
nowhere, and Trusted Types required, so the browser itself refuses an ``innerHTML`` of
a string: the scripts put every API value into the page as text.
"""

# No "from __future__ import annotations": FastAPI reads the routes' annotations.
import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Final

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

__all__ = ["DASHBOARD_CSP", "DASHBOARD_HEADERS", "DASHBOARD_PATH", "dashboard_router"]

#: where the dashboard is served
DASHBOARD_PATH: Final = "/dashboard/"
#: the page's own origin for everything, nothing inline; ``form-action 'none'``: the
#: login form is read by the script, and never submits the token in a URL
DASHBOARD_CSP: Final = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)
#: headers of every dashboard response
DASHBOARD_HEADERS: Final = {
    "Content-Security-Policy": DASHBOARD_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # revalidated by ETag: a server upgrade shows its new page at the next load
    "Cache-Control": "no-cache",
}
#: asset names: one flat directory of lower-case file names
ASSET_PATTERN: Final = r"^[a-z][a-z0-9-]{0,63}\.(js|css|svg)$"
_MEDIA_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_INDEX: Final = "index.html"


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _load_assets() -> dict[str, _Asset]:
    """Every file of ``static/``, read once (a few tens of KiB)."""
    assets: dict[str, _Asset] = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        media_type = _MEDIA_TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0]
        if not entry.is_file() or media_type is None:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[entry.name] = _Asset(body, media_type, etag)
    return assets


def _response(asset: _Asset, request: Request) -> Response:
    headers = {**DASHBOARD_HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def dashboard_router() -> APIRouter:
    """The dashboard's routes (GET only; no token: the page's data calls need one)."""
    assets = _load_assets()
    router = APIRouter(prefix="/dashboard", tags=["dashboard"])

    @router.get(
        "/",
        summary="The operator dashboard (HTML; its data calls need an operator token)",
        response_class=Response,
        responses={200: {"content": {"text/html": {}}, "description": "The page"}},
    )
    def page(request: Request) -> Response:
        """The page: a login form for an operator token, then the views (no data in it)."""
        return _response(assets[_INDEX], request)

    @router.get(
        "/{asset}",
        summary="A script, style sheet or icon of the dashboard",
        response_class=Response,
        responses={
            200: {
                "content": {"text/javascript": {}, "text/css": {}, "image/svg+xml": {}},
                "description": "The file",
            },
            404: {"description": "No such file"},
        },
    )
    def asset(
        asset: Annotated[str, PathParam(description="file name", pattern=ASSET_PATTERN)],
        request: Request,
    ) -> Response:
        """One of the page's files, as shipped."""
        found = assets.get(asset)
        if found is None:
            raise HTTPException(404, f"no dashboard file {asset}", headers=DASHBOARD_HEADERS)
        return _response(found, request)

    return router
