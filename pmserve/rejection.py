"""Out-of-scope rejection: answer OUT_OF_SCOPE when no known class fits a request, exemplar-free.

An intent classifier meets requests that are none of its intents. The ridge head (RanPAC) scores every class
seen; a request whose *fit* is below a threshold is rejected. The fit is the largest cosine between the
request's projected features relu(fP) and a column of ridge's Q (a class's summed rows: its mean's direction):
new classes leave an old class's column as it was, where they lower its ridge scores, so a threshold read
while the first tasks were trained still means the same after the tenth (BENCHMARKS.md, "A rejection score
that survives growth"). Classifiers saved before it threshold the top ridge score instead (`reject_score`
"top"); they keep doing so.

The threshold is set from in-scope data only, so it needs no out-of-scope examples: when a task is trained,
each of its own training rows gets the fit it would have had the row been left out (exact in closed form:
its class's column less the row, `loo_top_cosines`; for "top", `loo_ridge_scores`), so no split of the task
is lost to calibration, and the fits of the rows that leave-one-out ridge still classifies right are added to
a fixed histogram (BINS counts, constant in the number of tasks). The threshold is the fit that keeps
`accept` of those rows: rejection then costs about 1 - accept of the in-scope accuracy, by construction.

The histogram is part of ridge's saved state (classifier.safetensors), so it is carried bitwise across merges,
--resume and --add, and `pmserve export` writes the threshold into the bundle's manifest and the fit as the
graph's second output, `fit`, where predict and the server read them. Old tasks' rows were scored by the
classifier of their time; the histogram keeps them as they were (it cannot rescore them without their data).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OUT_OF_SCOPE = "<out of scope>"  # angle brackets: no task's label can be it (tasks.check_tasks refuses it)
BINS, LOW, HIGH = (
    1500,
    -1.0,
    2.0,
)  # top ridge scores sit near [0, 1]; outside the range they count at its ends
ACCEPT_ALL = -1e30  # the threshold where no bin can be rejected (finite: JSON has no infinity)
FIT = "fit"  # the name of the exported graph's second output, each row's fit
SCORES = {
    "cosine": "top cosine",
    "top": "top class score",
}  # what a classifier thresholds -> the manifest's words


def loo_ridge_scores(
    H: torch.Tensor, Y: torch.Tensor, G: torch.Tensor, lam: float, W: torch.Tensor
) -> torch.Tensor:
    """Leave-one-out scores of rows H (targets Y, one-hot) that are part of the ridge fit W = (G + lam I)^-1 Q.

    With leverage l_i = h_i^T (G + lam I)^-1 h_i, the fit without row i predicts
    y_i - (y_i - h_i W) / (1 - l_i) (the leave-one-out identity of least squares; Allen 1974), so every row's
    held-out score costs one solve, not one refit per row.
    """
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype)
    lev = (H * torch.linalg.solve(A, H.T).T).sum(1, keepdim=True)
    fit = H @ W
    return Y - (Y - fit) / (1 - lev).clamp_min(1e-12)


def top_cosines(H: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Each row's fit: its largest cosine with a column of Q (ridge's H^T Y: a class's summed rows)."""
    return (F.normalize(H, dim=1) @ F.normalize(Q, dim=0)).max(1).values


def loo_top_cosines(H: torch.Tensor, targets: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """top_cosines of rows H that are part of Q (`targets`: their class indices), each row's own class column
    without the row (Q_c - h_i: exact leave-one-out, as loo_ridge_scores is for ridge's scores)."""
    Hn = F.normalize(H, dim=1)
    cos = Hn @ F.normalize(Q, dim=0)
    own = (Hn * F.normalize(Q[:, targets].T - H, dim=1)).sum(1)
    cos[torch.arange(len(H)), targets] = own
    return cos.max(1).values


def histogram(top: torch.Tensor) -> torch.Tensor:
    """Counts of `top` scores in BINS equal bins over [LOW, HIGH] (values outside count at the ends)."""
    k = ((top.double() - LOW) / (HIGH - LOW) * BINS).floor().clamp(0, BINS - 1).long()
    return torch.bincount(k, minlength=BINS).double()


def calibration_counts(
    H: torch.Tensor,
    Y: torch.Tensor,
    G: torch.Tensor,
    lam: float,
    W: torch.Tensor,
    Q: torch.Tensor,
    score: str,
) -> torch.Tensor:
    """The histogram of a task's rows H (targets Y, one-hot; part of the fit W, Q) that rejection must keep: the
    leave-one-out `score` ("cosine": the fit; "top": the top ridge score) of the rows leave-one-out ridge
    classifies right."""
    top, pred = loo_ridge_scores(H, Y, G, lam, W).max(1)
    targets = Y.argmax(1)
    if score == "cosine":
        top = loo_top_cosines(H, targets, Q)
    return histogram(top[pred == targets])


def threshold(counts: torch.Tensor, accept: float) -> float:
    """The lower edge of the bin where the scores below it first exceed 1 - accept of the rows: scores at or
    above it are accepted, so at least `accept` of the calibration rows are (to the bins' resolution)."""
    total = float(counts.sum())
    if total == 0:
        return ACCEPT_ALL
    below = torch.cumsum(counts, 0) - counts  # rows in the bins strictly below each bin
    k = int((below <= (1 - accept) * total + 1e-9).nonzero().max())  # 1 - 0.8 is 0.19999...
    return (
        ACCEPT_ALL if k == 0 else LOW + (HIGH - LOW) * k / BINS - 1e-12
    )  # below the edge: its bin's rows pass


def top_labels(
    scores: np.ndarray, labels: list[str], reject: float | None, fit: np.ndarray | None = None
) -> list[str]:
    """Each row's top label, or OUT_OF_SCOPE where its fit (without one: its top score) is below `reject`
    (None: never)."""
    top = scores.argmax(1)
    if reject is None:
        return [labels[k] for k in top.tolist()]
    best = scores[np.arange(len(top)), top] if fit is None else fit
    return [labels[k] if s >= reject else OUT_OF_SCOPE for k, s in zip(top.tolist(), best.tolist())]
