"""`pmserve merge`: merge LoRA adapter files into one model, on files alone, one module at a time.

Inputs are PEFT adapter folders in task order; a pmserve RUN stands for its task adapters. Two kinds of sequence:
- chained: adapters `pmserve train` wrote (pmserve_adapter.json, kind "chained"): task t was trained on the
  previous merged model, so theta*_t = W_hat_{t-1} + Delta_t;
- independent: any other PEFT adapter, trained from the base: theta*_t = W_0 + Delta_t.
Both follow W_hat_t = (1 - alpha_t) W_hat_{t-1} + alpha_t theta*_t. With D = W_hat - W_0 that is
D_t = D_{t-1} + alpha_t (theta*_t - W_hat_{t-1}), so the result is always sum_t c_t Delta_t for per-task effective
coefficients c_t, which is what the `adapter` output stores (task LoRAs concatenated, B_t scaled by c_t).

The maths is pmserve.merge's, the code `pmserve train` runs after every task: lora_delta (Delta_t = scaling B A in
fp32), FisherSums, alpha_terms, closed_form_alpha, task_alpha, merge_step. An offline `pm` merge of a run's
adapters therefore replays the run's merges operation for operation and ends with its alphas and merged weights.

Streaming: alpha_t is one number over every adapted module, and it depends on W_hat_{t-1}, which depends on the
alphas before it. Rather than holding W_hat, S_F and S_Ft for the whole model, note that all of them are linear
combinations of the task vectors, so the closed form needs only the Fisher-weighted Gram matrices
H^k_ij = <Delta_i, F_k Delta_j> summed over modules (T x T numbers per Fisher). One pass over the modules computes
them, each Fisher read once, in row blocks of the weight; the recurrence then replays on T x T matrices
(gram_alphas) and a second pass writes the output. Memory stays a few blocks of T x 8M numbers whatever the model
size; compute is one T x T Gram product per module and Fisher (one in all for the identity Hessian). Every other
method needs one pass. The peer methods (task arithmetic, TIES, DARE) are PEFT's merge_utils over Delta_t.

The Fisher of pm: each adapter's fisher.safetensors (what `pmserve train` writes); for adapters without one,
computed from --data (task t's training data at theta*_t, task_fisher.DataFisher, held in memory: it needs the
whole model loaded anyway), else the identity Hessian F = 1, said in the output and in merge_report.json.

Everything is checked before anything is written (base identity, target modules, missing or corrupt files,
NaN/Inf, shapes), and OUT is written as a hidden temporary folder beside it and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import base_fingerprint
from .backbone import resolve_model
from .errors import PMError
from .merge import closed_form_alpha, lora_delta, merge_step, task_alpha
from .merge_classifier import CALIBRATE_HEADS, calibration_tasks, write_classifier
from .tensor_io import (
    FLOATS,
    InMemoryTensors,
    LazyTensors,
    ModelWeights,
    SafetensorsWriter,
    TensorSpec,
    parse_size,
    sha256_file,
)

FORMATS = ("delta", "adapter", "full")
KINDS = ("chained", "independent")
DEFAULT_DENSITY = 0.5
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
TASK_FOLDER = re.compile(r"^(\d+)-.+")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


# ---------------------------------------------------------------- merge methods


@dataclass(frozen=True)
class MergeMethod:
    """One way to merge task vectors; the CLI and the report know methods only through MERGE_METHODS.

    `sequential` methods run the convex merge task after task with an alpha_t per task (the adapters' kinds
    decide theta*_t); the others combine the task vectors Delta_t with per-task weights, optionally sparsified
    to --density (`magnitude`: TIES, `random`: DARE, rescaled) and with TIES' sign consensus.
    """

    name: str
    help: str
    sequential: bool = False
    normalise: bool = False
    sparsify: str | None = None
    consensus: bool = False

    @property
    def linear(self) -> bool:
        """The result is sum_t c_t Delta_t, so an adapter of concatenated task LoRAs reproduces it exactly."""
        return self.sparsify is None and not self.consensus

    @property
    def uses_weights(self) -> bool:
        return not self.sequential

    @property
    def uses_density(self) -> bool:
        return self.sparsify is not None


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "pm",
            "closed-form P&M alphas from the Fisher files (identity Hessian without them)",
            sequential=True,
        ),
        MergeMethod(
            "avg",
            "alpha_t = 1/t: the running average (the plain average of independent adapters)",
            sequential=True,
        ),
        MergeMethod(
            "linear", "weighted average of the task vectors (weights normalised to sum 1)", normalise=True
        ),
        MergeMethod("task-arithmetic", "weighted sum of the task vectors (PEFT task_arithmetic)"),
        MergeMethod(
            "ties",
            "TIES: magnitude pruning, sign election, disjoint mean (PEFT ties)",
            sparsify="magnitude",
            consensus=True,
        ),
        MergeMethod(
            "dare-linear",
            "DARE: random pruning with rescaling, weighted sum (PEFT dare_linear)",
            sparsify="random",
        ),
        MergeMethod(
            "dare-ties",
            "DARE pruning + TIES sign consensus (PEFT dare_ties)",
            sparsify="random",
            consensus=True,
        ),
    )
}


def combine_task_vectors(
    task_tensors: list[torch.Tensor], weights: torch.Tensor, method: MergeMethod, density: float
) -> torch.Tensor:
    """One module's merged delta under a weighted method, composed from PEFT's merge_utils.

    Sparsify each task vector (magnitude: keep the top `density` fraction by |value|; random: keep each value
    with probability `density` and divide by it), weight them, then either sum or, with consensus, keep per
    element only the values agreeing with the weighted-sum sign of the sparsified vectors and average them.
    Equal to peft.utils.merge_utils.{task_arithmetic, ties, dare_linear, dare_ties} with the same random state.
    """
    from peft.utils import merge_utils as mu

    if method.sparsify and density < 1.0:
        rescale = method.sparsify == "random"
        task_tensors = [mu.prune(t, density, method=method.sparsify, rescale=rescale) for t in task_tensors]
    stacked = torch.stack(task_tensors, dim=0)
    weighted = stacked * mu.reshape_weight_task_tensors(stacked, weights.to(stacked.dtype))
    if method.consensus:
        return mu.disjoint_merge(weighted, mu.calculate_majority_sign_mask(stacked, method="total"))
    return weighted.sum(dim=0)


def sequence_step(merged: torch.Tensor | None, delta: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """D_t from D_{t-1} (None for D_0 = 0): W_hat_t = (1 - alpha) W_hat_{t-1} + alpha theta*_t.

    chained: theta*_t - W_hat_{t-1} = Delta_t; independent: theta*_t - W_hat_{t-1} = Delta_t - D_{t-1}.
    """
    step = delta if kind == "chained" or merged is None else delta - merged
    prev = {} if merged is None else {"m": merged}
    return merge_step(prev, {"m": step}, alpha)["m"]


def effective_coefficients(kinds: list[str], alphas: list[float]) -> list[float]:
    """c_t with D_T = sum_t c_t Delta_t: an independent step scales every earlier coefficient by (1 - alpha_t)."""
    c: list[float] = []
    for kind, a in zip(kinds, alphas):
        if kind == "independent" and c:
            c = [x * (1.0 - a) for x in c]
        c.append(a)
    return c


# ---------------------------------------------------------------- inputs


@dataclass
class LoraModule:
    a_key: str
    b_key: str
    rank: int
    scaling: float


@dataclass
class AdapterInput:
    """One PEFT LoRA adapter folder, its header read and checked; tensors are read only when asked for."""

    path: Path
    name: str
    kind: str
    config: dict
    meta: dict
    tensors: LazyTensors
    modules: dict[str, LoraModule]
    fan_in_fan_out: bool
    fisher: LazyTensors | None
    run_config: dict | None
    ignored: list[str] = field(default_factory=list)
    fisher_source: str | None = None  # "files", "data" (computed from --data) or "identity"

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.modules[module]
        return self.tensors.get(m.a_key), self.tensors.get(m.b_key)

    def delta(self, module: str) -> torch.Tensor:
        """Delta_t of one module in the base weight's layout, fp32 (merge.lora_delta, as training computes it)."""
        return self.delta_rows(module, 0, None).contiguous()

    def delta_rows(self, module: str, start: int, stop: int, factors=None) -> torch.Tensor:
        """Rows start:stop of delta(module), computed from the factors' matching slice alone."""
        a, b = factors or self.factors(module)
        s = self.modules[module].scaling
        return (
            lora_delta(a[:, start:stop], b, s).T if self.fan_in_fan_out else lora_delta(a, b[start:stop], s)
        )

    def delta_shape(self, module: str) -> tuple[int, int]:
        """The shape of delta(module): the base weight's."""
        m = self.modules[module]
        (_, i), (o, _) = self.tensors.shapes[m.a_key], self.tensors.shapes[m.b_key]
        return (i, o) if self.fan_in_fan_out else (o, i)

    def fisher_of(self, module: str) -> torch.Tensor:
        return self.fisher.get(module).float()

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels") or [])


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise PMError(f"{path}: unreadable ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise PMError(f"{path}: bad JSON ({e})") from None
    if not isinstance(obj, dict):
        raise PMError(f"{path}: expected a JSON object")
    return obj


def _pattern_value(patterns: dict, module: str, default):
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key  # imports transformers: only when there are patterns

    return patterns.get(get_pattern_key(list(patterns), module), default)


def expand_inputs(paths: list[Path | str]) -> list[Path]:
    """Adapter folders in task order: each path is an adapter folder or a RUN (its finished task adapters)."""
    if not paths:
        raise PMError("ADAPTER_DIR: give at least one adapter folder or RUN")
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise PMError(f"{p}: does not exist or is not a folder")
        if (p / "adapter_config.json").is_file():
            out.append(p)
        elif (p / "config.json").is_file() and (p / "tasks").is_dir():
            folders = [d for d in (p / "tasks").iterdir() if d.is_dir() and TASK_FOLDER.match(d.name)]
            folders.sort(key=lambda d: int(TASK_FOLDER.match(d.name).group(1)))
            found = [
                d for d in folders if (d / "task.json").is_file() and (d / "adapter_config.json").is_file()
            ]
            if not found:
                raise PMError(
                    f"{p}: a pmserve RUN without task adapters (a --method frozen run, or no finished task)"
                )
            out += found
        else:
            raise PMError(
                f"{p}: neither a PEFT adapter folder (adapter_config.json) nor a pmserve RUN (tasks/)"
            )
    return out


def read_adapter(path: Path) -> AdapterInput:
    """Read and check one adapter folder's config, metadata and tensor headers (not the tensors themselves)."""
    cfg_path = path / "adapter_config.json"
    cfg = _read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PMError(f"{cfg_path}: a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        raise PMError(f"{cfg_path}: a DoRA adapter; its magnitude vector does not merge linearly")
    r, lora_alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(lora_alpha, (int, float)):
        raise PMError(f"{cfg_path}: needs an integer r >= 1 and a number lora_alpha")
    file = path / "adapter_model.safetensors"
    if not file.is_file() and (path / "adapter_model.bin").is_file():
        raise PMError(
            f"{path / 'adapter_model.bin'}: only safetensors adapters are read; re-save with safe_serialization=True"
        )
    tensors = LazyTensors(file)  # reopened per tensor: a mapping held open keeps what it touched resident
    meta_path = path / "pmserve_adapter.json"
    meta = _read_json(meta_path) if meta_path.exists() else {}
    kind = meta.get("kind", "independent")
    if kind not in KINDS:
        raise PMError(f"{meta_path}: kind must be chained or independent, got {kind!r}")

    found: dict[str, dict[str, str]] = {}
    ignored = []
    for key in tensors.keys():
        m = LORA_KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise PMError(
                    f"{file}: {key} is not a linear LoRA factor (embedding LoRA and DoRA are not merged)"
                )
            ignored.append(key)  # modules_to_save, biases: not part of any task vector
            continue
        module = m.group("module")
        module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        if m.group("ab") in found.setdefault(module, {}):
            raise PMError(
                f"{file}: two lora_{m.group('ab')} tensors for {module} (several adapters in one file?)"
            )
        found[module][m.group("ab")] = key
    if not found:
        raise PMError(f"{file}: holds no LoRA factors (no *.lora_A.weight / *.lora_B.weight)")

    modules = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise PMError(
                f"{file}: {module} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}"
            )
        sa, sb = tensors.shapes[ab["A"]], tensors.shapes[ab["B"]]
        if len(sa) != 2 or len(sb) != 2:
            raise PMError(f"{file}: {module} is not a linear LoRA (factor shapes {list(sa)}, {list(sb)})")
        if sa[0] != sb[1]:
            raise PMError(f"{file}: {module}'s lora_A {list(sa)} and lora_B {list(sb)} have different ranks")
        for k in ab.values():
            if tensors.dtypes[k] not in FLOATS:
                raise PMError(f"{file}: {k} is {tensors.dtypes[k]}, not a floating-point tensor")
        rank = _pattern_value(cfg.get("rank_pattern") or {}, module, r)
        if rank != sa[0]:
            raise PMError(f"{file}: {module} has rank {sa[0]}, but {cfg_path.name} says {rank}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, lora_alpha)
        scaling = alpha / rank**0.5 if cfg.get("use_rslora") else alpha / rank  # as peft's LoraLayer sets it
        modules[module] = LoraModule(ab["A"], ab["B"], rank, scaling)

    fisher = None
    if (path / "fisher.safetensors").exists():
        fisher = LazyTensors(path / "fisher.safetensors")
        if set(fisher.keys()) != set(modules):
            extra = sorted(set(fisher.keys()) ^ set(modules))
            raise PMError(f"{fisher.path}: its modules differ from the adapter's (e.g. {extra[0]})")
    run_config = None
    if path.parent.name == "tasks" and (path.parent.parent / "config.json").is_file():
        try:
            run_config = json.loads((path.parent.parent / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            run_config = None
    name = str(meta.get("name") or path.name)
    return AdapterInput(
        path,
        name,
        kind,
        cfg,
        meta,
        tensors,
        modules,
        bool(cfg.get("fan_in_fan_out")),
        fisher,
        run_config,
        ignored,
        "files" if fisher is not None else None,
    )


@dataclass
class BaseModel:
    spec: str
    folder: Path
    fingerprint: str
    weights: ModelWeights

    def key_for(self, module: str, where: Path) -> str:
        """The base tensor that `module`'s LoRA adapts: `module.weight`, allowing for a wrapper prefix either side
        (an adapter trained on BertForSequenceClassification names `bert.encoder...`, a BertModel base `encoder...`)."""
        exact = f"{module}.weight"
        if exact in self.weights:
            return exact
        hits = [k for k in self.weights.keys() if k.endswith("." + exact) or exact.endswith("." + k)]
        if len(hits) != 1:
            what = "no" if not hits else f"{len(hits)} candidate"
            raise PMError(f"{where}: {module} has {what} weight in the base model {self.folder}")
        return hits[0]


def resolve_base(spec: str | None, adapters: list[AdapterInput]) -> BaseModel:
    """--base, or the local base model the adapters name (pmserve metadata, the RUN's config, PEFT's config)."""
    if not spec:
        for a in adapters:
            for cand in (
                a.meta.get("base_model"),
                (a.run_config or {}).get("model"),
                a.config.get("base_model_name_or_path"),
            ):
                if cand and (str(cand).startswith("builtin:") or Path(cand).is_dir()):
                    spec = str(cand)
                    break
            if spec:
                break
        if not spec:
            raise PMError("--base: not given, and the adapters name no base model folder on this machine")
    folder = resolve_model(spec)
    return BaseModel(spec, folder, base_fingerprint(folder), ModelWeights(folder))


@dataclass
class Inputs:
    """Adapters checked against each other and against the base; `keys` maps each module to its base tensor."""

    adapters: list[AdapterInput]
    base: BaseModel
    modules: list[str]  # natural order: layer 2 before layer 10
    keys: dict[str, str]
    warnings: list[str]


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def check_inputs(adapters: list[AdapterInput], base: BaseModel) -> Inputs:
    """Everything that can be wrong with the inputs, found before anything is written: one PMError naming the file."""
    notes: list[str] = []
    first = adapters[0]
    for a in adapters:
        fp = a.meta.get("base_fingerprint")
        if fp and fp != base.fingerprint:
            raise PMError(
                f"{a.path / 'pmserve_adapter.json'}: made for another base model "
                f"(fingerprint {fp}; {base.spec} has {base.fingerprint})"
            )
        if set(a.modules) != set(first.modules):
            diff = sorted(set(a.modules) ^ set(first.modules), key=natural_key)
            raise PMError(
                f"{a.tensors.path}: inconsistent target modules: {diff[0]} is adapted in only one of "
                f"{first.path} and {a.path}"
            )
        if a.fan_in_fan_out != first.fan_in_fan_out:
            raise PMError(f"{a.path / 'adapter_config.json'}: fan_in_fan_out differs from {first.path}'s")
        if a.ignored:
            notes.append(
                f"{a.path}: ignored {len(a.ignored)} tensors that are not LoRA factors (e.g. {a.ignored[0]})"
            )
    modules = sorted(first.modules, key=natural_key)
    keys = {m: base.key_for(m, first.tensors.path) for m in modules}
    for a in adapters:
        for m in modules:
            shape = tuple(base.weights.shape(keys[m]))
            mod = a.modules[m]
            (_, i), (o, _) = a.tensors.shapes[mod.a_key], a.tensors.shapes[mod.b_key]
            dshape = (i, o) if a.fan_in_fan_out else (o, i)
            if dshape != shape:
                raise PMError(
                    f"{a.tensors.path}: {m} makes a {list(dshape)} update, but the base's {keys[m]} is {list(shape)}"
                )
            for k in (mod.a_key, mod.b_key):
                if not torch.isfinite(a.tensors.get(k)).all():
                    raise PMError(f"{a.tensors.path}: {k} holds NaN or Inf")
            if a.fisher is not None:
                if tuple(a.fisher.shapes[m]) != shape:
                    raise PMError(
                        f"{a.fisher.path}: {m} is {list(a.fisher.shapes[m])}, the base's weight {list(shape)}"
                    )
                f = a.fisher.get(m)
                if not torch.isfinite(f).all():
                    raise PMError(f"{a.fisher.path}: {m} holds NaN or Inf")
                if (f < 0).any():
                    raise PMError(f"{a.fisher.path}: {m} has negative entries (a diagonal Fisher cannot)")
                del f
    chained = [a for a in adapters if a.kind == "chained"]
    if chained:
        runs = {a.path.parent for a in chained}
        order = [a.meta.get("task") for a in adapters]
        if len(chained) != len(adapters) or len(runs) != 1 or order != list(range(len(adapters))):
            notes.append(
                "chained adapters that are not one RUN's tasks 0..T-1 in order: each was trained on its own run's "
                "merged model, which this merge does not rebuild"
            )
    return Inputs(adapters, base, modules, keys, notes)


# ---------------------------------------------------------------- the plan: alphas and per-module deltas


@dataclass
class MergeOptions:
    """`pmserve merge`'s options; recorded in merge_report.json."""

    method: str = "pm"
    format: str = "delta"
    weights: list[float] | None = None
    density: float | None = None
    seed: int = 0
    clip: bool | None = None  # None: the RUN's clip_alpha when the adapters come from one, else True
    max_shard_size: str = "5GB"
    data: str | None = None  # pm: tasks to compute missing Fishers from (task t pairs with adapter t)
    fisher_samples: int = 512
    fisher_labels: str = "sampled"  # as TrainConfig.fisher_labels
    calibrate: str | None = None  # tasks to recompute the inference classifier on, with the merged model
    calibrate_head: str | None = None  # prototype | ridge (default: the carried kind, else ridge)

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
        if self.fisher_samples < 1:
            raise PMError(f"--fisher-samples: must be at least 1, got {self.fisher_samples}")
        if self.fisher_labels not in ("true", "sampled"):
            raise PMError(f"--fisher-labels: must be true or sampled, got {self.fisher_labels!r}")
        parse_size(self.max_shard_size)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@dataclass
class MergePlan:
    """What to compute for every module: per-task alphas or weights, and the effective coefficients."""

    inputs: Inputs
    method: MergeMethod
    options: MergeOptions
    alphas: list[float] | None  # sequential methods: alpha_t
    weights: list[float] | None  # weighted methods: w_t (normalised for linear)
    coefficients: list[float] | None  # linear methods: D = sum_t c_t Delta_t
    fisher: str | None  # pm: "files", "data", "files+data" or "identity"
    clip: bool
    density: float | None
    notes: list[str]

    def module_delta(self, index: int, module: str, norms: dict | None = None) -> torch.Tensor:
        """W_hat - W_0 of one module, fp32, computed from the adapter files alone."""
        ads = self.inputs.adapters
        if self.method.linear or self.method.sequential:
            # D = sum_t c_t Delta_t = [c_1 s_1 B_1 ... c_T s_T B_T] @ [A_1; ...; A_T]: one rank-sum(r_t) product
            # instead of T low-rank products and T weight-sized additions (the recurrence, in closed form)
            a_cat, b_cat, blocks = stacked_factors(ads, module, torch.float32)
            merged = (b_cat * (torch.tensor(self.coefficients) @ blocks)) @ a_cat
            if ads[0].fan_in_fan_out:
                merged = merged.T.contiguous()
            if norms is not None:  # ||Delta_t|| from the factors' Gram matrix, never forming Delta_t
                gram = blocks @ ((b_cat.T @ b_cat) * (a_cat @ a_cat.T)) @ blocks.T
                task_norms = gram.diagonal().clamp_min(0).sqrt().tolist()
                norms[module] = {"merged": float(merged.norm()), "tasks": task_norms}
            return merged
        elif self.method.sparsify == "magnitude" and (self.density or DEFAULT_DENSITY) < 1.0:
            merged, task_norms = ties_by_rows(
                ads, module, torch.tensor(self.weights), self.density or DEFAULT_DENSITY
            )
        else:
            ds = [a.delta(module) for a in ads]
            task_norms = [float(d.norm()) for d in ds]
            with torch.random.fork_rng(devices=[]):  # DARE's pruning draws from the global generator
                torch.manual_seed(self.options.seed * 1_000_003 + index)
                merged = combine_task_vectors(
                    ds, torch.tensor(self.weights), self.method, self.density or DEFAULT_DENSITY
                )
        if norms is not None:
            norms[module] = {"merged": float(merged.norm()), "tasks": task_norms}
        return merged


def stacked_factors(
    adapters: list[AdapterInput], module: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[A_1; ...; A_T], [s_1 B_1 ... s_T B_T] and the (T x sum r_t) 0/1 matrix of which rank rows are task t's."""
    facs = [a.factors(module) for a in adapters]
    a_cat = torch.cat([fa.to(dtype) for fa, _ in facs], 0)
    b_cat = torch.cat([a.modules[module].scaling * fb.to(dtype) for a, (_, fb) in zip(adapters, facs)], 1)
    blocks = torch.zeros(len(adapters), a_cat.shape[0], dtype=dtype)
    k = 0
    for t, (fa, _) in enumerate(facs):
        blocks[t, k : k + fa.shape[0]] = 1.0
        k += fa.shape[0]
    return a_cat, b_cat, blocks


def ties_by_rows(
    adapters: list[AdapterInput], module: str, weights: torch.Tensor, density: float
) -> tuple[torch.Tensor, list[float]]:
    """TIES on one module (peft's ties: magnitude pruning, sign election, disjoint merge) without holding the T
    task vectors at once; returns the merged delta and ||Delta_t||.

    Magnitude pruning keeps |x| >= the k-th largest |value| of each whole task vector: that is peft's top-k mask
    (found with kthvalue, an O(n) selection, instead of a full top-k sort) except that values tied at the
    threshold are all kept. With each task's threshold known, the election and merge act element by element, so
    they run over row blocks of the T task vectors, recomputed from the factors.
    """
    from peft.utils import merge_utils as mu

    facs = [a.factors(module) for a in adapters]
    thresholds, norms = [], []
    for a, f in zip(adapters, facs):
        d = a.delta_rows(module, 0, None, f).reshape(-1).abs_()
        norms.append(float(d.norm()))
        k = int(density * d.numel())
        thresholds.append(float("inf") if k == 0 else float(torch.kthvalue(d, d.numel() - k + 1).values))
        del d
    shape = adapters[0].delta_shape(module)
    out = torch.empty(shape, dtype=torch.float32)
    thr = torch.tensor(thresholds).view(-1, 1, 1)
    w = weights.float().view(-1, 1, 1)
    rows = max(1, GRAM_BLOCK // (len(adapters) * shape[1]))
    for r in range(0, shape[0], rows):
        x = torch.stack([a.delta_rows(module, r, r + rows, f) for a, f in zip(adapters, facs)])
        x *= x.abs() >= thr
        out[r : r + rows] = mu.disjoint_merge(x * w, mu.calculate_majority_sign_mask(x, method="total"))
    return out, norms


def factor_gram(adapters: list[AdapterInput], module: str) -> torch.Tensor:
    """One module's share of G_ij = <Delta_i, Delta_j> (the identity-Hessian Gram matrix) from the factors alone:
    <s_i B_i A_i, s_j B_j A_j> = s_i s_j sum((B_i^T B_j) * (A_i A_j^T)), float64, no weight-sized tensor."""
    a_cat, b_cat, blocks = stacked_factors(adapters, module, torch.float64)
    return blocks @ ((b_cat.T @ b_cat) * (a_cat @ a_cat.T)) @ blocks.T


def theta_star(inputs: Inputs, index: int, alphas: list[float]) -> dict[str, torch.Tensor]:
    """theta*_t - W_0 of adapter `index` for every module: Delta_t (independent) or D_{t-1} + Delta_t (chained),
    D_{t-1} rebuilt from the alphas before it."""
    ads = inputs.adapters
    out = {}
    for k in inputs.modules:
        merged = None
        if ads[index].kind == "chained":
            for a, al in zip(ads[:index], alphas):
                merged = sequence_step(merged, a.delta(k), al, a.kind)
        d = ads[index].delta(k)
        out[k] = d if merged is None else merged + d
    return out


FisherFor = Callable[[int, list[float]], dict[str, torch.Tensor]]
GRAM_BLOCK = 1 << 23  # elements of one row block of the stacked task vectors (64 MiB in float64)


def module_grams(
    adapters: list[AdapterInput], module: str, fishers: list[int | None]
) -> dict[int | None, torch.Tensor]:
    """One module's share of H^k_ij = <Delta_i, F_k Delta_j> for each k in `fishers` (None: F = 1), float64.

    The task vectors are stacked as rows of X (T x n) and H^k = (X * F_k) X^T, computed block by block of the
    weight's rows so memory stays T x GRAM_BLOCK whatever the module's size.
    """
    facs = [a.factors(module) for a in adapters]
    shape = adapters[0].delta_shape(module)
    fis = {k: adapters[k].fisher_of(module) for k in fishers if k is not None}
    out = {k: torch.zeros(len(adapters), len(adapters), dtype=torch.float64) for k in fishers}
    rows = max(1, GRAM_BLOCK // (len(adapters) * shape[1]))
    for r in range(0, shape[0], rows):
        # Delta[r:r+rows] = scaling B[r:r+rows] A (or its transpose for fan_in_fan_out), as lora_delta computes it
        x = torch.stack([a.delta_rows(module, r, r + rows, f).reshape(-1) for a, f in zip(adapters, facs)])
        x = x.double()
        for k in fishers:
            y = x if k is None else x * fis[k][r : r + rows].reshape(1, -1).double()
            out[k] += y @ x.T
    return out


def gram_alphas(kinds: list[str], grams: list[torch.Tensor], clip: bool) -> list[float]:
    """The closed-form alphas from the Gram matrices H^1..H^t (t = len(grams)), replaying merge.py's recurrence.

    Every quantity of the closed form is a combination of the task vectors: D_{t-1} = sum_j d_j Delta_j,
    theta*_i - W_0 = Delta_i (+ D_{i-1} when chained), the step s = Delta_t (- D_{t-1} when independent). So with
    S_F = sum_{k<=t} F_k and S_Ft = sum_{k<=t} F_k theta*_k,
        num = -sum((D S_F - S_Ft) * s) = -sum_{k<=t} (d - theta_k)^T H^k s,   den = sum_{k<=t} s^T H^k s,
    exactly the sums merge.alpha_terms takes over every element of every module.
    """
    n = len(kinds)
    d = torch.zeros(n, dtype=torch.float64)
    thetas, alphas = [], []
    for t in range(len(grams)):
        e = torch.zeros(n, dtype=torch.float64)
        e[t] = 1.0
        thetas.append(e + d if kinds[t] == "chained" and t > 0 else e)
        if t == 0:
            alphas.append(task_alpha("pm", 1, {}, {}))
            d = e * alphas[0]
            continue
        s = e if kinds[t] == "chained" else e - d
        num = -sum(float((d - thetas[k]) @ grams[k] @ s) for k in range(t + 1))
        den = sum(float(s @ grams[k] @ s) for k in range(t + 1))
        alphas.append(closed_form_alpha([(num, den)], clip=clip))
        d = d + alphas[-1] * s
    return alphas


def pm_alphas(
    inputs: Inputs,
    identity: bool,
    clip: bool,
    log: Callable[[str], None],
    fisher_for: FisherFor | None = None,
) -> list[float]:
    """alpha_1..alpha_T of the closed form, as `pmserve train` computes them, from one streaming pass.

    The pass reads each module's factors and each Fisher once and adds the module's share of the Gram matrices
    H^k (module_grams); gram_alphas replays the recurrence on them. `identity` uses F_k = 1 (one Gram matrix).
    An adapter without a Fisher gets `fisher_for(index, alphas before it)`: independent adapters all up front,
    chained ones when the alphas their theta*_t depends on are known (then the pass is repeated for the new H^k).
    """
    ads = inputs.adapters
    kinds = [a.kind for a in ads]

    def compute(ks: list[int | None]) -> dict[int | None, torch.Tensor]:
        total = {k: torch.zeros(len(ads), len(ads), dtype=torch.float64) for k in ks}
        for m in inputs.modules:
            if ks == [None]:
                total[None] += factor_gram(ads, m)
                continue
            for k, h in module_grams(ads, m, ks).items():
                total[k] += h
        return total

    def get_fisher(i: int, alphas: list[float]) -> None:
        a = ads[i]
        if fisher_for is None:
            raise ValueError(f"{a.path}: no Fisher and no way to compute one")
        fisher = fisher_for(i, alphas)
        if not all(torch.isfinite(f).all() for f in fisher.values()):
            raise PMError(f"--data: the Fisher of {a.path} computed from task {i + 1} holds NaN or Inf")
        a.fisher, a.fisher_source = InMemoryTensors(fisher, f"{a.path} (--data)"), "data"
        log(f"fisher of {a.name} from --data task {i + 1}")

    if identity:
        g = compute([None])[None]
        alphas = gram_alphas(kinds, [g] * len(ads), clip)
    else:
        for i, a in enumerate(ads):
            if a.fisher is None and (a.kind == "independent" or i == 0):
                get_fisher(i, [])  # theta*_i does not depend on any alpha
        grams: dict[int, torch.Tensor] = {}
        alphas = []
        for t in range(1, len(ads) + 1):
            if ads[t - 1].fisher is None:
                get_fisher(t - 1, alphas)
            if t - 1 not in grams:
                grams.update(
                    compute([k for k, a in enumerate(ads) if a.fisher is not None and k not in grams])
                )
            alphas = gram_alphas(kinds, [grams[k] for k in range(t)], clip)
    for t, a in enumerate(alphas[1:], 2):
        log(f"alpha_{t} = {a:.6g}")
    return alphas


def data_fisher(inputs: Inputs, opts: MergeOptions) -> FisherFor:
    """The Fisher of each adapter without one, from task t of --data at its theta*_t (task_fisher.DataFisher)."""
    from .task_fisher import DataFisher
    from .tasks import load_tasks

    ads = inputs.adapters
    tasks = load_tasks(opts.data, opts.seed)
    if len(tasks) != len(ads):
        raise PMError(
            f"--data: {opts.data} has {len(tasks)} tasks for {len(ads)} adapters (task t pairs with adapter t)"
        )
    for a, task in zip(ads, tasks):
        if a.labels and set(a.labels) != set(task.classes):
            raise PMError(
                f"--data: task {task.name} has labels {sorted(task.classes)}, but {a.path} was trained on "
                f"{sorted(a.labels)}"
            )
    lengths = [int(a.run_config["max_length"]) for a in ads if "max_length" in (a.run_config or {})]
    model = DataFisher(
        inputs.base.spec,
        inputs.modules,
        tasks,
        opts.seed,
        opts.fisher_samples,
        max_length=lengths[0] if lengths else 128,
        labels=opts.fisher_labels,
    )

    def fisher_for(index: int, alphas: list[float]) -> dict[str, torch.Tensor]:
        return model(index, theta_star(inputs, index, alphas))

    return fisher_for


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
            elif opts.data:
                fisher = "data" if len(missing) == len(ads) else "files+data"
                fisher_for = data_fisher(inputs, opts)
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
    density = (opts.density if opts.density is not None else DEFAULT_DENSITY) if method.uses_density else None
    return MergePlan(inputs, method, opts, alphas, weights, coefficients, fisher, clip, density, notes)


# ---------------------------------------------------------------- outputs


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A hidden temporary folder beside `out`, renamed to `out` when the block succeeds, removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a merge that was killed
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # checked empty before the merge started
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PMError(f"{out}: already exists; choose a new --out")


def write_delta(tmp: Path, plan: MergePlan, norms: dict) -> list[Path]:
    """merged.safetensors: W_hat - W_0 of every adapted module, fp32, named as a RUN's merged.safetensors."""
    inp = plan.inputs
    specs = [TensorSpec(m, torch.float32, tuple(inp.base.weights.shape(inp.keys[m]))) for m in inp.modules]
    w = SafetensorsWriter(tmp, specs, stem="merged", metadata={"pmserve": "W_hat - W_0 per adapted module"})
    for i, m in enumerate(inp.modules):
        w.write(m, plan.module_delta(i, m, norms))
    return w.close()


def write_adapter(tmp: Path, plan: MergePlan, norms: dict) -> list[Path]:
    """One PEFT LoRA: every task's factors concatenated along the rank, B_t scaled by c_t * scaling_t, scaling 1."""
    inp, ads = plan.inputs, plan.inputs.adapters
    total = {m: sum(a.modules[m].rank for a in ads) for m in inp.modules}
    specs = []
    for m in inp.modules:
        (_, i), (o, _) = (
            ads[0].tensors.shapes[ads[0].modules[m].a_key],
            ads[0].tensors.shapes[ads[0].modules[m].b_key],
        )
        specs += [
            TensorSpec(f"{PEFT_PREFIX}{m}.lora_A.weight", torch.float32, (total[m], i)),
            TensorSpec(f"{PEFT_PREFIX}{m}.lora_B.weight", torch.float32, (o, total[m])),
        ]
    w = SafetensorsWriter(tmp, specs, stem="adapter_model")
    for k, m in enumerate(inp.modules):
        plan.module_delta(
            k, m, norms
        )  # the norms the report records; the adapter itself needs only the factors
        parts = [a.factors(m) for a in ads]
        w.write(f"{PEFT_PREFIX}{m}.lora_A.weight", torch.cat([fa.float() for fa, _ in parts], dim=0))
        w.write(
            f"{PEFT_PREFIX}{m}.lora_B.weight",
            torch.cat(
                [
                    c * a.modules[m].scaling * fb.float()
                    for c, a, (_, fb) in zip(plan.coefficients, ads, parts)
                ],
                1,
            ),
        )
    files = w.close()

    cfg = dict(ads[0].config)
    r = Counter(total.values()).most_common(1)[0][0]
    pattern = {m: n for m, n in total.items() if n != r}
    same_targets = all(a.config.get("target_modules") == cfg.get("target_modules") for a in ads)
    cfg.update(
        r=r,
        lora_alpha=float(r),  # scaling 1: the coefficients are already in B
        rank_pattern=pattern,
        alpha_pattern={m: float(n) for m, n in pattern.items()},
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        modules_to_save=None,
        inference_mode=True,
        base_model_name_or_path=str(inp.base.folder),
    )
    if not same_targets or not cfg.get("target_modules"):
        cfg.update(target_modules=list(inp.modules), layers_to_transform=None, layers_pattern=None)
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    meta = {
        "kind": "independent",  # W_hat = W_0 + this adapter's delta
        "base_model": inp.base.spec,
        "base_fingerprint": inp.base.fingerprint,
        "labels": _labels(ads),
        "method": plan.method.name,
        "merged_from": [str(a.path) for a in ads],
    }
    (tmp / "pmserve_adapter.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return [*files, tmp / "adapter_config.json", tmp / "pmserve_adapter.json"]


def write_full(tmp: Path, plan: MergePlan, norms: dict, log: Callable[[str], None]) -> list[Path]:
    """A Hugging Face model folder with W_hat in the base's dtypes, sharded like the base's save_pretrained."""
    inp = plan.inputs
    weights = inp.base.weights
    module_of = {k: m for m, k in inp.keys.items()}
    index = {m: i for i, m in enumerate(inp.modules)}
    specs = [TensorSpec(k, weights.dtype(k), tuple(weights.shape(k))) for k in weights.keys()]
    w = SafetensorsWriter(tmp, specs, stem="model", max_shard_bytes=parse_size(plan.options.max_shard_size))
    for k in weights.keys():
        t = weights.get(k)
        m = module_of.get(k)
        if m is not None:
            d = plan.module_delta(index[m], m, norms)
            d += t  # W_0 + (W_hat - W_0) in fp32, as adapters.set_merged writes it
            top = torch.finfo(t.dtype).max
            if not math.isfinite(norms[m]["merged"]) or float(d.abs().amax()) > top:
                raise PMError(f"{weights.folder}: merged {k} overflows {t.dtype} (NaN or Inf)")
            t = d.to(t.dtype)
        w.write(k, t)
        del t
    files = w.close()
    for p in sorted(
        inp.base.folder.iterdir()
    ):  # config, tokenizer or image processor, generation config, ...
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"):
            shutil.copy2(p, tmp / p.name)
            files.append(tmp / p.name)
    last = inp.adapters[-1]
    rc = last.run_config or {}
    meta = {
        "method": plan.method.name,
        "alphas": plan.alphas,
        "tasks": [a.name for a in inp.adapters],
        "data": rc.get("data"),
        "seed": rc.get("seed", 0),
        "max_length": rc.get("max_length", 128),
        "base_model": inp.base.spec,
        "base_fingerprint": inp.base.fingerprint,
    }
    (tmp / "pmserve_merge.json").write_text(json.dumps(meta, indent=2))
    return [*files, tmp / "pmserve_merge.json"]


def _labels(ads: list[AdapterInput]) -> list[str]:
    return list(dict.fromkeys(y for a in ads for y in a.labels))


def _input_record(a: AdapterInput) -> dict:
    files = ["adapter_config.json", "adapter_model.safetensors", "pmserve_adapter.json", "fisher.safetensors"]
    return {
        "path": str(a.path.resolve()),
        "name": a.name,
        "kind": a.kind,
        "task": a.meta.get("task"),
        "ranks": sorted({m.rank for m in a.modules.values()}),
        "scaling": sorted({m.scaling for m in a.modules.values()}),
        "fisher": a.fisher_source,
        "sha256": {f: sha256_file(a.path / f) for f in files if (a.path / f).is_file()},
    }


def merge_adapters(
    adapters: list[Path | str],
    out: Path | str,
    base: str | None = None,
    options: MergeOptions | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Merge adapter folders (or RUNs) into OUT in `options.format`; returns the report also written to
    OUT/merge_report.json. Any problem with the inputs is a PMError raised before OUT exists."""
    t0 = time.perf_counter()
    opts = options or MergeOptions()
    opts.validate()
    out = Path(out)
    _check_out(out)
    ads = [read_adapter(p) for p in expand_inputs(adapters)]
    opts.validate(len(ads))
    inputs = check_inputs(ads, resolve_base(base, ads))
    log(f"{len(ads)} adapters, {len(inputs.modules)} modules, base {inputs.base.folder}")
    plan = plan_merge(inputs, opts, log)
    calibrate = calibration_tasks(opts.calibrate, opts.seed, ads) if opts.calibrate else None
    norms: dict[str, dict] = {}
    with atomic_dir(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's prune warns when density is 1
        if opts.format == "delta":
            files = write_delta(tmp, plan, norms)
        elif opts.format == "adapter":
            files = write_adapter(tmp, plan, norms)
        else:
            files = write_full(tmp, plan, norms, log)
        classifier = write_classifier(
            tmp, plan, opts.calibrate, calibrate, opts.calibrate_head, opts.seed, _labels(ads), log
        )
        report = {
            "method": plan.method.name,
            "format": opts.format,
            "alphas": plan.alphas,
            "weights": plan.weights,
            "coefficients": plan.coefficients,
            "fisher": plan.fisher,
            "clip": plan.clip if plan.method.name == "pm" else None,
            "density": plan.density,
            "seed": opts.seed if plan.method.sparsify == "random" else None,
            "options": asdict(opts),
            "base": {
                "model": inputs.base.spec,
                "path": str(inputs.base.folder.resolve()),
                "fingerprint": inputs.base.fingerprint,
            },
            "inputs": [_input_record(a) for a in ads],
            "labels": _labels(ads),
            "classifier": classifier,
            "notes": inputs.warnings + plan.notes,
            "outputs": sorted(p.name for p in files),
            "modules": norms,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report


def summary(report: dict) -> str:
    """A few lines for the terminal: method, alphas or weights, Fisher source, notes."""
    lines = [f"method {report['method']}, format {report['format']}, {len(report['inputs'])} adapters"]
    if report["alphas"] is not None:
        lines.append("alphas " + " ".join(f"{a:.4g}" for a in report["alphas"]))
    if report["weights"] is not None:
        lines.append("weights " + " ".join(f"{w:.4g}" for w in report["weights"]))
    if report["fisher"]:
        lines.append(f"fisher: {report['fisher']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
