"""The FastAPI application over one fitted classifier: ``create_app(classifier, settings)``.

The classifier is handed in (loaded once, by the caller) and reached by routes through a FastAPI
dependency (``get_state``), so tests can build an app around any object with ``classes_``,
``predict_proba(list_of_PIL_images)`` and ``card()``. Uploads are read under a byte limit, decoded in
worker threads, and scored by the micro-batcher; every failure a client can cause is answered with a
4xx ``{"error", "type", "hint"}`` JSON body.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Optional, Protocol, Sequence

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..classifier.abstain import UNKNOWN
from .batcher import MicroBatcher, QueueFullError
from .card import model_card
from .docs import install_docs
from .limits import ApiError, UploadLimits, decode_image, read_limited
from .schemas import ClassifyResponse, ErrorBody, Health, ImageResult, LabelScore, ModelCard

LOOPBACK_HOST_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


class Classifier(Protocol):
    """What the server needs from a fitted classifier."""

    classes_: Sequence[str]

    def predict_proba(self, inputs: list[Image.Image]) -> torch.Tensor: ...

    def card(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ServeSettings:
    """Serving knobs (the ``xmodal serve`` options)."""

    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    limits: UploadLimits = field(default_factory=UploadLimits)
    token: str | None = None  # when set, /v1/* needs "Authorization: Bearer <token>"
    trusted_hosts: tuple[str, ...] | None = None  # Host header allow-list (loopback binds: blocks DNS rebinding)


@dataclass
class ModelState:
    """Everything a request needs, created once per app."""

    classifier: Classifier
    card: ModelCard
    settings: ServeSettings
    batcher: MicroBatcher

    @property
    def model_name(self) -> str:
        flag = " (offline stand-in, not CLIP)" if self.card.stand_in else ""
        return f"{self.card.method_label or self.card.method} on {self.card.backbone}{flag}"


def get_state(request: Request) -> ModelState:
    """FastAPI dependency: the app's model state (override it in tests with ``app.dependency_overrides``)."""
    return request.app.state.xmodal


def require_token(request: Request, state: ModelState = Depends(get_state)) -> None:
    """Bearer-token check in constant time; a no-op when the server has no token."""
    token = state.settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
        raise ApiError(401, "missing or wrong API token", "unauthorized",
                       "send the header 'Authorization: Bearer <token>' with the server's token")


def _batch_predict(classifier: Classifier, images: list[Image.Image]) -> list[torch.Tensor]:
    """One forward pass over a micro-batch; runs in the batcher's thread."""
    batch_path = getattr(classifier, "proba_of_images", None)  # one forward pass, no input normalisation
    with torch.inference_mode():
        probs = batch_path(images) if callable(batch_path) else classifier.predict_proba(images)
    probs = torch.as_tensor(probs).detach().float().cpu()
    if probs.shape != (len(images), len(classifier.classes_)):
        raise RuntimeError(f"predict_proba returned shape {tuple(probs.shape)} for {len(images)} images")
    return list(probs)


def create_app(classifier: Classifier, settings: ServeSettings | None = None) -> FastAPI:
    """Build the app around an already-loaded classifier (the model is never loaded per request)."""
    settings = settings or ServeSettings()
    if settings.token is not None and not settings.token:
        raise ValueError("an empty API token would accept anything; pass None for no token")
    card = model_card(classifier)
    batcher = MicroBatcher(lambda imgs: _batch_predict(classifier, imgs), max_batch=settings.max_batch,
                           max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
    state = ModelState(classifier, card, settings, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="xmodal few-shot classifier", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classify images with a saved xmodal few-shot classifier. "
                              "Errors are JSON: {\"error\", \"type\", \"hint\"}.")
    app.state.xmodal = state
    _install_error_handlers(app)
    _install_header_middleware(app, settings)
    install_docs(app, app.title)
    page, page_csp = _load_page()
    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": text} for code, text in
        [(400, "Empty body, no 'file' field, malformed multipart"), (401, "Missing or wrong API token"),
         (413, "Body over the byte limit or image over the pixel limit"), (415, "Wrong Content-Type"),
         (422, "Not an image, truncated or corrupt image, bad query parameter"), (503, "Queue full; retry")]}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": page_csp, "Cache-Control": "no-cache"})

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz(st: ModelState = Depends(get_state)) -> Health:
        s = st.batcher.stats
        return Health(queued=st.batcher.pending(), batches=s.batches, images=s.items, largest_batch=s.largest)

    @app.get("/v1/model", response_model=ModelCard, tags=["model"], dependencies=[Depends(require_token)],
             responses={401: error_responses[401]})
    async def model(st: ModelState = Depends(get_state)) -> ModelCard:
        return st.card

    @app.post("/v1/classify", response_model=ClassifyResponse, tags=["model"],
              dependencies=[Depends(require_token)], responses=error_responses, openapi_extra=_CLASSIFY_BODY)
    async def classify(request: Request,
                       top_k: int = Query(5, ge=1, le=1000, description="How many classes to return per image."),
                       min_score: Optional[float] = Query(None, ge=0.0, le=1.0, description=(
                           "Label an image 'unknown' when its top probability is below this; the model card's "
                           "details.abstain.min_score is a threshold chosen on held-out images at fit time.")),
                       st: ModelState = Depends(get_state)) -> ClassifyResponse:
        """Classify one or more images: multipart field ``file`` (repeat it for several), or a raw ``image/*`` body."""
        uploads = await _read_uploads(request, st.settings.limits)
        images = await run_in_threadpool(_decode_all, uploads, st.settings.limits.max_pixels)
        try:
            rows = await st.batcher.submit(images)
        except QueueFullError as exc:
            raise ApiError(503, f"server busy: {exc}", "busy", "retry after a short pause") from None
        k = min(top_k, len(st.card.classes))
        results = []
        for i, ((name, _), row) in enumerate(zip(uploads, rows)):
            scores, idx = torch.topk(row, k)
            top = [LabelScore(label=st.card.classes[j], score=float(s)) for s, j in zip(scores.tolist(), idx.tolist())]
            label = UNKNOWN if min_score is not None and top[0].score < min_score else top[0].label
            results.append(ImageResult(index=i, filename=name, label=label, score=top[0].score, top_k=top))
        return ClassifyResponse(model=st.model_name, results=results)

    return app


def _decode_all(uploads: list[tuple[str | None, bytes]], max_pixels: int) -> list[Image.Image]:
    many = len(uploads) > 1
    return [decode_image(data, max_pixels, _describe(i, name, many)) for i, (name, data) in enumerate(uploads)]


def _describe(i: int, name: str | None, many: bool) -> str:
    if name:
        return f"file {name!r}" + (f" (#{i})" if many else "")
    return f"file #{i}" if many else "the upload"


async def _read_uploads(request: Request, limits: UploadLimits) -> list[tuple[str | None, bytes]]:
    """The request's images as (file name, bytes), read under the byte limit."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/form-data" and not media.startswith("image/"):
        raise ApiError(415, f"unsupported Content-Type {media or '(none)'!r}", "unsupported_media_type",
                       "send multipart/form-data with the image in field 'file' (curl -F file=@photo.jpg), "
                       "or the raw image bytes with Content-Type image/jpeg, image/png ...")
    try:
        declared = int(request.headers["content-length"]) if "content-length" in request.headers else None
    except ValueError:
        declared = None
    try:
        body = await read_limited(request.stream(), limits.max_body_bytes, declared)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body", "incomplete_body",
                       "send the complete request") from None
    if media.startswith("image/"):
        if not body:
            raise ApiError(400, "the request body is empty", "empty_body", "send the image bytes as the body")
        return [(None, body)]
    return await _parse_multipart(request.headers, body, limits)


async def _parse_multipart(headers: Headers, body: bytes, limits: UploadLimits) -> list[tuple[str | None, bytes]]:
    if not body:
        raise ApiError(400, "the request body is empty", "empty_body",
                       "send the image in multipart field 'file' (curl -F file=@photo.jpg)")

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, once(), max_files=limits.max_files, max_fields=32)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}", "bad_multipart",
                       f"send at most {limits.max_files} files in field 'file' as multipart/form-data") from None
    except Exception as exc:  # python-multipart has several error types for garbage input
        raise ApiError(400, f"malformed multipart body: {type(exc).__name__}", "bad_multipart",
                       "send multipart/form-data with the image in field 'file'") from None
    try:
        entries = form.getlist("file")
        if not entries:
            fields = ", ".join(repr(k) for k in form.keys()) or "none"
            raise ApiError(400, f"no 'file' field in the form (fields sent: {fields})", "missing_file_field",
                           "send the image in multipart field 'file' (curl -F file=@photo.jpg)")
        out: list[tuple[str | None, bytes]] = []
        for entry in entries:
            if not isinstance(entry, UploadFile):
                raise ApiError(400, "field 'file' holds text, not a file", "missing_file_field",
                               "attach the image as a file (curl -F file=@photo.jpg, note the @)")
            out.append(((entry.filename or "")[:255] or None, await entry.read()))
        return out
    finally:
        await form.close()


def _install_error_handlers(app: FastAPI) -> None:
    def body(status: int, message: str, kind: str, hint: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "type": kind, "hint": hint}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}
        if exc.status == 413:
            headers = {"Connection": "close"}
        return body(exc.status, exc.message, exc.kind, exc.hint, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        hints = {404: "see /docs for the routes", 405: "see /docs for the methods each route accepts"}
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return body(exc.status_code, message, kinds.get(exc.status_code, "http_error"),
                    hints.get(exc.status_code, ""), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return body(422, "invalid request: " + "; ".join(parts), "invalid_parameter", "see /docs for the parameters")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return body(500, f"internal error ({type(exc).__name__})", "internal", "this is a bug in xmodal; please report it")


def _install_header_middleware(app: FastAPI, settings: ServeSettings) -> None:
    allowed = None if settings.trusted_hosts is None else {h.lower() for h in settings.trusted_hosts}

    @app.middleware("http")
    async def headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        if allowed is not None:
            host = _host_without_port(request.headers.get("host", ""))
            if host not in allowed:
                return JSONResponse({"error": f"Host header {host!r} is not served here", "type": "bad_host",
                                     "hint": "use http://127.0.0.1:PORT/"}, status_code=400)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response


def _host_without_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _load_page() -> tuple[str, str]:
    """The static page and a Content-Security-Policy allowing exactly its own inline script and style."""
    page = resources.files("xmodal.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return page, csp


_CLASSIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                        "description": "One or more images (repeat the field)."}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
