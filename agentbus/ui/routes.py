"""Serves the operator page at ``/ui`` and its assets at ``/ui/static/<name>``.

The page and its assets are public and hold no data: every number on the page comes from
the authenticated JSON API, called by the page with the operator's token. Only the files
listed in :data:`ASSETS` are served (no directory access, no path traversal).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from agentbus.core.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

router = APIRouter(tags=["operator ui"], include_in_schema=False)


def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/ui", summary="The operator page")
async def index() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8")


@router.get("/ui/static/{name}", summary="A static asset of the operator page")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no such asset {name!r}", code="asset_not_found")
    return Response(_read(name), media_type=media_type)
