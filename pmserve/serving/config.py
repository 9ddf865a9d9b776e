"""The options of a server (`ServeConfig`): limits, batching, ONNX Runtime, the repository's polling and the
access keys.

Every field is a `pmserve serve` option; the command builds one and hands it to everything it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import defaults as D
from ..errors import PMError
from ..predict import PROVIDERS


@dataclass
class ServeConfig:
    """Limits and batching of a server; every field is a `pmserve serve` option."""

    max_batch: int = D.SERVE_MAX_BATCH
    max_wait_ms: float = D.SERVE_MAX_WAIT_MS
    by_length: bool = D.SERVE_BY_LENGTH
    max_inputs: int = D.SERVE_MAX_INPUTS
    max_text_chars: int = D.SERVE_MAX_TEXT_CHARS
    provider: str = D.SERVE_PROVIDER
    threads: int = D.SERVE_THREADS
    drain_s: float = D.SERVE_DRAIN_S
    poll_s: float = D.SERVE_POLL_S
    max_image_pixels: int = D.SERVE_MAX_IMAGE_PIXELS
    max_image_bytes: int = D.SERVE_MAX_IMAGE_BYTES
    body_timeout_s: float = D.SERVE_BODY_TIMEOUT_S
    load_timeout_s: float = D.SERVE_LOAD_TIMEOUT_S
    # decoders (pmserve.serving.engine)
    max_prompt_tokens: int = D.SERVE_MAX_PROMPT_TOKENS
    max_new_tokens: int = D.SERVE_MAX_NEW_TOKENS
    max_sequences: int = D.SERVE_MAX_SEQUENCES
    # bearer tokens (pmserve.serving.access); never printed, so out of repr
    api_key: str | None = field(default=D.SERVE_API_KEY, repr=False)
    admin_key: str | None = field(default=D.SERVE_ADMIN_KEY, repr=False)

    def check(self) -> None:
        for opt, value, low in (
            ("max-batch", self.max_batch, 1),
            ("max-inputs", self.max_inputs, 1),
            ("max-text-chars", self.max_text_chars, 1),
            ("max-wait-ms", self.max_wait_ms, 0),
            ("threads", self.threads, 0),
            ("drain-timeout", self.drain_s, 0),
            ("poll-s", self.poll_s, 0),
            ("max-image-pixels", self.max_image_pixels, 1),
            ("max-image-bytes", self.max_image_bytes, 1),
            ("body-timeout-s", self.body_timeout_s, 0.001),
            ("load-timeout-s", self.load_timeout_s, 0.001),
            ("max-prompt-tokens", self.max_prompt_tokens, 1),
            ("max-new-tokens", self.max_new_tokens, 1),
            ("max-sequences", self.max_sequences, 1),
        ):
            if value < low:
                raise PMError(f"--{opt}: must be at least {low}, got {value}")
        if self.provider not in PROVIDERS:
            raise PMError(f"--provider: must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        for opt, key in (("api-key", self.api_key), ("admin-key", self.admin_key)):
            if key is not None and (len(key) < 16 or not key.isascii() or not key.isprintable()):
                raise PMError(f"--{opt}: must be at least 16 printable ASCII characters")

    def body_limit(self, kind: str) -> int:
        """Bytes a request body for a model of input `kind` may have: --max-inputs texts of --max-text-chars
        (4 bytes a character in UTF-8), or --max-inputs images of --max-image-bytes as base64 (4/3 of the bytes;
        the binary extension's raw bytes are fewer), and 64 KiB for the rest of the JSON."""
        if kind == "text":
            per_input = 4 * self.max_text_chars + 16
        else:
            per_input = -(-self.max_image_bytes // 3) * 4 + 16
        return self.max_inputs * per_input + (1 << 16)
