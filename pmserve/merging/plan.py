"""The plan of a merge: what to compute for every module, as pure data, and the planner that decides it.

A MergePlan holds numbers and names only (the method, per-task alphas or weights, the effective coefficients,
where the Fisher came from, notes); the executor (execute.py) turns it into tensors module by module and the
writers (write.py) into files. For pm the planner needs one streaming pass over the task vectors to get the
alphas (gram.pm_alphas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..defaults import (
    MERGE_CURVATURE,
    MERGE_DEFAULT_DENSITY,
    MERGE_FISHER_LABELS,
    MERGE_FISHER_SAMPLES,
    MERGE_FORMAT,
    MERGE_MAX_SHARD_SIZE,
    MERGE_METHOD,
    MERGE_SAVED_MODULES,
    MERGE_SEED,
)
from ..errors import PMError
from ..formats import read_json
from ..formats import run as run_files
from ..formats.peft import AdapterInput
from ..task_fisher import check_fisher_labels
from ..tensor_io import parse_size
from .classifier import CALIBRATE_HEADS
from .curvature import CURVATURES
from .gram import data_fisher, pm_alphas
from .inputs import Inputs
from .methods import MERGE_METHODS, MergeMethod
from .recurrence import effective_coefficients, task_alpha
from .saved import SAVED_POLICIES, SavedMerge, plan_saved, saved_note

FORMATS = ("delta", "adapter", "full")


@dataclass
class MergeOptions:
    """`pmserve merge`'s options; recorded in merge_report.json."""

    method: str = MERGE_METHOD
    format: str = MERGE_FORMAT
    weights: list[float] | None = None
    density: float | None = None  # None: MERGE_DEFAULT_DENSITY for the methods that prune
    seed: int = MERGE_SEED
    clip: bool | None = None  # None: the RUN's clip_alpha when the adapters come from one, else True
    max_shard_size: str = MERGE_MAX_SHARD_SIZE
    data: str | None = None  # pm: tasks to compute missing Fishers from (task t pairs with adapter t)
    fisher_samples: int = MERGE_FISHER_SAMPLES
    fisher_labels: str = MERGE_FISHER_LABELS  # as TrainConfig.fisher_labels
    curvature: str = MERGE_CURVATURE  # of the --data Fisher, as TrainConfig.curvature
    calibrate: str | None = None  # tasks to recompute the inference classifier on, with the merged model
    calibrate_head: str | None = None  # prototype | ridge (default: the carried kind, else ridge)
    saved_modules: str = MERGE_SAVED_MODULES  # PEFT modules_to_save: average (merged) | drop

    def validate(self, n_tasks: int | None = None) -> None:
        if self.method not in MERGE_METHODS:
            raise PMError(
                f"--method: unknown method {self.method!r} (choose from {', '.join(MERGE_METHODS)})"
            )
        if self.format not in FORMATS:
            raise PMError(f"--format: unknown format {self.format!r} (choose from {', '.join(FORMATS)})")
        m = MERGE_METHODS[self.method]
        if self.format == "adapter" and not m.linear:
            raise PMError(
                f"--format adapter: {m.name} is not a weighted sum of the task LoRAs, so no adapter reproduces it; "
                "use --format delta or full"
            )
        if self.weights is not None:
            if not m.uses_weights:
                raise PMError(
                    f"--weights: {m.name} sets its own coefficients; weights apply to the other methods"
                )
            if n_tasks is not None and len(self.weights) != n_tasks:
                raise PMError(f"--weights: {len(self.weights)} given for {n_tasks} adapters")
            if not all(map(_finite, self.weights)):
                raise PMError("--weights: must be finite numbers")
            if m.normalise and sum(self.weights) == 0:
                raise PMError("--weights: linear divides by their sum, which is 0")
        if self.density is not None:
            if not m.uses_density:
                raise PMError(
                    f"--density: {m.name} does not prune (density applies to ties, dare-linear, dare-ties)"
                )
            if not 0.0 < self.density <= 1.0:
                raise PMError(f"--density: must be in (0, 1], got {self.density}")
        if self.data is not None and m.name != "pm":
            raise PMError(f"--data: only pm uses a Fisher; {m.name} does not read data")
        if self.calibrate_head and self.calibrate_head not in CALIBRATE_HEADS:
            raise PMError(
                f"--calibrate-head: unknown head {self.calibrate_head!r} (choose from {', '.join(CALIBRATE_HEADS)})"
            )
        if self.calibrate_head and not self.calibrate:
            raise PMError("--calibrate-head: only with --calibrate DATA")
        if self.saved_modules not in SAVED_POLICIES:
            raise PMError(
                f"--saved-modules: unknown policy {self.saved_modules!r} (choose from {', '.join(SAVED_POLICIES)})"
            )
        if self.fisher_samples < 1:
            raise PMError(f"--fisher-samples: must be at least 1, got {self.fisher_samples}")
        check_fisher_labels(self.fisher_labels)
        if self.curvature not in CURVATURES:
            raise PMError(f"--curvature: must be {' or '.join(CURVATURES)}, got {self.curvature!r}")
        parse_size(self.max_shard_size)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@dataclass
class MergePlan:
    """What to compute for every module: per-task alphas or weights, and the effective coefficients."""

    method: MergeMethod
    alphas: list[float] | None  # sequential methods: alpha_t
    weights: list[float] | None  # weighted methods: w_t (normalised for linear)
    coefficients: list[float] | None  # linear methods: D = sum_t c_t Delta_t
    fisher: str | None  # pm: "files", "data", "files+data", "identity" or "run" (the alphas a RUN recorded)
    clip: bool
    density: float | None
    seed: int  # DARE's random pruning
    notes: list[str]
    saved: list[SavedMerge] = field(default_factory=list)  # PEFT modules_to_save: rule and coefficients each


def recorded_alphas(ads: list[AdapterInput]) -> list[float] | None:
    """The alphas a RUN recorded, when the adapters are its tasks 0, 1, ... in order (what it merged);
    else None. With them a RUN that keeps no Fisher files still merges exactly as it trained."""
    runs = {run_files.run_of_task(a.path) for a in ads}
    if len(runs) != 1 or None in runs:
        return None
    infos = [read_json(a.path / run_files.TASK_INFO) for a in ads]
    if [i.get("index") for i in infos] != list(range(len(ads))):
        return None
    alphas = [i.get("alpha") for i in infos]
    return alphas if all(isinstance(x, (int, float)) for x in alphas) else None


def plan_merge(inputs: Inputs, opts: MergeOptions, log: Callable[[str], None]) -> MergePlan:
    method = MERGE_METHODS[opts.method]
    ads = inputs.adapters
    notes: list[str] = []
    run_clip = {(a.run_config or {}).get("clip_alpha") for a in ads} - {None}
    clip = opts.clip if opts.clip is not None else (run_clip.pop() if len(run_clip) == 1 else True)
    alphas = weights = coefficients = None
    fisher = None
    if method.sequential:
        trained = {a.meta.get("method") for a in ads if a.kind == "chained"} - {None}
        family = {"pm": {"pm", "merge"}, "avg": {"avg"}}[method.name]
        if trained - family:
            notes.append(
                f"the chained adapters were trained with --method {', '.join(sorted(trained))}; merging them with "
                f"{method.name} gives a model their run never evaluated"
            )
        if method.name == "pm":
            missing = [a for a in ads if a.fisher is None]
            fisher_for = None
            if not missing:
                fisher = "files"
                if opts.data:
                    notes.append("--data not used: every adapter has its fisher.safetensors")
            elif not opts.data and (recorded := recorded_alphas(ads)) is not None:
                fisher = "run"
                alphas = recorded
                for a in ads:
                    a.fisher_source = "run"
                notes.append(
                    "the RUN's own alphas (its task.json files): the adapters are tasks 0.. of one RUN, which keeps "
                    "no Fisher files (train with --keep-fisher, or give --data, to compute them again)"
                )
                log(f"note: {notes[-1]}")
            elif opts.data:
                fisher = "data" if len(missing) == len(ads) else "files+data"
                fisher_for = data_fisher(
                    inputs, opts.data, opts.seed, opts.fisher_samples, opts.fisher_labels, opts.curvature
                )
                notes.append(
                    f"{len(missing)} of {len(ads)} adapters have no fisher.safetensors: their Fisher is computed "
                    f"from --data {opts.data} with a prototype head fitted on their own features"
                )
                log(f"note: {notes[-1]}")
            else:
                fisher = "identity"
                for a in ads:
                    a.fisher_source = "identity"
                notes.append(
                    f"no fisher.safetensors in {missing[0].path}: pm falls back to the identity Hessian (F = 1), "
                    "the closed form of plain squared distance (for independent adapters that is their average); "
                    "give --data to compute the Fisher"
                )
                log(f"note: {notes[-1]}")
            if fisher != "run":
                alphas = pm_alphas(inputs, fisher == "identity", clip, log, fisher_for)
        else:
            alphas = [task_alpha(method.name, t, {}, {}) for t in range(1, len(ads) + 1)]
        coefficients = effective_coefficients([a.kind for a in ads], alphas)
    else:
        w = [float(x) for x in (opts.weights or [1.0] * len(ads))]
        weights = [x / sum(w) for x in w] if method.normalise else w
        if method.linear:
            coefficients = list(weights)
        if any(a.kind == "chained" for a in ads):
            notes.append(
                f"{method.name} takes each chained adapter's Delta_t as its task vector, relative to the model it "
                "was trained on"
            )
    density = (
        (opts.density if opts.density is not None else MERGE_DEFAULT_DENSITY) if method.uses_density else None
    )
    saved = plan_saved(inputs.saved, method, coefficients, weights)
    if (note := saved_note(saved)) is not None:
        notes.append(note)
    return MergePlan(method, alphas, weights, coefficients, fisher, clip, density, opts.seed, notes, saved)
