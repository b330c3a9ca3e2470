"""Upload validation: turn untrusted bytes into an RGB image, or into one clear 4xx error.

Every check runs before the expensive step it protects: the byte limit while the body is read
(``read_limited``), the pixel limit on the header before any pixel is decoded (``decode_image``),
and the format allow-list before a decoder is chosen. Nothing here touches PIL's process-wide
settings; limits are plain arguments.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import AsyncIterator

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_BODY_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo; above this the header alone is refused
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# after the limit is crossed, at most this many more bytes are read (and discarded) so the client
# can still receive the 413 instead of a connection reset; beyond it the connection is just closed
DRAIN_BYTES = 64 * 1024 * 1024


@dataclass(eq=False)
class ApiError(Exception):
    """A client error the API reports as ``{"error": message, "type": kind, "hint": hint}``."""

    status: int
    message: str
    kind: str = "bad_request"
    hint: str = ""

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class UploadLimits:
    """What one request may carry."""

    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than the server's limit of {limit / 1048576:g} MB",
                    "body_too_large", "send a smaller image (or fewer images per request), or start the server "
                    "with a larger --max-body-mb")


async def read_limited(chunks: AsyncIterator[bytes], limit: int, declared: int | None = None) -> bytes:
    """Read a request body, refusing it as soon as it passes ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before anything is read. Bytes past the
    limit are never kept: the rest of the body is read and discarded (up to ``DRAIN_BYTES``) so the
    client gets the 413 answer rather than a reset connection.
    """
    if declared is not None and declared > limit + DRAIN_BYTES:
        raise body_too_large(limit)
    parts: list[bytes] = []
    size = 0
    over = declared is not None and declared > limit
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            over = True
        if over:
            parts.clear()
            if size > limit + DRAIN_BYTES:
                break
            continue
        parts.append(chunk)
    if over:
        raise body_too_large(limit)
    return b"".join(parts)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Bytes -> fully decoded RGB image; ``ApiError`` (400/413/422) for anything else. Never raises otherwise."""
    if not data:
        raise ApiError(400, f"{name} is empty (0 bytes)", "empty_file", "send the image file's contents")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(name, str(exc), max_pixels) from None
    except UnidentifiedImageError:
        raise ApiError(422, f"{name} is not an image in a format this server reads", "not_an_image",
                       f"send a {', '.join(ALLOWED_FORMATS)} file") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ApiError(422, f"{name} could not be decoded: {_short(exc)}", "corrupt_image",
                       "the file is truncated or damaged; send the complete file") from None
    try:
        width, height = img.size
        if width * height > max_pixels:
            raise _too_many_pixels(name, f"{width}x{height} = {width * height:,} pixels", max_pixels)
        if width <= 0 or height <= 0:
            raise ApiError(422, f"{name} has no pixels ({width}x{height})", "not_an_image", "send a real image")
        try:
            img.load()
            return img.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise _too_many_pixels(name, str(exc), max_pixels) from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as exc:
            # truncated or corrupt data; PIL raises a variety of types for these
            raise ApiError(422, f"{name} could not be decoded: {_short(exc)}", "corrupt_image",
                           "the file is truncated or damaged; send the complete file") from None
    finally:
        img.close()


def _too_many_pixels(name: str, detail: str, max_pixels: int) -> ApiError:
    return ApiError(413, f"{name} has too many pixels ({detail}; limit {max_pixels:,})", "too_many_pixels",
                    "downscale the image before sending it, or start the server with a larger --max-pixels")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
