"""The try-it page: static HTML, CSS and JavaScript from app/static/ui, served at / and /ui/."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE = Path(__file__).resolve().parents[1] / "static" / "ui"


def install(app: FastAPI) -> None:
    app.mount("/ui", StaticFiles(directory=PAGE), name="ui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", media_type="text/html")
