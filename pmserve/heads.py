"""Classifiers over backbone features: the training head and the inference classifier.

LoRA needs a loss while it trains, so every run has a *training head*: one row per label, created when the
label is first seen, trained only while a task contains that label, with cross-entropy over that task's labels
(per-task heads in a class-incremental sequence; shared rows in a domain-incremental one). `linear` rows have a
bias; `cosine` rows compare normalised features and weights with a fixed scale.

The *inference classifier* (`--head`) scores every label seen so far. `linear` and `cosine` use the training
head itself. `prototype` and `ridge` are rebuilt from statistics of each task's training features computed with
the merged model right after each merge (exemplar-free: sums, counts and a Gram matrix, never the data):
`prototype` predicts the nearest class mean by cosine (SimpleCIL/APER); `ridge` is RanPAC's ridge regression on
a fixed, seeded random ReLU projection, with lambda chosen after every task by generalised cross-validation on the
accumulated statistics of every class seen (`gcv`, no data needed), or, as runs before it did, on a held-out part
of the current task's data only (`holdout`). With `--ridge-drift linear` (the default), ridge's stored statistics
are carried into each new backbone's feature space by the drift the new task's own rows show, as far as that
drift carries from one of its classes to another (`Ridge.carry`, `drift_map`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import rejection
from .errors import PMError

HEADS = ("linear", "cosine", "prototype", "ridge")
TRAIN_HEADS = ("linear", "cosine")
RIDGE_LAMBDAS = tuple(10.0**k for k in range(-1, 7))  # the holdout rule's grid
GCV_LAMBDAS = tuple(10.0 ** (k / 4) for k in range(-8, 41))  # 1e-2 .. 1e10, four points a decade
RIDGE_SELECT = ("gcv", "holdout")
RIDGE_DRIFT = ("linear", "none")  # Ridge.carry after every merge, or the stored statistics as they were


def gcv_scores(
    G: torch.Tensor,
    Q: torch.Tensor,
    n: float,
    lambdas: tuple[float, ...] = GCV_LAMBDAS,
    tss: float | None = None,
) -> torch.Tensor:
    """Generalised cross-validation of ridge regression, from its sufficient statistics.

    With G = H^T H = V diag(d) V^T, Q = H^T Y, R = V^T Q and tss = tr(Y^T Y) (n for one-hot rows, the
    default), the fit W = (G + lambda I)^-1 Q leaves RSS = tss - sum_j |R_j|^2 (d_j + 2 lambda) / (d_j + lambda)^2
    with df = sum_j d_j / (d_j + lambda) degrees of freedom, and GCV = n RSS / (n - df)^2 (Golub, Heath and
    Wahba 1979): a rotation-invariant leave-one-out error that needs no held-out data, only G, Q, n and tss.
    One eigendecomposition serves every lambda.
    """
    d, V = torch.linalg.eigh(G.double())
    d = d.clamp_min(0.0)
    r2 = (V.T @ Q.double()).pow(2).sum(1)
    tss = n if tss is None else tss
    out = []
    for lam in lambdas:
        rss = tss - float((r2 * (d + 2 * lam) / (d + lam).pow(2)).sum())
        df = float((d / (d + lam)).sum())
        out.append(n * max(rss, 0.0) / max(n - df, 1e-12) ** 2)
    return torch.tensor(out, dtype=torch.float64)


def drift_map(
    before: torch.Tensor, after: torch.Tensor, groups: list[str] | None = None
) -> tuple[torch.Tensor, float] | None:
    """The linear map M with after ~ before @ M, fitted on the same rows under two backbones, and its penalty
    mu; None where the rows say "no drift" (M = I), so that the caller can leave its statistics alone.

    Ridge regression of the change (after - before) on before, so M = I + (B^T B + mu I)^-1 B^T (A - B): the
    penalty shrinks M toward the identity (no drift) where the rows say little, so the map needs no setting of
    its own. The map is meant for classes it was not fitted on, so with each row's class in `groups`, mu is
    chosen by leaving one class out, with "no drift" (M = I) among the choices: the rows are asked whether the
    map carries to a class they did not fit, and a single class cannot tell, so it gets M = I. Without
    `groups`, GCV on the rows chooses mu (the rule before classes were asked; it also fits drift no other class
    shares, which cost up to 1.7 points on 2-class tasks, BENCHMARKS.md).
    """
    B, A = before.double(), after.double()
    D = A - B
    if groups is not None:
        best = int(class_held_out_errors(B, D, groups).argmin()) if len(set(groups)) > 1 else len(GCV_LAMBDAS)
        if best == len(GCV_LAMBDAS):
            return None
    G, C = B.T @ B, B.T @ D
    if groups is None:
        best = int(gcv_scores(G, C, len(B), tss=float(D.pow(2).sum())).argmin())
    mu = GCV_LAMBDAS[best]
    eye = torch.eye(B.shape[1], dtype=torch.float64)
    return eye + torch.linalg.solve(G + mu * eye, C), mu


def class_held_out_errors(
    B: torch.Tensor, D: torch.Tensor, groups: list[str], lambdas: tuple[float, ...] = GCV_LAMBDAS
) -> torch.Tensor:
    """Leave-one-class-out error of the ridge fit of D on B, one per lambda, then one for "no fit" (X = 0).

    For each class c, X = (B_r^T B_r + lambda I)^-1 B_r^T D_r is fitted on the other rows r and the error is
    |B_c X - D_c|^2. One eigendecomposition per class serves every lambda, of the smaller of B_r B_r^T = U diag(e)
    U^T (the dual form, fewer rows than features, as a task's rows usually are) and B_r^T B_r = V diag(e) V^T: then
    B_c X = S diag(w) T with w = 1 / (e + lambda) and S = B_c B_r^T U, T = U^T D_r (dual) or S = B_c V,
    T = V^T B_r^T D_r (primal), and each lambda costs one quadratic form:
    w^T ((S^T S) o (T T^T)) w - 2 w . diag(S^T D_c T^T) + |D_c|^2.
    """
    lab = list(groups)
    errs = torch.zeros(len(lambdas) + 1, dtype=torch.float64)
    for c in dict.fromkeys(lab):
        held = torch.tensor([y == c for y in lab])
        Bc, Dc, Br, Dr = B[held], D[held], B[~held], D[~held]
        if len(Br) <= Br.shape[1]:
            e, U = torch.linalg.eigh(Br @ Br.T)
            S, T = Bc @ Br.T @ U, U.T @ Dr
        else:
            e, V = torch.linalg.eigh(Br.T @ Br)
            S, T = Bc @ V, V.T @ (Br.T @ Dr)
        e = e.clamp_min(0.0)
        quad, lin, dc = (S.T @ S) * (T @ T.T), ((S.T @ Dc) * T).sum(1), float(Dc.pow(2).sum())
        for k, lam in enumerate(lambdas):
            w = 1.0 / (e + lam)
            errs[k] += float(w @ quad @ w - 2 * w @ lin) + dc
        errs[-1] += dc
    return errs


def linear_scores(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """feats @ W^T + b: the linear head."""
    return feats @ weight.T + bias


def cosine_scores(feats: torch.Tensor, unit_rows: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * cos(feats, rows) with rows already normalised: the cosine head (scale 16), prototypes (scale 1)."""
    s = F.normalize(feats, dim=-1) @ unit_rows.T
    return s if scale == 1.0 else scale * s


def ridge_scores(feats: torch.Tensor, projection: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RanPAC: relu(feats @ P) @ W, the product in W's dtype."""
    return torch.relu(feats @ projection).to(weight.dtype) @ weight


class LabelHead(nn.Module):
    """Training head: a weight row (and bias) per label seen, in first-seen order."""

    def __init__(self, dim: int, kind: str = "linear", scale: float = 16.0):
        super().__init__()
        if kind not in TRAIN_HEADS:
            raise PMError(f"--train-head: unknown head {kind!r} (choose from {', '.join(TRAIN_HEADS)})")
        self.dim, self.kind, self.scale = dim, kind, scale
        self.labels: list[str] = []
        self.weight = nn.Parameter(torch.zeros(0, dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(0), requires_grad=False)

    def add_labels(self, labels: list[str], generator: torch.Generator) -> None:
        new = [y for y in labels if y not in self.labels]
        if not new:
            return
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default init, drawn from our seeded generator
        w = (torch.rand(len(new), self.dim, generator=generator) * 2 - 1) * bound
        b = (torch.rand(len(new), generator=generator) * 2 - 1) * bound
        dev = self.weight.device
        self.weight = nn.Parameter(torch.cat([self.weight.data, w.to(dev)]), requires_grad=False)
        self.bias = nn.Parameter(torch.cat([self.bias.data, b.to(dev)]), requires_grad=False)
        self.labels += new

    def index(self, labels: list[str]) -> torch.Tensor:
        pos = {y: i for i, y in enumerate(self.labels)}
        return torch.tensor([pos[y] for y in labels], dtype=torch.long, device=self.weight.device)

    def rows(self, labels: list[str]) -> tuple[nn.Parameter, nn.Parameter]:
        """Trainable copies of the rows of `labels`; `commit` writes them back after the task."""
        idx = self.index(labels)
        return nn.Parameter(self.weight.data[idx].clone()), nn.Parameter(self.bias.data[idx].clone())

    def commit(self, labels: list[str], w: torch.Tensor, b: torch.Tensor) -> None:
        idx = self.index(labels)
        self.weight.data[idx] = w.detach()
        self.bias.data[idx] = b.detach()

    def logits(
        self, feats: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        w = self.weight if w is None else w
        b = self.bias if b is None else b
        if self.kind == "cosine":
            return cosine_scores(feats, F.normalize(w, dim=-1), self.scale)
        return linear_scores(feats, w, b)

    scores = logits

    def state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.data.cpu(), "bias": self.bias.data.cpu()}

    def load(self, state: dict[str, torch.Tensor], labels: list[str]) -> None:
        self.labels = list(labels)
        dev = self.weight.device
        self.weight = nn.Parameter(state["weight"].to(dev).float(), requires_grad=False)
        self.bias = nn.Parameter(state["bias"].to(dev).float(), requires_grad=False)


class Prototypes:
    """Nearest class mean by cosine; the state is per-class feature sums and counts."""

    def __init__(self, dim: int):
        self.dim = dim
        self.labels: list[str] = []
        self.sums = torch.zeros(0, dim, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.float64)

    def _grow(self, labels: list[str]) -> torch.Tensor:
        new = [y for y in dict.fromkeys(labels) if y not in self.labels]
        if new:
            self.labels += new
            self.sums = torch.cat([self.sums, torch.zeros(len(new), self.dim, dtype=torch.float64)])
            self.counts = torch.cat([self.counts, torch.zeros(len(new), dtype=torch.float64)])
        pos = {y: i for i, y in enumerate(self.labels)}
        return torch.tensor([pos[y] for y in labels], dtype=torch.long)

    def update(self, feats: torch.Tensor, labels: list[str]) -> None:
        idx = self._grow(labels)
        self.sums.index_add_(0, idx, feats.detach().cpu().double())
        self.counts.index_add_(0, idx, torch.ones(len(labels), dtype=torch.float64))

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        m = self.means().to(feats.device, feats.dtype)
        return cosine_scores(feats, F.normalize(m, dim=-1))

    def state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "counts": self.counts}

    def load(self, state: dict[str, torch.Tensor], labels: list[str]) -> None:
        self.labels = list(labels)
        self.sums, self.counts = state["sums"].double(), state["counts"].double()


def random_projection(dim: int, size: int, seed: int) -> torch.Tensor:
    """RanPAC's fixed projection (dim, size), N(0, 1) entries, reproducible from (seed, size) alone."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, size, generator=g)


class Ridge:
    """Ridge regression on relu(features @ P) to one-hot targets, from an accumulated Gram matrix.

    State: G = sum h h^T (size x size), Q = sum h y^T (size x classes) and n, the number of rows added;
    weights = (G + lambda I)^-1 Q. `select` is how lambda is chosen when it is not fixed (RIDGE_SELECT).
    `reject` (0: off) is the share of in-scope rows out-of-scope rejection keeps: then `counts` holds the
    histogram its threshold is read from, of `reject_score` (pmserve.rejection.SCORES: "cosine", the fit, for
    every classifier made now; "top" for those saved before it).
    """

    def __init__(
        self,
        dim: int,
        size: int = 2000,
        seed: int = 0,
        lam: float | None = None,
        select: str = "gcv",
        reject: float = 0.0,
        reject_score: str = "cosine",
    ):
        need = size * size * 8 * 3 / 2**30  # G, its solve copy and Cholesky factor, float64
        if size < 1:
            raise PMError(f"--ridge-dim: must be positive, got {size}")
        if need > 8:
            raise PMError(
                f"--ridge-dim: {size} needs about {need:.1f} GiB for the Gram matrix; use a smaller one"
            )
        if lam is not None and lam <= 0:
            raise PMError(f"--ridge-lambda: must be > 0, got {lam}")
        if select not in RIDGE_SELECT:
            raise PMError(f"--ridge-select: must be gcv or holdout, got {select!r}")
        self.dim, self.size, self.seed, self.fixed_lam, self.select = dim, size, seed, lam, select
        self.n = 0.0
        self.on_edge: bool | None = None  # whether the lambda fit chose ends its grid (None: not chosen here)
        self.P = random_projection(dim, size, seed)
        self.labels: list[str] = []
        self.G = torch.zeros(size, size, dtype=torch.float64)
        self.Q = torch.zeros(size, 0, dtype=torch.float64)
        self.lam = lam if lam is not None else RIDGE_LAMBDAS[0]
        self.W: torch.Tensor | None = None
        self.reject, self.reject_score = reject, reject_score
        self.counts = torch.zeros(rejection.BINS, dtype=torch.float64)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.relu(feats.detach().cpu().float() @ self.P).double()  # the features G and Q are sums of

    def _targets(self, labels: list[str]) -> torch.Tensor:
        new = [y for y in dict.fromkeys(labels) if y not in self.labels]
        if new:
            self.labels += new
            self.Q = torch.cat([self.Q, torch.zeros(self.size, len(new), dtype=torch.float64)], 1)
        pos = {y: i for i, y in enumerate(self.labels)}
        return F.one_hot(torch.tensor([pos[y] for y in labels]), len(self.labels)).double()

    def update(self, feats: torch.Tensor, labels: list[str]) -> None:
        h, y = self.project(feats), self._targets(labels)
        self.G += h.T @ h
        self.Q += h.T @ y
        self.n += len(labels)

    def carry(
        self, before: torch.Tensor, after: torch.Tensor, labels: list[str] | None = None
    ) -> float | None:
        """Move the stored statistics into a changed backbone's feature space (drift compensation).

        The stored rows were projected under earlier backbones; a merge moves the features a little
        (BENCHMARKS.md: "Classifier drift"). The drift a task's own rows show between the backbone before
        and after it, `before` and `after` (same rows), is fitted as a linear map M of projected features,
        and G, Q become the statistics of the stored rows mapped by it: M^T G M and M^T Q. Exemplar-free:
        the old rows are never needed, as in semantic drift compensation (Yu et al. 2020), here for second
        moments. `labels` (the rows' classes) let drift_map check that the map carries across classes.
        Returns the map's penalty mu (run records show it), None where the statistics stayed as they were.
        """
        fitted = drift_map(self.project(before), self.project(after), labels) if self.n else None
        if fitted is None:
            return None
        M, mu = fitted
        G = M.T @ self.G @ M
        self.G = (G + G.T) / 2  # exactly symmetric, as a sum of outer products is
        self.Q = M.T @ self.Q
        self.W = None
        return mu

    def solve(self, lam: float) -> torch.Tensor:
        eye = torch.eye(self.size, dtype=torch.float64)
        return torch.linalg.solve(self.G + lam * eye, self.Q)

    def fit(self, feats: torch.Tensor, labels: list[str], holdout: float = 0.2, seed: int = 0) -> float:
        """Add a task's features and choose lambda unless fixed: by GCV over every row added so far, or on a
        held-out part of this task's features. Returns lambda; `on_edge` says whether it ends its grid."""
        self.on_edge = False
        if self.fixed_lam is None and self.select == "gcv":
            self.update(feats, labels)
            scores = gcv_scores(self.G, self.Q, self.n)
            best = int(torch.argmin(scores))
            self.lam, self.on_edge = GCV_LAMBDAS[best], best in (0, len(GCV_LAMBDAS) - 1)
        elif self.fixed_lam is None and len(labels) >= 5:
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(labels), generator=g)
            n_val = max(1, int(len(labels) * holdout))
            val, fit = perm[:n_val], perm[n_val:]
            self.update(feats[fit], [labels[i] for i in fit])
            hv = self.project(feats[val])
            yv = self._targets([labels[i] for i in val]).argmax(1)
            accs = [
                (float((hv @ self.solve(lam)).argmax(1).eq(yv).double().mean()), -i)
                for i, lam in enumerate(RIDGE_LAMBDAS)
            ]
            self.lam = RIDGE_LAMBDAS[-max(accs)[1]]  # best accuracy; ties go to the smallest lambda
            self.on_edge = self.lam in (RIDGE_LAMBDAS[0], RIDGE_LAMBDAS[-1])
            self.update(feats[val], [labels[i] for i in val])
        else:
            self.update(feats, labels)
            self.lam = self.fixed_lam if self.fixed_lam is not None else self.lam
        self.W = self.solve(self.lam)
        if self.reject:
            h, y = self.project(feats), self._targets(labels)
            self.counts += rejection.calibration_counts(
                h, y, self.G, self.lam, self.W, self.Q, self.reject_score
            )
        return self.lam

    def threshold(self) -> float | None:
        """The fit (or top score: `reject_score`) below which a request is out of scope (None: rejection off)."""
        return rejection.threshold(self.counts, self.reject) if self.reject else None

    def fits(self, feats: torch.Tensor) -> torch.Tensor:
        """Each row's fit (pmserve.rejection.top_cosines): what a "cosine" threshold is compared with."""
        return rejection.top_cosines(self.project(feats), self.Q).float()

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        if self.W is None:
            self.W = self.solve(self.lam)
        return ridge_scores(feats.detach().cpu().float(), self.P, self.W).to(feats.device, torch.float32)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"G": self.G, "Q": self.Q, "n": torch.tensor([self.n], dtype=torch.float64)}
        return out | ({"reject_counts": self.counts} if self.reject else {})

    def load(self, state: dict[str, torch.Tensor], labels: list[str], lam: float) -> None:
        """A saved classifier; one saved before n was kept (holdout only) counts n as 0."""
        self.labels, self.lam = list(labels), lam
        self.G, self.Q = state["G"].double(), state["Q"].double()
        self.n = float(state["n"]) if "n" in state else 0.0
        if self.reject:
            self.counts = state["reject_counts"].double()
        self.W = self.solve(lam)


# ---------------------------------------------------------------- files: classifier.json + classifier.safetensors

Scorer = LabelHead | Prototypes | Ridge


def scorer_kind(scorer: Scorer) -> str:
    return (
        scorer.kind
        if isinstance(scorer, LabelHead)
        else "prototype"
        if isinstance(scorer, Prototypes)
        else "ridge"
    )


def save_scorer(scorer: Scorer, folder, prefix: str = "classifier") -> None:
    """Write the inference classifier as `{prefix}.json` (kind, labels, sizes) + `{prefix}.safetensors`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    meta = {"kind": scorer_kind(scorer), "labels": scorer.labels, "dim": scorer.dim}
    if isinstance(scorer, LabelHead):
        meta["scale"] = scorer.scale
    if isinstance(scorer, Ridge):
        meta.update(
            size=scorer.size,
            seed=scorer.seed,
            lambda_=scorer.lam,
            fixed_lambda=scorer.fixed_lam is not None,
            select=scorer.select,
        )
        if scorer.reject:
            meta.update(
                reject=scorer.reject, reject_score=scorer.reject_score, reject_threshold=scorer.threshold()
            )
    save_file({k: v.contiguous() for k, v in scorer.state().items()}, str(folder / f"{prefix}.safetensors"))
    (folder / f"{prefix}.json").write_text(json.dumps(meta, indent=2))


def load_scorer(folder, prefix: str = "classifier") -> Scorer:
    """Read what save_scorer wrote; a missing or inconsistent file is a PMError naming it."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, tensor_path = folder / f"{prefix}.json", folder / f"{prefix}.safetensors"
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(tensor_path))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise PMError(f"{folder}: unreadable classifier ({e})") from None
    kind, labels, dim = meta.get("kind"), meta.get("labels"), meta.get("dim")
    if kind in TRAIN_HEADS:
        s: Scorer = LabelHead(dim, kind, meta.get("scale", 16.0))
        s.load(state, labels)
        rows = s.weight.shape
    elif kind == "prototype":
        s = Prototypes(dim)
        s.load(state, labels)
        rows = s.sums.shape
    elif kind == "ridge":
        fixed = meta["lambda_"] if meta.get("fixed_lambda") else None
        s = Ridge(
            dim, meta["size"], meta["seed"], fixed, meta.get("select", "holdout"), meta.get("reject", 0.0)
        )
        s.reject_score = meta.get("reject_score", "top")  # saved before the fit: the top score, as then
        if s.reject_score not in rejection.SCORES:
            raise PMError(f"{meta_path}: unknown reject_score {s.reject_score!r}")
        if s.reject and "reject_counts" not in state:
            raise PMError(f"{tensor_path}: no reject_counts, but {meta_path} says rejection is on")
        s.load(state, labels, meta["lambda_"])  # a select missing (older classifiers): holdout
        rows = (s.Q.shape[1], dim)
    else:
        raise PMError(f"{meta_path}: unknown classifier kind {kind!r}")
    if rows != (len(labels), dim):
        raise PMError(
            f"{tensor_path}: holds {rows[0]} classes of size {rows[1]}, but {meta_path} says {len(labels)} of size {dim}"
        )
    return s
