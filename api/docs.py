"""The interactive API docs (/docs), served from this machine: FastAPI's default page loads Swagger UI from a CDN,
which an offline factory network (and this one) cannot reach, and showed a blank page. The assets come from the
`swagger-ui-bundle` package."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/docs/assets"


def add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI over /openapi.json) and its assets; create the app with docs_url=None, redoc_url=None."""
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - docs",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:  # browsers ask for it on every page (the dashboard's only console error)
        return FileResponse(str(swagger_ui_path / "favicon-32x32.png"), media_type="image/png")
