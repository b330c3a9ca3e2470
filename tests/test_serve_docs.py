"""``/docs`` works offline: the page names only local URLs and every asset it names is served."""
from __future__ import annotations

import re

import torch
from fastapi.testclient import TestClient

from xmodal.serve.app import create_app
from xmodal.serve.docs import ASSET_FILES, assets_folder


class _Fake:
    """Enough of a classifier for the app (the docs page never scores an image)."""

    classes_ = ["a", "b"]

    def predict_proba(self, inputs):
        return torch.full((len(inputs), 2), 0.5)

    def card(self):
        return {"method": "tip-adapter", "backbone": "tiny:clip"}


def test_docs_page_names_only_local_urls_and_they_are_served():
    with TestClient(create_app(_Fake())) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        html = page.text
        assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls)
        assert any(u.endswith("swagger-ui.css") for u in urls)
        for url in urls:
            assert url.startswith("/"), f"/docs names a non-local URL: {url}"
            assert client.get(url).status_code == 200, url
        assert '"validatorUrl": null' in html  # no badge fetched from an outside validator
        assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN: not offered


def test_vendored_assets_are_packaged():
    folder = assets_folder()
    for name in (*ASSET_FILES, "LICENSE"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
