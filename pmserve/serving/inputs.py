"""Protocol elements -> what a model's preprocessor takes: texts checked against the limits, or images decoded to
RGB arrays (JSON carries an image as base64 text, the binary extension as its encoded bytes)."""

from __future__ import annotations

import base64
import io

import numpy as np

from .model import Served
from .protocol import RequestError

IMAGE_BYTES = 16 << 20  # one encoded image; text bodies are bounded by --max-inputs x --max-text-chars


def model_inputs(served: Served, elements: list, max_text_chars: int) -> list:
    """Protocol elements -> what the model's preprocessor takes: texts, or decoded RGB arrays for images.
    JSON carries an image as base64 text; the binary extension carries its encoded bytes as they are."""
    out = []
    for i, x in enumerate(elements):
        if served.kind == "text":
            if isinstance(x, bytes):
                try:
                    x = x.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError(400, f"input {i}: not UTF-8 text") from None
            if not isinstance(x, str):
                raise RequestError(400, f"input {i}: expected a string, got {type(x).__name__}")
            if len(x) > max_text_chars:
                raise RequestError(
                    413, f"input {i}: {len(x)} characters, more than --max-text-chars {max_text_chars}"
                )
            out.append(x)
        else:
            out.append(_decode_image(x, i))
    return out


def _decode_image(x, i: int) -> np.ndarray:
    from PIL import Image

    if isinstance(x, str):
        try:
            x = base64.b64decode(x, validate=True)
        except ValueError:
            raise RequestError(400, f"input {i}: not base64 (JSON carries images as base64 text)") from None
    if not isinstance(x, bytes):
        raise RequestError(400, f"input {i}: expected encoded image bytes, got {type(x).__name__}")
    if len(x) > IMAGE_BYTES:
        raise RequestError(413, f"input {i}: {len(x)} bytes, more than {IMAGE_BYTES} per image")
    try:
        with Image.open(io.BytesIO(x)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"input {i}: not a readable image ({e})") from None
