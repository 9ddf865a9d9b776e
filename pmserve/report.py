"""Human-readable results: the accuracy-matrix table, its heat map, and side-by-side comparison of runs."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import PMError

GENERIC = re.compile(r"^(task|t)[-_]?\d+$", re.I)  # task names that need their labels to mean anything


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def print_run(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    acc = result["acc_matrix"]
    names = result["tasks"]
    head = result.get("head", "linear")
    what = "exact-match accuracy" if head == "exact" else f"{head} head: accuracy"  # a decoder run: exact
    t = Table(title=f"{result['method']} / {what} after each task")
    t.add_column("after")
    for n in names:
        t.add_column(n, justify="right")
    t.add_column("alpha", justify="right")
    for i, row in enumerate(acc):
        label = "joint" if result["method"] == "joint" else names[i]
        t.add_row(
            label, *[_fmt(a) for a in row], *[""] * (len(names) - len(row)), _fmt(result["alphas"][i], 4)
        )
    console.print(t)
    for name, labels in zip(names, result.get("task_labels") or []):
        if GENERIC.match(name):  # a folder name that says nothing: say what the task's classes are
            console.print(f"  {name}: {', '.join(labels)}")
    console.print(
        f"ACC {_fmt(result['ACC'])}   AAA {_fmt(result['AAA'])}   forgetting {_fmt(result['forgetting'])}   "
        f"{result['seconds']:.0f} s"
    )
    if result.get("nll_matrix"):  # a decoder run: the reference responses' NLL per token, after the last task
        console.print(f"NLL per response token after the last task: {_fmt(_mean(result['nll_matrix'][-1]))}")
    for h, m in result.get("by_head", {}).items():
        if h != result.get("head"):
            console.print(
                f"  {h} head: ACC {_fmt(m['ACC'])}   AAA {_fmt(m['AAA'])}   forgetting {_fmt(m['forgetting'])}"
            )


def write_heatmap(result: dict, path: Path) -> None:
    """A PNG heat map of acc[i][j], written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = result["acc_matrix"]
    n = len(result["tasks"])
    m = np.full((len(acc), n), np.nan)
    for i, row in enumerate(acc):
        m[i, : len(row)] = [np.nan if a is None else a for a in row]  # None: not evaluated
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.6 * len(acc)))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="w" if m[i, j] < 0.6 else "k",
                    fontsize=8,
                )
    ax.set_xticks(range(n), result["tasks"], rotation=45, ha="right")
    ax.set_yticks(range(len(acc)), ["joint"] if result["method"] == "joint" else result["tasks"][: len(acc)])
    ax.set_xlabel("test set")
    ax.set_ylabel("after training")
    ax.set_title(f"{result['method']}: ACC {result['ACC']:.3f}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def load_metrics(run: Path) -> dict:
    path = run / "metrics.json" if run.is_dir() else run
    if not path.is_file():
        raise PMError(f"{run}: no metrics.json (not a finished pmserve run)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PMError(f"{path}: unreadable ({e})") from None


def _warn(msg: str) -> None:
    print(f"pmserve: warning: {msg}", file=sys.stderr, flush=True)


def compare_runs(
    results: list[dict],
    names: list[str],
    plot: Path | None = None,
    console: Console | None = None,
    warn: Callable[[str], None] = _warn,
) -> None:
    """Print ACC / AAA / forgetting side by side. Refuse runs that differ in data; `warn` (one line each, by
    default `pmserve: warning: ...` on stderr) when their heads or their numbers of tasks differ, as the
    figures then measure different things."""
    console = console or Console()
    datas = {r["config"]["data"] for r in results}
    if len(datas) > 1:
        raise PMError(f"runs were trained on different data ({', '.join(sorted(datas))}); nothing to compare")
    heads = {r.get("head", "linear") for r in results}
    if len(heads) > 1:
        warn(f"runs use different heads ({', '.join(sorted(heads))}): compare methods with the same head")
    counts = [len(r["tasks"]) for r in results]
    if len(set(counts)) > 1:
        each = ", ".join(f"{name}: {n}" for name, n in zip(names, counts))
        warn(
            f"runs have different numbers of tasks ({each}): ACC, AAA and forgetting average over different tasks"
        )
    t = Table(title=f"data {datas.pop()}")
    for c in ("run", "method", "head", "ACC", "AAA", "forgetting", "alphas", "seconds"):
        t.add_column(c, justify="left" if c in ("run", "method", "head", "alphas") else "right")
    for name, r in zip(names, results):
        alphas = " ".join("-" if a is None else f"{a:.3g}" for a in r["alphas"])
        t.add_row(
            name,
            r["method"],
            r.get("head", "linear"),
            _fmt(r["ACC"]),
            _fmt(r["AAA"]),
            _fmt(r["forgetting"]),
            alphas,
            f"{r['seconds']:.0f}",
        )
    console.print(t)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        keys = ("ACC", "AAA", "forgetting")
        x = np.arange(len(keys))
        w = 0.8 / len(results)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, (name, r) in enumerate(zip(names, results)):
            ax.bar(x + k * w, [r[m] or 0 for m in keys], w, label=f"{r['method']} ({Path(name).name})")
        ax.set_xticks(x + w * (len(results) - 1) / 2, keys)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        tmp = plot.with_name(f".{plot.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(plot)
