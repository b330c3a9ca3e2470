"""The HTTP service in-process: micro-batcher, upload limits, auth, error bodies, page and CLI guards.

A real classifier (``tiny:clip`` + Tip-Adapter fitted on a tiny ImageFolder) is served through FastAPI's
TestClient; the same app over a real uvicorn process is tested in ``test_serve_http.py``.
"""
from __future__ import annotations

import asyncio
import io
import re
import socket

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from xmodal.errors import InputError, UsageError
from xmodal.serve.app import ServeSettings, create_app
from xmodal.serve.batcher import MicroBatcher, QueueFullError
from xmodal.serve.cli import check_bind, is_loopback, resolve_token
from xmodal.serve.limits import ApiError, UploadLimits, decode_image, read_limited
from xmodal.serve.testing import jpeg_bytes, png_bytes, png_claiming

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from xmodal.serve.testing import fit_tiny_classifier

    return fit_tiny_classifier(tmp_path_factory.mktemp("serve_app"))


@pytest.fixture(scope="module")
def classifier(fitted):
    return fitted[0]


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier)) as c:
        yield c


# ----- micro-batcher -------------------------------------------------------------------------------------
def test_batcher_groups_concurrent_requests_into_one_forward_pass():
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        return [x * 10 for x in items]

    async def main():
        b = MicroBatcher(fn, max_batch=8, max_wait_ms=200)
        await b.start()
        try:
            results = await asyncio.gather(*(b.submit([i]) for i in range(5)), b.submit([5, 6]))
        finally:
            await b.stop()
        return results

    results = asyncio.run(main())
    assert results == [[0], [10], [20], [30], [40], [50, 60]]
    assert sizes == [7]  # all seven images in one call


def test_batcher_caps_the_batch_and_refuses_a_full_queue():
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        return items

    async def main():
        b = MicroBatcher(fn, max_batch=3, max_wait_ms=50, max_queue=10)
        await b.start()
        try:
            out = await asyncio.gather(*(b.submit([i]) for i in range(7)))
            with pytest.raises(QueueFullError):
                await b.submit(list(range(11)))  # more than the queue holds: refused as a whole
            assert b.pending() == 0
        finally:
            await b.stop()
        return out

    assert asyncio.run(main()) == [[i] for i in range(7)]
    assert max(sizes) == 3 and sum(sizes) == 7


def test_batcher_survives_a_failing_batch():
    calls = {"n": 0}

    def fn(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return items

    async def main():
        b = MicroBatcher(fn, max_batch=4, max_wait_ms=1)
        await b.start()
        try:
            with pytest.raises(RuntimeError, match="boom"):
                await b.submit([1])
            return await b.submit([2])
        finally:
            await b.stop()

    assert asyncio.run(main()) == [2]


# ----- upload limits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, status, kind", [
    (b"", 400, "empty_file"),
    (b"this is not an image", 422, "not_an_image"),
    (jpeg_bytes()[:300], 422, "corrupt_image"),
    (png_claiming(8000, 6000), 413, "too_many_pixels"),      # over our 40 MP limit, under PIL's own
    (png_claiming(30000, 30000), 413, "too_many_pixels"),    # PIL's DecompressionBombError
    (png_claiming(50, 50), 422, "corrupt_image"),            # header fine, pixel data missing
])
def test_decode_image_refuses_bad_uploads(data, status, kind):
    with pytest.raises(ApiError) as info:
        decode_image(data, max_pixels=40_000_000)
    assert (info.value.status, info.value.kind) == (status, kind)
    assert info.value.hint


def test_decode_image_reads_good_images_as_rgb():
    img = decode_image(jpeg_bytes(size=(40, 30)))
    assert img.mode == "RGB" and img.size == (40, 30)
    grey = io.BytesIO()
    Image.new("L", (10, 10), 7).save(grey, "PNG")
    assert decode_image(grey.getvalue()).mode == "RGB"


def test_read_limited_refuses_while_reading_and_keeps_nothing_past_the_limit():
    seen = []

    async def chunks(n, size):
        for _ in range(n):
            seen.append(size)
            yield b"x" * size

    async def read(n, size, limit, declared=None):
        return await read_limited(chunks(n, size), limit, declared)

    assert asyncio.run(read(3, 10, 30)) == b"x" * 30
    with pytest.raises(ApiError) as info:
        asyncio.run(read(4, 10, 30))
    assert info.value.status == 413 and "MB" in info.value.message
    seen.clear()
    with pytest.raises(ApiError):  # a declared length far over the limit is refused before reading
        asyncio.run(read(5, 10, 30, declared=10 ** 12))
    assert seen == []


# ----- the app -------------------------------------------------------------------------------------------
def test_classify_multipart_and_raw_body_match_in_process_predictions(client, classifier):
    images = [png_bytes((220, 20, 20)), png_bytes((20, 200, 30)), jpeg_bytes((20, 30, 220))]
    files = [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = client.post("/v1/classify?top_k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = classifier.predict_proba([Image.open(io.BytesIO(d)).convert("RGB") for d in images])
    assert [res["filename"] for res in body["results"]] == ["img0.png", "img1.png", "img2.png"]
    for res, row in zip(body["results"], expected):
        scores, idx = torch.topk(row, 2)
        assert [t["label"] for t in res["top_k"]] == [classifier.classes_[i] for i in idx.tolist()]
        assert [t["score"] for t in res["top_k"]] == pytest.approx(scores.tolist(), abs=1e-5)
        assert res["label"] == res["top_k"][0]["label"]
    raw = client.post("/v1/classify", content=images[1], headers={"content-type": "image/png"}).json()
    one, many = raw["results"][0]["top_k"][:2], body["results"][1]["top_k"]
    assert [t["label"] for t in one] == [t["label"] for t in many]
    assert [t["score"] for t in one] == pytest.approx([t["score"] for t in many], abs=1e-5)
    assert len(raw["results"][0]["top_k"]) == min(5, len(classifier.classes_))


@pytest.mark.parametrize("kwargs, status, kind", [
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
    ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "empty_body"),
    ({"content": b"GIF89a-not-really", "headers": {"content-type": "image/gif"}}, 422, None),
    ({"content": png_bytes(), "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"content": png_bytes()}, 415, "unsupported_media_type"),
    ({"files": {"image": ("a.png", png_bytes(), "image/png")}}, 400, "missing_file_field"),
    ({"data": {"file": "not a file"}, "files": {"other": ("a.png", b"x")}}, 400, "missing_file_field"),
    ({"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty_file"),
    ({"files": {"file": ("t.jpg", jpeg_bytes()[:300], "image/jpeg")}}, 422, "corrupt_image"),
    ({"files": {"file": ("bomb.png", png_claiming(30000, 30000), "image/png")}}, 413, "too_many_pixels"),
    ({"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, None),
])
def test_bad_input_is_a_4xx_json_error_and_the_service_keeps_working(client, kwargs, status, kind):
    before = client.post("/v1/classify", content=png_bytes(), headers={"content-type": "image/png"}).json()
    r = client.post("/v1/classify", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] and body["hint"]
    if kind:
        assert body["type"] == kind
    assert client.get("/healthz").json()["status"] == "ok"
    after = client.post("/v1/classify", content=png_bytes(), headers={"content-type": "image/png"}).json()
    assert after == before


def test_body_over_the_limit_is_413(classifier):
    app = create_app(classifier, ServeSettings(limits=UploadLimits(max_body_bytes=1000)))
    with TestClient(app) as c:
        r = c.post("/v1/classify", content=b"\xff" * 5000, headers={"content-type": "image/jpeg"})
        assert r.status_code == 413 and r.json()["type"] == "body_too_large"
        assert c.post("/v1/classify", content=png_bytes(), headers={"content-type": "image/png"}).status_code == 200


def test_routes_and_parameters_errors_are_json(client):
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["type"] == "not_found"
    r = client.get("/v1/classify")
    assert r.status_code == 405 and r.json()["type"] == "method_not_allowed"
    r = client.post("/v1/classify?top_k=0", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 422 and "top_k" in r.json()["error"]
    r = client.post("/v1/classify?top_k=abc", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["type"] == "invalid_parameter"


def test_model_card_health_docs_and_page(client, classifier):
    card = client.get("/v1/model").json()
    assert card["classes"] == list(classifier.classes_)
    assert card["method"] == "tip-adapter" and card["backbone"].startswith("tiny:clip")
    assert isinstance(card["stand_in"], bool) and card["val_accuracy"] == classifier.card()["validation_accuracy"]
    assert "imagefolder:" not in str(card)  # the training folder's path is not published
    before = client.get("/healthz").json()
    client.post("/v1/classify", content=png_bytes(), headers={"content-type": "image/png"})
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["images"] == before["images"] + 1
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    # self-contained: no external script, style, font or image
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
    assert "@import" not in page.text and "url(http" not in page.text


# ----- auth and binding ----------------------------------------------------------------------------------
def test_token_is_required_on_the_api_when_configured(classifier):
    with TestClient(create_app(classifier, ServeSettings(token=TOKEN))) as c:
        img = {"content": png_bytes(), "headers": {"content-type": "image/png"}}
        for headers in ({}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": TOKEN},
                        {"authorization": f"Basic {TOKEN}"}):
            r = c.post("/v1/classify", content=img["content"], headers={**img["headers"], **headers})
            assert r.status_code == 401 and r.json()["type"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/model", headers=headers).status_code == 401
        ok = {"authorization": f"Bearer {TOKEN}"}
        assert c.post("/v1/classify", content=img["content"], headers={**img["headers"], **ok}).status_code == 200
        assert c.get("/v1/model", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # no secrets there


def test_loopback_binds_refuse_foreign_host_headers(classifier):
    from xmodal.serve.app import LOOPBACK_HOST_NAMES

    with TestClient(create_app(classifier, ServeSettings(trusted_hosts=LOOPBACK_HOST_NAMES))) as c:
        assert c.get("/healthz", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "localhost"}).status_code == 200
        r = c.get("/v1/model", headers={"host": "attacker.example:8000"})  # DNS rebinding
        assert r.status_code == 400 and r.json()["type"] == "bad_host"


def test_non_loopback_bind_needs_a_token(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.5")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(UsageError, match="without authentication"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", TOKEN)
    check_bind("127.0.0.1", None)
    assert resolve_token(None, {}) is None
    assert resolve_token(None, {"XMODAL_API_TOKEN": f" {TOKEN}\n"}) == TOKEN
    (tmp_path / "tok").write_text(TOKEN + "\n")
    assert resolve_token(tmp_path / "tok", {"XMODAL_API_TOKEN": "other-token-abcdefghijkl"}) == TOKEN
    (tmp_path / "short").write_text("abc")
    with pytest.raises(UsageError, match="at least 16"):
        resolve_token(tmp_path / "short", {})
    with pytest.raises(InputError, match="not found"):
        resolve_token(tmp_path / "missing", {})


def test_serve_cli_refuses_a_public_host_without_a_token_and_a_busy_port(fitted, monkeypatch):
    from typer.testing import CliRunner

    import xmodal.cli

    model_dir = str(fitted[1])
    monkeypatch.delenv("XMODAL_API_TOKEN", raising=False)
    result = CliRunner().invoke(xmodal.cli.app, ["serve", model_dir, "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "token" in result.output.lower() and "Traceback" not in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        result = CliRunner().invoke(xmodal.cli.app, ["serve", model_dir, "--port", port])
    assert result.exit_code == 4
    assert f"127.0.0.1:{port}" in result.output and "--port" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(xmodal.cli.app, ["serve", str(fitted[2])])  # an image folder, not a saved model
    assert result.exit_code == 3 and "Traceback" not in result.output


def test_a_full_queue_is_a_503_json_answer(classifier):
    with TestClient(create_app(classifier, ServeSettings(max_queue=1))) as c:
        files = [("file", ("a.png", png_bytes(), "image/png")), ("file", ("b.png", png_bytes(), "image/png"))]
        r = c.post("/v1/classify", files=files)  # two images can never fit a one-image queue
        assert r.status_code == 503 and r.json()["type"] == "busy" and r.headers["retry-after"] == "1"
        assert c.post("/v1/classify", files=files[:1]).status_code == 200
