"""`pmserve` commands. Each parses and validates its options, calls one library function, and prints.

Errors a user can cause (PMError) become one line on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer

from pmserve import defaults as D
from pmserve.errors import PMError

from .options import App, joined, parse_list

app = App(
    help="Continual LoRA fine-tuning with Perturb-and-Merge: train, compare, merge, export and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from pmserve import __version__

        typer.echo(f"pmserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    """Continual LoRA fine-tuning with Perturb-and-Merge: train, compare, merge, export and serve."""


def user_errors(fn):
    """Turn PMError into `pmserve: error: ...` and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PMError as e:
            from pmserve import distributed

            where = f"rank {distributed.rank()}: " if distributed.world() > 1 else ""
            typer.echo(f"pmserve: error: {where}{e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    data: str = typer.Argument(
        None,
        help="Folder of task folders (sorted), or a built-in sequence: builtin:wordnet-nouns | "
        "builtin:wordnet-verbs | builtin:digits | builtin:clinc150 (intents, one domain per task) | "
        "builtin:clinc150-gen (the same as instructions, for a decoder), with "
        "options as builtin:wordnet-nouns:tasks=10,classes=2 "
        "(also train=, test= examples per class). Not with --add; optional with --resume.",
    ),
    out: Path = typer.Option(Path("runs/run"), "--out", "-o", help="RUN folder to write."),
    model: str = typer.Option(
        D.TRAIN_MODEL,
        help="Local Hugging Face model folder, or builtin:minilm; for generative tasks a causal LM, e.g. "
        "builtin:smollm2 (decoders take their own defaults for options left alone: README).",
    ),
    method: str = typer.Option(D.TRAIN_METHOD, help="pm | merge | seq | avg | frozen | joint."),
    head: str = typer.Option(D.TRAIN_HEAD, help="Inference classifier: ridge | prototype | linear | cosine."),
    train_head: str = typer.Option(
        D.TRAIN_TRAIN_HEAD,
        help="Head LoRA trains against: linear | cosine (default: cosine with --head cosine, else linear).",
    ),
    rank: int = typer.Option(D.TRAIN_RANK, help="LoRA rank."),
    lora_alpha: float = typer.Option(
        D.TRAIN_LORA_ALPHA, help="LoRA alpha (scaling = alpha / rank); 0 means alpha = rank."
    ),
    target_modules: str = typer.Option(
        joined(D.TRAIN_TARGET_MODULES),
        help="Modules to adapt: all-linear (every linear layer of the transformer blocks) | key-value (the "
        "paper's attention key and value projections) | comma-separated names.",
    ),
    eps: float = typer.Option(D.TRAIN_EPS, help="Perturbation size: s in {1-eps, 1, 1+eps}."),
    perturb_per: str = typer.Option(D.TRAIN_PERTURB_PER, help="Draw s per 'step' or per 'sample'."),
    epochs: int = typer.Option(D.TRAIN_EPOCHS, help="Epochs per task."),
    batch_size: int = typer.Option(D.TRAIN_BATCH_SIZE, help="Batch size."),
    lr: float = typer.Option(D.TRAIN_LR, help="Learning rate of the LoRA factors."),
    head_lr: float = typer.Option(D.TRAIN_HEAD_LR, help="Learning rate of the heads."),
    max_length: int = typer.Option(D.TRAIN_MAX_LENGTH, help="Maximum tokens per text."),
    fisher_samples: int = typer.Option(
        D.TRAIN_FISHER_SAMPLES, help="Training samples for the diagonal Fisher."
    ),
    fisher_labels: str = typer.Option(
        D.TRAIN_FISHER_LABELS,
        help="Fisher labels: sampled (from the model: the true Fisher) | true (the empirical one).",
    ),
    curvature: str = typer.Option(
        D.TRAIN_CURVATURE,
        help="What alpha weighs tasks by: profile (the Fisher scaled to each task's measured loss along its "
        "task vector) | fisher (the paper's diagonal Fisher as it is).",
    ),
    ridge_dim: int = typer.Option(D.TRAIN_RIDGE_DIM, help="Random projection size of the ridge head."),
    ridge_lambda: float = typer.Option(
        D.TRAIN_RIDGE_LAMBDA, help="Ridge lambda; 0 chooses it after every task (--ridge-select)."
    ),
    ridge_select: str = typer.Option(
        D.TRAIN_RIDGE_SELECT,
        help="How ridge's lambda is chosen: gcv (generalised cross-validation on every class seen) | holdout "
        "(on 20% of the current task's data).",
    ),
    ridge_drift: str = typer.Option(
        D.TRAIN_RIDGE_DRIFT,
        help="linear: after every merge, ridge's stored statistics follow the backbone through the drift seen on "
        "the new task's features, as far as it carries from class to class | none: they stay as computed.",
    ),
    reject: float = typer.Option(
        D.TRAIN_REJECT,
        help="Out-of-scope rejection (--head ridge): answer '<out of scope>' where a request's fit (its largest "
        "cosine with a known class's features) is below a threshold that keeps this share of each task's "
        "in-scope training answers (leave-one-out), e.g. 0.99; 0 turns it off.",
    ),
    gate: bool = typer.Option(
        D.TRAIN_GATE,
        "--gate/--no-gate",
        help="Hold out 20% of each task's training data and keep the task's update (scaled 1, 0.5 or 0) only "
        "as far as it pays there; the choice goes into the task's task.json.",
    ),
    eval_heads: str = typer.Option(
        joined(D.TRAIN_EVAL_HEADS),
        help="More inference classifiers to measure side by side, e.g. prototype,ridge.",
    ),
    seed: int = typer.Option(
        D.TRAIN_SEED, help="Seed: class order, initialisation, shuffling, perturbation draws."
    ),
    device: str = typer.Option(D.TRAIN_DEVICE, help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)."),
    kernel: str = typer.Option(
        D.TRAIN_KERNEL, help="LoRA kernel: torch | auto (fused where measured faster: nowhere yet) | triton."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the interrupted run in --out after its last finished task, with its own options.",
    ),
    add: list[Path] = typer.Option(
        None,
        "--add",
        help="Task folder (or folder of task folders) to append to the finished RUN in --out and train, with the "
        "RUN's options; repeat for several. Only the new tasks' data is read.",
    ),
    keep_test: bool = typer.Option(
        D.TRAIN_KEEP_TEST,
        "--keep-test/--no-keep-test",
        help="Copy each task's test split into the RUN, so later tasks and `pmserve eval` need no data folder.",
    ),
    keep_fisher: bool = typer.Option(
        D.TRAIN_KEEP_FISHER,
        "--keep-fisher/--no-keep-fisher",
        help="Keep each task's Fisher (one weight-sized file per task), for `pmserve merge --method pm` of "
        "other subsets of the tasks.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    nproc: int = typer.Option(
        0, help="Run as N processes on this machine under torchrun (one per GPU); --batch-size is global."
    ),
):
    """Train LoRA adapters task after task and merge them into one model (Perturb-and-Merge)."""
    from pmserve import distributed

    if nproc:
        if nproc < 1 or distributed.world() > 1:
            raise PMError(f"--nproc: must be at least 1 and not given under torchrun, got {nproc}")
        distributed.check_batch(batch_size, nproc)  # before starting any process
        typed = {**_typed(ctx, ctx.params), "data": data, "out": out}  # the workers see what was typed
        distributed.launch(nproc, _train_argv(typed))
        return
    from pmserve.report import print_run, write_heatmap
    from pmserve.train import TrainConfig, add_tasks, continued_config
    from pmserve.train import train as run_train

    lists = {"target_modules": "target-modules", "eval_heads": "eval-heads"}
    options = {
        k: parse_list(v, lists[k]) if k in lists else v
        for k, v in ctx.params.items()
        if k not in ("out", "resume", "add", "quiet", "nproc")
    }
    if add:
        if data is not None:
            raise PMError(
                "DATA: not with --add (the new tasks are the --add folders; the RUN keeps its data)"
            )
        if resume:
            raise PMError("--resume: not with --add (--add continues a finished RUN)")
        result = add_tasks(out, add, _typed(ctx, options), progress=not quiet)
    elif resume:
        cfg, _ = continued_config(out, _typed(ctx, options))
        result = run_train(cfg, out, resume=True, progress=not quiet)
    else:
        if data is None:
            raise PMError("DATA: missing (a folder of task folders or builtin:...)")
        cfg = TrainConfig(**options, given=frozenset(_typed(ctx, options)))  # decoder_config reads `given`
        result = run_train(cfg, out, progress=not quiet)
    if distributed.is_main():
        write_heatmap(result, out / "acc_matrix.png")
        print_run(result)
        typer.echo(f"wrote {out}")


def _typed(ctx: typer.Context, options: dict) -> dict:
    """The options typed on the command line (not left at their defaults): what --add and --resume check, and
    what a decoder run keeps rather than taking the decoders' defaults."""

    def typed(k: str) -> bool:  # by name: typer may carry its own copy of click's enum
        return getattr(ctx.get_parameter_source(k), "name", "") in ("COMMANDLINE", "ENVIRONMENT")

    return {k: v for k, v in options.items() if v is not None and typed(k)}


def _train_argv(params: dict) -> list[str]:
    """`train` with the same options, less --nproc: what each torchrun worker runs."""
    argv = ["train"] + ([params["data"]] if params.get("data") is not None else [])
    for name, value in params.items():
        option = "--" + name.replace("_", "-")
        if name in ("data", "nproc") or value is None:
            continue
        if name in ("keep_test", "keep_fisher"):  # --x/--no-x flags
            argv.append(option if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, bool):
            argv += [option] if value else []
        elif isinstance(value, list):
            argv += [x for v in value for x in (option, str(v))]
        else:
            argv += [option, str(value)]
    return argv


@app.command()
@user_errors
def compare(
    runs: list[Path] = typer.Argument(..., help="RUN folders to compare."),
    plot: Path = typer.Option(None, help="Also draw ACC / AAA / forgetting as a PNG bar chart here."),
):
    """Print the runs' ACC, AAA and forgetting side by side."""
    from pmserve.report import compare_runs, load_metrics

    results = [load_metrics(r) for r in runs]
    compare_runs(results, [str(r) for r in runs], plot)


def _register_commands() -> None:
    from pmserve.cli.deploy import register as deploy
    from pmserve.cli.merge import register as merge
    from pmserve.cli.serve import register as serve

    merge(app)
    deploy(app)
    serve(app)


_register_commands()


def main() -> int:
    """Entry point: usage errors (a non-numeric option, a missing argument) also get one line and exit 2."""
    try:  # typer >= 0.20 vendors click
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError

    try:
        rv = app(prog_name="pmserve", standalone_mode=False)
    except UsageError as e:
        if e.format_message():  # empty when the help was shown for a bare `pmserve`
            typer.echo(f"pmserve: error: {e.format_message()}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("pmserve: aborted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
