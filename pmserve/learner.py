"""One task's learning: the Learner holds the backbone, its merged deltas, the training head and the inference
classifier of a run, and does a task's steps, its Fisher and loss profile, the merge, and the evaluation.

Per task t: a fresh PEFT LoRA on the merged backbone W_hat_{t-1}, trained with the perturbation; the diagonal
Fisher at theta*_t; the adapter saved in PEFT's format; alpha_t and the merge (merging.recurrence, the same code as
`pmserve merge`); the inference classifier updated with the merged model; evaluation on every test set seen.
TrainConfig, the run's options, is saved with the run (config.json). The RUN around the tasks (start, continue,
--add, --resume, the plan) is pmserve.train's.

Under torchrun every rank runs this same loop (distributed.py). --batch-size is the global batch: every rank
draws the same batch order and the same perturbation factors from the same generators and computes its slice
of each global batch; DDP averages the gradients of losses scaled to the global batch's mean, so N ranks take
the steps one process takes with the same batch. The Fisher and the features are computed in shares and
summed over the ranks, so alpha, the merge and the classifiers are the same on every rank; only rank 0 writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import defaults as D
from . import distributed
from .adapters import (
    ADAPTER,
    LoraSpec,
    Tensors,
    add_lora,
    lora_layers,
    set_merged,
    task_vectors,
)
from .backbone import Encoder, Preprocessor, split_batches, split_features
from .errors import PMError
from .formats import run as run_files
from .formats import write_json
from .heads import (
    HEADS,
    RIDGE_DRIFT,
    RIDGE_SELECT,
    TRAIN_HEADS,
    LabelHead,
    Prototypes,
    Ridge,
    Scorer,
    load_scorer,
    save_scorer,
)
from .merging.curvature import CURVATURES, PROFILE_POINTS, profile_curvature, rescale
from .merging.recurrence import FisherSums, chained_merge, chained_theta, task_alpha
from .perturb import FusedPerturbation, Perturbation, branch_scale, use_fused_kernel
from .progress import TrainProgress
from .seeds import HEAD_INIT, SHUFFLE, perturb_seed, ridge_seed, stream_generator, task_seed
from .task_fisher import check_fisher_labels, fisher_generator, fisher_order, loss_profile, task_fisher
from .tasks import (
    Split,
    Task,
)

TRAIN_METHODS = ("pm", "merge", "seq", "avg", "frozen", "joint")
# may differ between a run and its resumption: they change where and how it runs, or what it keeps, not results
EXECUTION_ONLY = ("device", "kernel", "keep_test", "keep_fisher")


@dataclass
class TrainConfig:
    """Everything that determines a run's results; saved as RUN/config.json."""

    data: str
    model: str = D.TRAIN_MODEL
    method: str = D.TRAIN_METHOD
    head: str = D.TRAIN_HEAD
    train_head: str = D.TRAIN_TRAIN_HEAD  # "" = cosine for --head cosine, else linear
    rank: int = D.TRAIN_RANK
    lora_alpha: float = D.TRAIN_LORA_ALPHA  # 0 = same as rank (scaling 1)
    target_modules: list[str] = field(default_factory=lambda: list(D.TRAIN_TARGET_MODULES))
    eps: float = D.TRAIN_EPS
    perturb_per: str = D.TRAIN_PERTURB_PER
    epochs: int = D.TRAIN_EPOCHS
    batch_size: int = D.TRAIN_BATCH_SIZE
    lr: float = D.TRAIN_LR
    head_lr: float = D.TRAIN_HEAD_LR
    weight_decay: float = D.TRAIN_WEIGHT_DECAY
    max_length: int = D.TRAIN_MAX_LENGTH
    fisher_samples: int = D.TRAIN_FISHER_SAMPLES
    fisher_labels: str = D.TRAIN_FISHER_LABELS  # runs from before the option used "true" (PREDATES)
    clip_alpha: bool = D.TRAIN_CLIP_ALPHA
    curvature: str = D.TRAIN_CURVATURE  # what alpha weighs tasks by (merging.curvature)
    cosine_scale: float = D.TRAIN_COSINE_SCALE
    ridge_dim: int = D.TRAIN_RIDGE_DIM
    ridge_lambda: float = D.TRAIN_RIDGE_LAMBDA  # 0 = choose after every task by ridge_select
    ridge_select: str = D.TRAIN_RIDGE_SELECT  # gcv (every class seen) | holdout (this task's data)
    ridge_drift: str = D.TRAIN_RIDGE_DRIFT  # none | linear (stored statistics follow the backbone)
    reject: float = D.TRAIN_REJECT  # 0 = off; else the share of in-scope answers out-of-scope rejection keeps
    gate: bool = D.TRAIN_GATE  # keep each task's update only as far as it pays on its held-out rows (gate.py)
    eval_heads: list[str] = field(default_factory=lambda: list(D.TRAIN_EVAL_HEADS))  # measured side by side
    seed: int = D.TRAIN_SEED
    device: str = D.TRAIN_DEVICE
    kernel: str = D.TRAIN_KERNEL
    keep_test: bool = D.TRAIN_KEEP_TEST  # copy each task's test split into its folder, for later evaluations
    keep_fisher: bool = D.TRAIN_KEEP_FISHER  # each task's Fisher, for offline `pmserve merge --method pm`
    # Not an option: the names of the options its maker chose (the CLI: those typed; a RUN read back: all), for
    # the defaults that depend on the backbone (lm_learner.decoder_config); None: the caller did not say, and
    # an option equal to the encoders' default counts as left alone. Never saved (saved()).
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.given is not None:
            self.given = frozenset(self.given)
        if not self.train_head:
            self.train_head = "cosine" if self.head == "cosine" else "linear"
        if not self.lora_alpha:
            self.lora_alpha = float(self.rank)
        self.target_modules = list(self.target_modules)

    def validate(self) -> None:
        def need(ok: bool, option: str, msg: str) -> None:
            if not ok:
                raise PMError(f"--{option}: {msg}")

        need(
            self.method in TRAIN_METHODS,
            "method",
            f"unknown method {self.method!r} (choose from {', '.join(TRAIN_METHODS)})",
        )
        need(self.head in HEADS, "head", f"unknown head {self.head!r} (choose from {', '.join(HEADS)})")
        need(
            self.train_head in TRAIN_HEADS,
            "train-head",
            f"unknown head {self.train_head!r} (choose from {', '.join(TRAIN_HEADS)})",
        )
        need(
            not (self.head == "linear" and self.train_head == "cosine"),
            "head",
            "linear inference needs --train-head linear",
        )
        need(
            not (self.head == "cosine" and self.train_head == "linear"),
            "head",
            "cosine inference needs --train-head cosine",
        )
        need(self.rank >= 1, "rank", f"must be at least 1, got {self.rank}")
        need(0.0 <= self.eps < 1.0, "eps", f"must be in [0, 1), got {self.eps}")
        need(
            self.perturb_per in ("step", "sample"),
            "perturb-per",
            f"must be step or sample, got {self.perturb_per!r}",
        )
        check_fisher_labels(self.fisher_labels)
        need(
            self.curvature in CURVATURES,
            "curvature",
            f"must be {' or '.join(CURVATURES)}, got {self.curvature!r}",
        )
        need(
            self.ridge_select in RIDGE_SELECT,
            "ridge-select",
            f"must be {' or '.join(RIDGE_SELECT)}, got {self.ridge_select!r}",
        )
        need(
            self.ridge_drift in RIDGE_DRIFT,
            "ridge-drift",
            f"must be {' or '.join(RIDGE_DRIFT)}, got {self.ridge_drift!r}",
        )
        need(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, "batch-size", f"must be at least 1, got {self.batch_size}")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.head_lr > 0, "head-lr", f"must be > 0, got {self.head_lr}")
        need(self.max_length >= 2, "max-length", f"must be at least 2, got {self.max_length}")
        need(self.fisher_samples >= 1, "fisher-samples", f"must be at least 1, got {self.fisher_samples}")
        need(
            self.reject == 0 or 0.5 <= self.reject < 1,
            "reject",
            f"must be 0 (off) or in [0.5, 1), got {self.reject}",
        )
        need(
            not self.reject or self.head == "ridge",
            "reject",
            "needs --head ridge (its scores set the threshold)",
        )
        need(
            not self.gate
            or (self.head in ("ridge", "prototype") and self.method in ("pm", "merge", "seq", "avg")),
            "gate",
            "needs --head ridge or prototype and a method that merges (pm, merge, seq, avg)",
        )
        need(self.ridge_lambda >= 0, "ridge-lambda", f"must be > 0, got {self.ridge_lambda}")
        for h in self.eval_heads:
            need(h in HEADS, "eval-heads", f"unknown head {h!r} (choose from {', '.join(HEADS)})")
            need(h in ("prototype", "ridge", self.train_head), "eval-heads", f"{h} needs --train-head {h}")
        need(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            f"must be auto, cpu or cuda, got {self.device!r}",
        )
        need(
            self.kernel in ("auto", "torch", "triton"),
            "kernel",
            f"must be auto, torch or triton, got {self.kernel!r}",
        )

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(self.rank, self.lora_alpha, tuple(self.target_modules))

    def saved(self) -> dict:
        """The options as config.json records them (everything but `given`)."""
        return {k: v for k, v in asdict(self).items() if k != "given"}

    def results_key(self) -> dict:
        return {k: v for k, v in self.saved().items() if k not in EXECUTION_ONLY}


def _device(spec: str) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise PMError(f"--device: {spec} asked for, but no CUDA device is available")
    if spec == "cuda" and distributed.world() > 1:
        spec = f"cuda:{distributed.local_rank()}"  # one device per process on each machine
    return torch.device(spec)


class Learner:
    """The backbone, its merged deltas, the training head and the inference classifier of one run."""

    losses: tuple[str, ...] = ()  # what accuracy() measures besides accuracies (a decoder's "nll")

    def __init__(self, cfg: TrainConfig, encoder: Encoder, prep: Preprocessor, device: torch.device):
        self._adapt(cfg, encoder, prep, device)
        dim = encoder.hidden_size
        self.head = LabelHead(dim, cfg.train_head, cfg.cosine_scale).to(device)
        # inference classifiers by name; the first is --head, the rest are --eval-heads
        self.classifiers: dict[str, Scorer] = {}
        for h in dict.fromkeys([cfg.head, *cfg.eval_heads]):
            self.classifiers[h] = (
                Prototypes(dim)
                if h == "prototype"
                else Ridge(
                    dim, cfg.ridge_dim, cfg.seed, cfg.ridge_lambda or None, cfg.ridge_select, cfg.reject
                )
                if h == "ridge"
                else self.head
            )
        self.drift_mu: float | None = None  # the last task's carried drift map's penalty (update_classifiers)

    def _adapt(self, cfg: TrainConfig, encoder: nn.Module, prep, device: torch.device) -> None:
        """The backbone on its device, the matrices LoRA adapts, their W_0, the merged deltas D and the P&M
        accumulators: what every learner (encoder or decoder) keeps."""
        self.cfg, self.encoder, self.prep, self.device = cfg, encoder.to(device), prep, device
        cfg.target_modules = resolve_targets(encoder.model, cfg.target_modules)
        self.names = _adapted_names(encoder.model, cfg.target_modules) if cfg.method != "frozen" else []
        mods = dict(encoder.model.named_modules())
        self.base: Tensors = {n: mods[n].weight.detach().cpu().clone() for n in self.names}
        self.merged: Tensors = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in self.base.items()}
        self.sums = FisherSums()

    @property
    def measures(self) -> list[str]:
        """The accuracies accuracy() gives, the first the RUN's own (acc_matrix): one per inference classifier."""
        return list(self.classifiers)

    # ---- batches

    def batches(self, split: Split, order: torch.Tensor, bs: int):
        return split_batches(self.prep, split, order, bs, self.device)

    def features(self, split: Split, bs: int = 128) -> torch.Tensor:
        return split_features(self.encoder, self.prep, split, self.device, bs)

    @torch.no_grad()
    def accuracy(self, split: Split) -> dict[str, float]:
        """Accuracy of every inference classifier on a split, over all labels seen."""
        feats = self.features(split)
        out = {}
        for name, clf in self.classifiers.items():
            pred = [clf.labels[i] for i in clf.scores(feats).argmax(1).tolist()]
            out[name] = sum(p == y for p, y in zip(pred, split.labels)) / len(pred)
        return out

    # ---- one task

    def train_task(
        self, task: Task, i: int, epochs: int, progress: TrainProgress
    ) -> tuple[nn.Module | None, Tensors, Tensors, dict | None]:
        """Train task i; returns (the PEFT model or None, Delta_t, the curvature F_t that alpha weighs it by,
        and how F_t was scaled (None: the paper's Fisher as it is)). The head rows are committed."""
        cfg = self.cfg
        self.head.add_labels(task.classes, stream_generator(cfg.seed, i, HEAD_INIT))
        w, b = self.head.rows(task.classes)
        target_of = {y: k for k, y in enumerate(task.classes)}
        peft_model, pert = None, None
        params = [{"params": [w, b], "lr": cfg.head_lr}]
        if cfg.method != "frozen":
            torch.manual_seed(task_seed(cfg.seed, i))  # PEFT draws lora_A's init from the global generator
            peft_model = add_lora(self.encoder.model, cfg.lora)
            self.encoder.model = peft_model
            layers = lora_layers(peft_model)
            params.append({"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": cfg.lr})
            eps = cfg.eps if cfg.method == "pm" else 0.0
            if not _sliced_samples(cfg) and use_fused_kernel(cfg.kernel, self.device, layers):
                # Each LoRA layer through the fused kernel: base products in cuBLAS, s and the LoRA branch in rank space.
                pert = FusedPerturbation(layers, eps, cfg.perturb_per, seed=perturb_seed(cfg.seed, i))
            elif eps > 0:
                pert = Perturbation(layers, eps, cfg.perturb_per, perturb_seed(cfg.seed, i), ADAPTER)
        opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
        shuffle = stream_generator(cfg.seed, i, SHUFFLE)
        cached = self.features(task.train) if peft_model is None else None  # frozen: features never change
        lengths = [len(x) if isinstance(x, str) else 0 for x in task.train.inputs]
        net = distributed.wrap(_Net(self.encoder if cached is None else None, self.head, w, b), self.device)
        world = distributed.world()
        for epoch in range(epochs):
            # the same global batches on every rank, each computing its slice
            for idx in bucketed_batches(lengths, cfg.batch_size, shuffle):
                rows, weight = distributed.shard(len(idx)), world
                if rows.start == rows.stop:  # short last batch: DDP needs every rank, so one sample weighs 0
                    rows, weight = slice(0, 1), 0
                part = idx[rows].tolist()
                ys = torch.tensor([target_of[task.train.labels[j]] for j in part], device=self.device)
                if cached is not None:
                    inputs = cached[part]
                else:
                    batch = self.prep([task.train.inputs[j] for j in part])
                    if pert is not None:
                        pert.draw(len(idx), self.device, rows)
                    inputs = {kk: v.to(self.device) for kk, v in batch.items()}
                # the global batch's mean: DDP divides the sum of the ranks' gradients by world
                loss = F.cross_entropy(net(inputs), ys, reduction="sum") / len(idx) * weight
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                progress.step(loss)
            progress.epoch_done(epoch + 1, epochs)
        del net  # DDP's gradient hooks go with it, before the Fisher's backward passes
        if pert is not None:
            pert.remove()
        self.head.commit(task.classes, w, b)
        if peft_model is None:
            return None, {}, {}, None
        delta, scaled = task_vectors(peft_model), None
        weighs = cfg.method in ("pm", "merge")  # the other methods' alphas need no curvature
        fisher = self._fisher(task, i, layers, w, b) if weighs or cfg.keep_fisher else {}
        if cfg.curvature == "profile" and weighs:
            losses = self._profile(task, i, layers, w, b)
            c = profile_curvature(PROFILE_POINTS, losses)
            fisher, k = rescale(fisher, delta, c)
            scaled = {"points": list(PROFILE_POINTS), "losses": losses, "curvature": c, "fisher_scale": k}
        return peft_model, delta, fisher, scaled

    def _fisher(self, task: Task, i: int, layers, w, b) -> Tensors:
        """The diagonal Fisher at theta*_t over the task's training loss, no perturbation.

        `fisher_labels="sampled"` (the default) draws each label from the model's own prediction (the true
        Fisher's estimator); "true" is the empirical Fisher of PM_METHOD.md, which vanishes where the model fits.
        """
        gen = fisher_generator(self.cfg.seed, i)
        order = fisher_order(task.train, self.cfg.fisher_samples, gen)
        return task_fisher(
            self.encoder,
            self.prep,
            layers,
            task.train,
            task.classes,
            lambda feats: self.head.logits(feats, w.detach(), b.detach()),
            order,
            self.cfg.batch_size,
            self.device,
            sample_labels=gen if self.cfg.fisher_labels == "sampled" else None,
        )

    def _profile(self, task: Task, i: int, layers, w, b) -> list[float]:
        """Task i's training loss at W_hat_{t-1} + s Delta_t for s in PROFILE_POINTS (merging.curvature), on the
        samples its Fisher is taken on, with its training head; no perturbation."""
        return loss_profile(
            self.encoder,
            self.prep,
            task.train,
            task.classes,
            lambda feats: self.head.logits(feats, w.detach(), b.detach()),
            fisher_order(task.train, self.cfg.fisher_samples, fisher_generator(self.cfg.seed, i)),
            self.cfg.batch_size,
            self.device,
            lambda s: branch_scale(layers, s),
            PROFILE_POINTS,
        )

    def merge(self, t: int, delta: Tensors, fisher: Tensors) -> float:
        """alpha_t and W_hat_t = W_hat_{t-1} + alpha_t Delta_t (t is 1-based)."""
        method = "seq" if self.cfg.method == "joint" else self.cfg.method
        if method in ("pm", "merge"):
            self.sums.add(fisher, chained_theta(self.merged, delta))
        alpha = task_alpha(method, t, self.merged, delta, self.sums, clip=self.cfg.clip_alpha)
        self.merged = chained_merge(self.merged, delta, alpha)
        set_merged(self.encoder.model, self.base, self.merged)
        return alpha

    def features_before(self, task: Task) -> torch.Tensor | None:
        """The task's training features under the backbone before it trains, where ridge's stored statistics
        will follow the backbone (--ridge-drift linear); None where nothing will use them."""
        carried = [c for c in self.classifiers.values() if isinstance(c, Ridge) and c.n > 0]
        if self.cfg.ridge_drift != "linear" or self.cfg.method == "frozen" or not carried:
            return None
        return self.features(task.train)

    def update_classifiers(self, task: Task, i: int, before: torch.Tensor | None = None) -> float | None:
        """Add the task's training features, computed with the merged model; returns ridge's lambda. `before`
        (features_before) carries ridge's stored statistics into the merged model's feature space first;
        `drift_mu` is then the carried map's penalty (None: the statistics stayed as they were)."""
        stats = [c for c in self.classifiers.values() if not isinstance(c, LabelHead)]
        self.drift_mu = None
        if not stats:
            return None
        feats = self.features(task.train)
        lam = None
        for clf in stats:
            if isinstance(clf, Ridge):
                if before is not None:
                    self.drift_mu = clf.carry(before, feats, task.train.labels)
                lam = clf.fit(feats, task.train.labels, seed=ridge_seed(self.cfg.seed, i))
            else:
                clf.update(feats, task.train.labels)
        return lam

    def ridge_on_edge(self) -> bool | None:
        """Whether ridge's last chosen lambda ends its grid (None: no ridge classifier)."""
        ridges = [c for c in self.classifiers.values() if isinstance(c, Ridge)]
        return ridges[0].on_edge if ridges else None

    # ---- the state (formats.run): merged weights, P&M accumulators, head.*, classifier.* (the --head) and
    # eval-NAME.* (the --eval-heads)

    def save_state(self, folder: Path, tasks: int, labels: list[str], kind: str) -> None:
        if self.names:
            save_file(self.merged, str(folder / run_files.MERGED))
        if self.sums.S_F:
            sums = {f"S_F.{k}": v for k, v in self.sums.S_F.items()}
            sums |= {f"S_Ft.{k}": v for k, v in self.sums.S_Ft.items()}
            save_file(sums, str(folder / run_files.FISHER_SUMS))
        self._save_heads(folder)
        write_json(folder / run_files.STATE_INFO, {"tasks": tasks, "labels": labels, "kind": kind})

    def _save_heads(self, folder: Path) -> None:
        save_scorer(self.head, folder, run_files.HEAD)
        for k, (name, clf) in enumerate(self.classifiers.items()):
            save_scorer(clf, folder, run_files.CLASSIFIER if k == 0 else f"eval-{name}")

    def load_state(self, folder: Path) -> None:
        """The state save_state wrote (or a format-1 task folder's, which has no accumulators). A state that lacks
        a file its run writes is refused: continuing without it would merge from zero, silently."""
        if (folder / run_files.STATE_INFO).is_file():
            needed = [run_files.MERGED] if self.names else []
            needed += [run_files.FISHER_SUMS] if self.cfg.method in ("pm", "merge") else []
            for name in needed:
                if not (folder / name).is_file():
                    raise PMError(
                        f"{folder / name}: missing from the RUN's state (a {self.cfg.method} run writes it)"
                    )
        if (folder / run_files.MERGED).exists():
            self.merged = load_file(str(folder / run_files.MERGED))
            set_merged(self.encoder.model, self.base, self.merged)
        if (folder / run_files.FISHER_SUMS).exists():
            sums = load_file(str(folder / run_files.FISHER_SUMS))
            self.sums = FisherSums(
                {k.removeprefix("S_F."): v for k, v in sums.items() if k.startswith("S_F.")},
                {k.removeprefix("S_Ft."): v for k, v in sums.items() if k.startswith("S_Ft.")},
            )
        self._load_heads(folder)

    def _load_heads(self, folder: Path) -> None:
        self.head = load_scorer(folder, run_files.HEAD).to(self.device)
        for k, name in enumerate(list(self.classifiers)):
            clf = load_scorer(folder, run_files.CLASSIFIER if k == 0 else f"eval-{name}")
            self.classifiers[name] = self.head if isinstance(clf, LabelHead) else clf


def _sliced_samples(cfg: TrainConfig) -> bool:
    """Whether ranks draw per-sample s for slices of a global batch: the fused kernel draws s by local row, so
    only the hook perturbation can key them by the sample's place in the global batch."""
    return distributed.world() > 1 and cfg.perturb_per == "sample" and cfg.method == "pm" and cfg.eps > 0


class _Net(nn.Module):
    """The encoder (None: cached features) and the task's head rows as one module, the one DDP wraps."""

    def __init__(self, encoder: Encoder | None, head: LabelHead, w: nn.Parameter, b: nn.Parameter):
        super().__init__()
        self.encoder, self.w, self.logits = encoder, w, head.logits
        # a cosine head has no bias: DDP would wait for its gradient
        self.b = b if head.kind == "linear" else None

    def forward(self, inputs) -> torch.Tensor:
        feats = inputs if self.encoder is None else self.encoder(**inputs)
        return self.logits(feats, self.w, self.b)


KEY_VALUE_NAMES = (("key", "value"), ("k_proj", "v_proj"), ("k_lin", "v_lin"), ("k", "v"))


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """--target-modules as module names. "all-linear" (the default, measured best): every linear layer of the
    transformer blocks, attention and feed-forward; "key-value": the paper's attention key and value projections;
    anything else: names as PEFT takes them. Names are leaf names where those pick out nothing else (BERT's
    query, key, value, dense), else full names, so config.json stays readable and PEFT adapts exactly these."""
    if targets not in (["all-linear"], ["key-value"], []):
        return list(targets)
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    leaves = {n: n.rsplit(".", 1)[-1] for n in linears}
    if targets == ["key-value"]:
        for pair in KEY_VALUE_NAMES:
            if set(pair) <= set(leaves.values()):
                return list(pair)
        raise PMError(
            "--target-modules: cannot tell the attention key/value projections of this model; name them"
        )
    # all-linear, or [] (an empty --target-modules): the default. Saved configs hold resolved names.
    inside = [n for n in linears if any(part.isdigit() for part in n.split("."))]  # in a repeated block
    if not inside:
        raise PMError(
            "--target-modules: this model has no repeated blocks of linear layers; name the modules"
        )
    names = list(dict.fromkeys(leaves[n] for n in inside))
    if any(leaves[n] in names for n in linears if n not in inside):  # e.g. a pooler's dense layer
        return inside
    return names


def bucketed_batches(
    lengths: list[int], bs: int, generator: torch.Generator, pool: int = 8
) -> list[torch.Tensor]:
    """One epoch of shuffled batches whose inputs have similar lengths, so little padding is computed.

    A random permutation is cut into pools of `pool` batches; each pool is sorted by length and cut into batches;
    the batches are then shuffled. Every sample appears once per epoch, and batch order stays random.
    """
    order = torch.randperm(len(lengths), generator=generator)
    batches = []
    for k in range(0, len(order), bs * pool):
        chunk = order[k : k + bs * pool]
        chunk = chunk[torch.argsort(torch.tensor([lengths[i] for i in chunk.tolist()]), stable=True)]
        batches += list(chunk.split(bs))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA adapts as a matrix: torch's Linear, or transformers' Conv1D (GPT-2: a linear layer whose
    weight is stored in x out; PEFT adapts it with fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _adapted_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Linear modules PEFT will adapt: a name equal to a target or ending in '.target'."""
    names = [
        n
        for n, m in model.named_modules()
        if is_linear(m) and any(n == t or n.endswith("." + t) for t in targets)
    ]
    if not names:
        raise PMError(f"--target-modules: no linear module of the model is named {', '.join(targets)}")
    return names


def training_device(cfg: TrainConfig) -> torch.device:
    """The device this process trains on, after the checks that need no data (the batch splits over the ranks,
    the kernel can draw what the options ask)."""
    distributed.check_batch(cfg.batch_size)
    if cfg.kernel == "triton" and _sliced_samples(cfg):
        raise PMError("--kernel: triton cannot draw per-sample s across ranks; use --perturb-per step")
    return _device(cfg.device)
