"""The options of a server (`ServeConfig`): limits, batching, ONNX Runtime and the repository's polling.

Every field is a `pmserve serve` option; the command builds one and hands it to everything it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def check(self) -> None:
        for opt, value, low in (
            ("max-batch", self.max_batch, 1),
            ("max-inputs", self.max_inputs, 1),
            ("max-text-chars", self.max_text_chars, 1),
            ("max-wait-ms", self.max_wait_ms, 0),
            ("threads", self.threads, 0),
            ("drain-timeout", self.drain_s, 0),
            ("poll-s", self.poll_s, 0),
        ):
            if value < low:
                raise PMError(f"--{opt}: must be at least {low}, got {value}")
        if self.provider not in PROVIDERS:
            raise PMError(f"--provider: must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
