"""``/docs`` from the Swagger UI files shipped inside the package, so the API page works with no network.

FastAPI's default ``/docs`` page loads Swagger UI from a CDN: offline it is a blank page. The bundle
(swagger-ui-dist, Apache-2.0, see ``static/swagger-ui/LICENSE``) is vendored under
``xmodal/serve/static/swagger-ui/`` and served at ``ASSETS_URL``; the page names only local URLs.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/static/swagger-ui"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def assets_folder() -> Path:
    """The vendored Swagger UI folder inside the installed package."""
    return Path(str(resources.files("xmodal.serve").joinpath("static/swagger-ui")))


def install_docs(app: FastAPI, title: str) -> None:
    """Serve ``/docs`` and its assets locally. The app must be built with ``docs_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_folder()), name="swagger-ui")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        # validatorUrl None: no badge fetched from the Swagger validator service
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{title} - API docs",
                                   swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})
