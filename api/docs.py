"""The interactive API docs (/docs, /redoc), served from this machine: FastAPI's default pages load Swagger UI and
ReDoc from a CDN, which an offline factory network (and this one) cannot reach, and showed blank pages. The assets
(Swagger UI 5, which reads FastAPI's OpenAPI 3.1; ReDoc 2) come from the `fastapi-offline` package's static folder."""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
ASSET_DIR = files("fastapi_offline") / "static"


def add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI), /redoc and their assets; create the app with docs_url=None, redoc_url=None."""
    app.mount(ASSETS, StaticFiles(directory=str(ASSET_DIR)), name="docs-assets")
    spec = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=spec, title=f"{app.title} - docs", swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css", swagger_favicon_url=f"{ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=spec, title=f"{app.title} - ReDoc", redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS}/favicon.png", with_google_fonts=False)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:  # browsers ask for it on every page (the dashboard's only console error)
        return FileResponse(str(ASSET_DIR / "favicon.png"), media_type="image/png")
