"""`pmserve merge`: parses options, calls pmserve.merging.merge_adapters, prints. `register(app)` adds it."""

from __future__ import annotations

from pathlib import Path

import typer

from pmserve import defaults as D

from .options import parse_list


def register(app: typer.Typer) -> None:
    from pmserve.cli.main import user_errors  # here, not at import: main.py may import this module

    @app.command()
    @user_errors
    def merge(
        adapters: list[Path] = typer.Argument(
            ..., help="PEFT adapter folders in task order; a pmserve RUN stands for its task adapters."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write (must not exist)."),
        base: str = typer.Option(
            "",
            "--base",
            help="Base model folder, builtin:minilm or builtin:smollm2 (default: the one the adapters name).",
        ),
        method: str = typer.Option(
            D.MERGE_METHOD, help="pm | avg | linear | task-arithmetic | ties | dare-linear | dare-ties."
        ),
        weights: str = typer.Option(
            "", help="Comma-separated weight per adapter (linear, task-arithmetic, ties, dare-*; default 1)."
        ),
        density: float = typer.Option(
            D.MERGE_DENSITY,
            help=f"Fraction of each task vector kept by ties / dare-* (default {D.MERGE_DEFAULT_DENSITY}).",
        ),
        format: str = typer.Option(
            D.MERGE_FORMAT,
            "--format",
            help="delta (merged.safetensors: W_hat - W_0) | adapter (one PEFT LoRA) | full (HF model folder).",
        ),
        seed: int = typer.Option(
            D.MERGE_SEED,
            help="Seed of DARE's random pruning, of a builtin --data sequence and of its Fisher samples.",
        ),
        data: str = typer.Option(
            "",
            "--data",
            help="pm: tasks (a folder or builtin:..., as `pmserve train` takes) to compute the Fisher of adapters "
            "without fisher.safetensors; task t pairs with adapter t. Without it: the identity Hessian.",
        ),
        fisher_samples: int = typer.Option(
            D.MERGE_FISHER_SAMPLES, help="Training examples per task for the --data Fisher."
        ),
        fisher_labels: str = typer.Option(
            D.MERGE_FISHER_LABELS,
            help="Labels of the --data Fisher: sampled (from the model) | true, as `pmserve train`.",
        ),
        curvature: str = typer.Option(
            D.MERGE_CURVATURE,
            help="Scale of the --data Fisher: profile (each task's measured loss along its adapter, as `pmserve "
            "train`) | fisher (the paper's Fisher as it is).",
        ),
        calibrate: str = typer.Option(
            "",
            "--calibrate",
            help="Tasks (a folder or builtin:...) whose training data rebuilds the inference classifier with the "
            "merged model. Without it the adapters' classifiers are carried over (approximate).",
        ),
        calibrate_head: str = typer.Option(
            "", help="prototype | ridge for --calibrate (default: the carried classifier's kind, else ridge)."
        ),
        saved_modules: str = typer.Option(
            D.MERGE_SAVED_MODULES,
            "--saved-modules",
            help="PEFT modules_to_save (a SEQ_CLS adapter's classifier head): average (merged with the method's "
            "coefficients; adapters that disagree are refused) | drop (the base's are kept).",
        ),
        clip: bool = typer.Option(
            D.MERGE_CLIP,
            "--clip/--no-clip",
            help="Clip pm's alphas to [0, 1] (default: the run's setting, else on).",
        ),
        max_shard_size: str = typer.Option(
            D.MERGE_MAX_SHARD_SIZE, help="Largest weight file of --format full."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the summary."),
    ):
        """Merge LoRA adapters into one model: P&M's closed form or a peer method, streaming from the files."""
        from pmserve.merging import MergeOptions, merge_adapters, summary

        opts = MergeOptions(
            method=method,
            format=format,
            weights=parse_list(weights, "weights", float) or None,
            density=density,
            seed=seed,
            clip=clip,
            max_shard_size=max_shard_size,
            data=data or None,
            fisher_samples=fisher_samples,
            fisher_labels=fisher_labels,
            curvature=curvature,
            calibrate=calibrate or None,
            calibrate_head=calibrate_head or None,
            saved_modules=saved_modules,
        )
        report = merge_adapters(
            adapters, out, base or None, opts, log=(lambda *_: None) if quiet else typer.echo
        )
        typer.echo(summary(report))
        typer.echo(f"wrote {out}")
