"""The try-it web page: `/` and the files under server/static (page, pose track, sample)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE = STATIC_DIR / "web" / "index.html"

# only what the page needs; scripts and notes that live beside it are not served
SERVED_SUFFIXES = {".html", ".js", ".css", ".json", ".jpg", ".jpeg", ".png", ".webp", ".svg"}

# the page is small and changes with the server: let browsers check for a new copy
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["web"], include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    """The try-it page."""
    return FileResponse(PAGE, media_type="text/html", headers=NO_CACHE)


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"])
async def static_file(path: str) -> FileResponse:
    """A file of the page (script, style, pose track) or the sample photo."""
    root = STATIC_DIR.resolve()
    target = (root / path).resolve()
    inside = target.is_relative_to(root)
    hidden = inside and any(part.startswith(".") for part in target.relative_to(root).parts)
    servable = target.suffix.lower() in SERVED_SUFFIXES and target.is_file()
    if not inside or hidden or not servable:
        raise HTTPException(404, f"no static file {path!r}")
    return FileResponse(target, headers=NO_CACHE)
