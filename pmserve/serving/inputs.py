"""Protocol elements -> what a model's preprocessor takes: texts checked against the limits, or images decoded to
RGB arrays (JSON carries an image as base64 text, the binary extension as its encoded bytes)."""

from __future__ import annotations

import base64
import io

import numpy as np

from .config import ServeConfig
from .model import Served
from .protocol import RequestError

# Decoders for the formats cameras and browsers write; others (EPS runs Ghostscript, TIFF and PSD hold layers and
# compression schemes few clients need) are refused rather than opened.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# An image at least twice this many times the model's input side is reduced as it is decoded (box filter, by an
# integer factor, never below this many times the side, as a JPEG's DCT scaling does): a request's decoded images
# then take memory in proportion to the model's input, not to the pixels a client chose to send. The
# preprocessor's own resize follows, as for any image.
KEEP_SIDE = 2


def model_inputs(served: Served, elements: list, cfg: ServeConfig) -> list:
    """Protocol elements -> what the model's preprocessor takes: texts, or decoded RGB arrays for images.
    JSON carries an image as base64 text; the binary extension carries its encoded bytes as they are."""
    out = []
    side = KEEP_SIDE * input_side(served) if served.kind != "text" else 0
    for i, x in enumerate(elements):
        if served.kind == "text":
            if isinstance(x, bytes):
                try:
                    x = x.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError(400, f"input {i}: not UTF-8 text") from None
            if not isinstance(x, str):
                raise RequestError(400, f"input {i}: expected a string, got {type(x).__name__}")
            if len(x) > cfg.max_text_chars:
                raise RequestError(
                    413, f"input {i}: {len(x)} characters, more than --max-text-chars {cfg.max_text_chars}"
                )
            out.append(x)
        else:
            out.append(decode_image(x, i, cfg, side))
    return out


def input_side(served: Served) -> int:
    """The longest side of the model's input images, from its image processor (224 when it does not say)."""
    size = getattr(getattr(served.model.prep, "proc", None), "size", None) or {}
    sides = [v for v in dict(size).values() if isinstance(v, int) and v > 0]
    return max(sides, default=224)


def decode_image(x, i: int, cfg: ServeConfig, side: int) -> np.ndarray:
    """One encoded image -> an RGB array, every limit checked before the pixels are decoded: its bytes
    (--max-image-bytes), its format, and its width x height from the header (--max-image-pixels). Images larger
    than `side` on both sides are decoded reduced (JPEG's draft mode, else an integer box reduction)."""
    from PIL import Image

    if isinstance(x, str):
        if len(x) > -(-cfg.max_image_bytes // 3) * 4:
            raise RequestError(413, f"input {i}: more than --max-image-bytes {cfg.max_image_bytes} bytes")
        try:
            x = base64.b64decode(x, validate=True)
        except ValueError:
            raise RequestError(400, f"input {i}: not base64 (JSON carries images as base64 text)") from None
    if not isinstance(x, bytes):
        raise RequestError(400, f"input {i}: expected encoded image bytes, got {type(x).__name__}")
    if len(x) > cfg.max_image_bytes:
        raise RequestError(
            413, f"input {i}: {len(x)} bytes, more than --max-image-bytes {cfg.max_image_bytes}"
        )
    try:
        with Image.open(io.BytesIO(x), formats=IMAGE_FORMATS) as im:
            w, h = im.size  # from the header: nothing decoded yet
            if w < 1 or h < 1 or w * h > cfg.max_image_pixels:
                raise RequestError(
                    413, f"input {i}: {w}x{h} pixels, more than --max-image-pixels {cfg.max_image_pixels}"
                )
            if im.format == "JPEG":  # DCT scaling: decoded at 1/2, 1/4 or 1/8 size, never below `side`
                im.draft("RGB", (side, side))
            factor = min(im.size) // side if side else 0
            if factor >= 2:  # reduced before converting: one full-size copy of the pixels at most
                im = (im if im.mode in ("L", "LA", "RGB", "RGBA") else im.convert("RGB")).reduce(factor)
            return np.asarray(im.convert("RGB"))
    except RequestError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit, far above ours, refused when the header is read
        raise RequestError(
            413, f"input {i}: more than --max-image-pixels {cfg.max_image_pixels} pixels"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"input {i}: not a readable image ({str(e)[:200]})") from None
