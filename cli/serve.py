"""`pmserve serve`: parses the options and calls pmserve.serving.server.serve. `register(app)` adds it to the app."""

from __future__ import annotations

from pathlib import Path

import typer

from pmserve import defaults as D


def register(app: typer.Typer) -> None:
    from pmserve.cli.main import user_errors  # here, not at import: main.py imports this module

    @app.command()
    @user_errors
    def serve(
        bundles: list[Path] = typer.Argument(
            None,
            metavar="BUNDLE",
            help="One or more BUNDLE folders (`pmserve export`); or none, with --repository.",
            show_default=False,
        ),
        repository: Path = typer.Option(
            None,
            "--repository",
            help="Serve every model folder of this repository (REPO/NAME/1, /2, ...: `pmserve export --new-version`) "
            "at its newest version that passes its checks, and swap to newer ones as they appear.",
        ),
        poll_s: float = typer.Option(
            D.SERVE_POLL_S,
            "--poll-s",
            help="With --repository: seconds between looks for new versions (0: never; load them through "
            "POST /v2/repository/models/NAME/load).",
        ),
        host: str = typer.Option(D.SERVE_HOST, help="Address to listen on (0.0.0.0 in a container)."),
        port: int = typer.Option(D.SERVE_PORT, help="Port to listen on (0 picks a free one)."),
        name: list[str] = typer.Option(
            [], "--name", help="Model name, once per bundle in order (default: the bundle folder's name)."
        ),
        max_batch: int = typer.Option(D.SERVE_MAX_BATCH, help="Most inputs in one model call."),
        max_wait_ms: float = typer.Option(
            D.SERVE_MAX_WAIT_MS,
            help="Longest wait for a batch to fill, in milliseconds (only under concurrency).",
        ),
        by_length: bool = typer.Option(
            D.SERVE_BY_LENGTH,
            "--by-length/--no-by-length",
            help="Split a gathered batch of texts into model calls of similar token counts (a call is padded "
            "to its longest text); --no-by-length runs it as one call.",
        ),
        provider: str = typer.Option(
            D.SERVE_PROVIDER, help="auto | cpu | cuda (ONNX Runtime execution provider)."
        ),
        max_inputs: int = typer.Option(D.SERVE_MAX_INPUTS, help="Most inputs in one request (413 past it)."),
        max_text_chars: int = typer.Option(
            D.SERVE_MAX_TEXT_CHARS, help="Longest text in characters (413 past it)."
        ),
        threads: int = typer.Option(
            D.SERVE_THREADS, help="ONNX Runtime intra-op threads (0: its default, one per core)."
        ),
        drain_timeout: float = typer.Option(
            D.SERVE_DRAIN_S, help="On SIGTERM, seconds to let in-flight requests finish before closing them."
        ),
        max_image_pixels: int = typer.Option(
            D.SERVE_MAX_IMAGE_PIXELS,
            help="Most pixels (width x height, read from the header before decoding) in one image (413 past it).",
        ),
        max_image_bytes: int = typer.Option(
            D.SERVE_MAX_IMAGE_BYTES,
            help="Most bytes in one encoded image; an image model's request body holds --max-inputs of them.",
        ),
        body_timeout_s: float = typer.Option(
            D.SERVE_BODY_TIMEOUT_S, help="Seconds a request body may take to arrive (408 past it)."
        ),
        load_timeout_s: float = typer.Option(
            D.SERVE_LOAD_TIMEOUT_S,
            help="With --repository: seconds a new version's check (in a child process) may take before it "
            "is refused.",
        ),
        max_prompt_tokens: int = typer.Option(
            D.SERVE_MAX_PROMPT_TOKENS, help="Decoder: most tokens in a prompt (400 past it)."
        ),
        max_new_tokens: int = typer.Option(
            D.SERVE_MAX_NEW_TOKENS, help="Decoder: most tokens a request may ask to generate (400 past it)."
        ),
        max_sequences: int = typer.Option(
            D.SERVE_MAX_SEQUENCES,
            help="Decoder: most requests generating at once, all in one batch (429 past it).",
        ),
        api_key: str = typer.Option(
            D.SERVE_API_KEY,
            envvar="PMSERVE_API_KEY",
            show_default=False,
            help="Require `Authorization: Bearer KEY` on every endpoint but /v2/health/* (env PMSERVE_API_KEY).",
        ),
        admin_key: str = typer.Option(
            D.SERVE_ADMIN_KEY,
            envvar="PMSERVE_ADMIN_KEY",
            show_default=False,
            help="With --repository: the key that load and unload need (env PMSERVE_ADMIN_KEY); without it they "
            "answer 403 unless the server listens on loopback only.",
        ),
    ):
        """Serve bundles over the Open Inference Protocol v2 (KServe v2 / Triton REST), with dynamic batching.

        POST /v2/models/NAME/infer takes a BYTES tensor `text` [N] (encoded images for image bundles) and returns
        `label` [N] and `scores` [N, classes], or `embedding` [N, dim] for an embedding bundle; POST /predict
        (classifiers) and POST /embed (embedding models) take {"inputs": [...]}; /metrics is Prometheus.
        With --repository, POST /v2/repository/index, /v2/repository/models/NAME/load and .../unload too.
        A decoder (causal-lm) bundle answers POST /v2/models/NAME/generate and .../generate_stream (KServe v2
        generate extension), and OpenAI's POST /v1/completions, /v1/chat/completions, GET /v1/models."""
        from pmserve.serving.config import ServeConfig
        from pmserve.serving.server import serve as run_server

        cfg = ServeConfig(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            by_length=by_length,
            max_inputs=max_inputs,
            max_text_chars=max_text_chars,
            provider=provider,
            threads=threads,
            drain_s=drain_timeout,
            poll_s=poll_s,
            max_image_pixels=max_image_pixels,
            max_image_bytes=max_image_bytes,
            body_timeout_s=body_timeout_s,
            load_timeout_s=load_timeout_s,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            max_sequences=max_sequences,
            api_key=api_key or None,
            admin_key=admin_key or None,
        )
        run_server(
            bundles or [],
            name,
            cfg,
            host,
            port,
            log=lambda m: typer.echo(f"pmserve: {m}", err=True),
            repository=repository,
        )
