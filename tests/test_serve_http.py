"""``xmodal serve`` as a real uvicorn process on a free loopback port, driven over HTTP with httpx.

One server (tiny:clip + Tip-Adapter fitted on a tiny ImageFolder, 1 MB body limit so the size check is cheap
to hit) is started for the module and always stopped in teardown.
"""
from __future__ import annotations

import asyncio
import io
import os

import httpx
import pytest
import torch
from PIL import Image

from xmodal.serve.process import ServerProcess

from xmodal.serve.testing import jpeg_bytes, png_claiming


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from xmodal.serve.testing import fit_tiny_classifier

    return fit_tiny_classifier(tmp_path_factory.mktemp("serve_http"))


@pytest.fixture(scope="module")
def server(fitted, tmp_path_factory):
    _, model_dir, _ = fitted
    env = {k: v for k, v in os.environ.items() if k != "XMODAL_API_TOKEN"}
    with ServerProcess(model_dir, ["--max-body-mb", "1", "--max-batch", "16", "--max-wait-ms", "20",
                                   "--log-level", "warning", "--device", "cpu"], env=env) as proc:
        yield proc
    assert not proc.alive()


@pytest.fixture(scope="module")
def test_images(fitted):
    """(file name, PNG bytes, in-process probabilities) for the tiny folder's test images."""
    clf, _, folder = fitted
    paths = sorted((folder / "test").rglob("*.png"))
    data = [p.read_bytes() for p in paths]
    probs = clf.predict_proba([Image.open(io.BytesIO(d)).convert("RGB") for d in data])
    return [(p.parent.name + "/" + p.name, d, row) for p, d, row in zip(paths, data, probs)]


def _check(result: dict, row: torch.Tensor, classes, k: int) -> None:
    """Same top-k as in process: scores equal (1e-5), and each label's in-process probability equals its
    served score (so near-ties may swap places, nothing else may differ)."""
    scores, _ = torch.topk(row, min(k, len(classes)))
    assert [t["score"] for t in result["top_k"]] == pytest.approx(scores.tolist(), abs=1e-5)
    for t in result["top_k"]:
        assert t["score"] == pytest.approx(float(row[classes.index(t["label"])]), abs=1e-5)
    assert len({t["label"] for t in result["top_k"]}) == len(result["top_k"])


def _probe(client: httpx.Client, data: bytes) -> dict:
    r = client.post("/v1/classify", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()


def test_served_predictions_equal_in_process_predictions(server, fitted, test_images):
    clf = fitted[0]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        files = [("file", (name, data, "image/png")) for name, data, _ in test_images]
        r = client.post("/v1/classify", params={"top_k": 3}, files=files)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [res["filename"] for res in results] == [name for name, _, _ in test_images]
        for res, (_, _, row) in zip(results, test_images):
            _check(res, row, clf.classes_, 3)
        for name, data, row in test_images[:3]:  # raw image body, one per request
            _check(_probe(client, data)["results"][0], row, clf.classes_, 5)
        card = client.get("/v1/model").json()
        assert card["classes"] == list(clf.classes_) and card["method"] == "tip-adapter"


def _chunks(total: int, size: int = 65536):
    sent = 0
    while sent < total:
        yield b"\xff" * min(size, total - sent)
        sent += size


BAD_INPUTS = {
    "empty raw body": ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 400),
    "not an image": ({"content": b"plain text, not pixels", "headers": {"content-type": "image/png"}}, 422),
    "truncated jpeg": ({"files": {"file": ("cut.jpg", jpeg_bytes()[:300], "image/jpeg")}}, 422),
    "0-byte file": ({"files": {"file": ("zero.png", b"", "image/png")}}, 400),
    "decompression bomb": ({"files": {"file": ("bomb.png", png_claiming(30000, 30000), "image/png")}}, 413),
    "over the pixel limit": ({"content": png_claiming(8000, 6000), "headers": {"content-type": "image/png"}}, 413),
    "body over the size limit": ({"content": b"\xff" * 3_000_000, "headers": {"content-type": "image/jpeg"}}, 413),
    "streamed body over the limit": ({"content": _chunks(3_000_000), "headers": {"content-type": "image/jpeg"}}, 413),
    "multipart over the limit": ({"files": {"file": ("big.jpg", b"\xff" * 3_000_000, "image/jpeg")}}, 413),
    "wrong field": ({"files": {"photo": ("a.png", b"\x89PNG", "image/png")}}, 400),
    "wrong content type": ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415),
    "no content type": ({"content": b"abc"}, 415),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_json_and_the_server_stays_up(server, test_images, case):
    kwargs, status = BAD_INPUTS[case]
    if case == "streamed body over the limit":
        kwargs = {**kwargs, "content": _chunks(3_000_000)}  # a fresh generator for every run
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = _probe(client, test_images[0][1])
        r = client.post("/v1/classify", **kwargs)
        assert r.status_code == status, (case, r.text)
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert body["error"] and body["type"] and body["hint"]
    with httpx.Client(base_url=server.url, timeout=60) as client:  # a fresh connection: the 413 may close one
        assert client.get("/healthz").json()["status"] == "ok"
        assert _probe(client, test_images[0][1]) == before
    assert server.alive()


def test_unknown_routes_and_bad_parameters_are_json(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.get("/v2/nothing")
        assert r.status_code == 404 and r.json()["type"] == "not_found"
        r = client.post("/v1/classify?top_k=-1", content=b"x", headers={"content-type": "image/png"})
        assert r.status_code == 422 and "top_k" in r.json()["error"]
        r = client.get("/healthz", headers={"host": "rebound.example.com"})
        assert r.status_code == 400 and r.json()["type"] == "bad_host"


def test_32_concurrent_requests_are_all_answered_correctly_in_shared_batches(server, fitted, test_images):
    clf = fitted[0]
    jobs = [test_images[i % len(test_images)] for i in range(32)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            start = (await client.get("/healthz")).json()
            responses = await asyncio.gather(*(
                client.post("/v1/classify", files={"file": (name, data, "image/png")}) for name, data, _ in jobs))
            end = (await client.get("/healthz")).json()
        return start, responses, end

    start, responses, end = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 32
    for r, (_, _, row) in zip(responses, jobs):
        _check(r.json()["results"][0], row, clf.classes_, 5)
    assert end["images"] - start["images"] == 32
    assert end["batches"] - start["batches"] < 32  # at least two requests shared a forward pass
    assert end["largest_batch"] > 1
