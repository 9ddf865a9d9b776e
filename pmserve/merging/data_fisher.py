"""`pmserve merge --data`: the Fisher of adapters trained elsewhere, from their tasks' training data.

A PEFT adapter trained elsewhere has neither a Fisher nor a pmserve head, so DataFisher rebuilds the model at
theta*_t, fits a classifier on that model's own training features (class-mean prototypes with cosine logits at
the training cosine scale: it needs no training and its cross-entropy is well defined), and takes the Fisher as
training does (pmserve.task_fisher, the one implementation), scaled to the task's loss profile along the
adapter's own step (merging.curvature) as training scales its Fisher.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch

from ..adapters import Tensors, apply_delta
from ..backbone import load_encoder, split_features
from ..defaults import TRAIN_COSINE_SCALE, TRAIN_FISHER_SAMPLES, UNKNOWN_MAX_LENGTH
from ..errors import PMError
from ..task_fisher import (
    find_linears,
    fisher_generator,
    fisher_order,
    loss_profile,
    prototype_logits,
    task_fisher,
)
from ..tasks import Task
from .curvature import PROFILE_POINTS, profile_curvature, rescale


class DataFisher:
    """Computes F_t over task t's training data at theta*_t = W_0 + theta, one task at a time, on one model."""

    def __init__(
        self,
        base: str,
        modules: list[str],
        tasks: list[Task],
        seed: int = 0,
        samples: int = TRAIN_FISHER_SAMPLES,
        batch_size: int = 32,
        max_length: int = UNKNOWN_MAX_LENGTH,
        scale: float = TRAIN_COSINE_SCALE,
        device: str = "cpu",
        labels: str = "sampled",
        curvature: str = "profile",
    ):
        if samples < 1:
            raise PMError(f"--fisher-samples: must be at least 1, got {samples}")
        kinds = {t.kind for t in tasks}
        if len(kinds) != 1:
            raise PMError("--data: mixes text and image tasks")
        self.tasks, self.seed, self.samples, self.batch_size, self.scale = (
            tasks,
            seed,
            samples,
            batch_size,
            scale,
        )
        self.sampled, self.profiled = labels == "sampled", curvature == "profile"
        self.device = torch.device(device)
        encoder, self.prep, _ = load_encoder(base, kinds.pop(), max_length)
        self.encoder = encoder.float().to(self.device)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.layers = find_linears(self.encoder.model, modules)
        for m in self.layers.values():
            m.weight.requires_grad_(True)  # only the adapted weights' gradients are needed
        self.w0 = {k: m.weight.detach().clone() for k, m in self.layers.items()}

    def _place(self, theta: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, m in self.layers.items():
                m.weight.copy_(apply_delta(self.w0[k], theta[k]))

    def __call__(
        self, index: int, theta: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor] | None = None
    ) -> Tensors:
        """F of task `index` with the adapted weights at W_0 + theta[module] (theta*_t relative to W_0); with the
        adapter's own `delta`, scaled to the task's loss at theta*_t - (1 - s) Delta_t (merging.curvature) as
        training scales its Fisher (there the head is the training head, here the prototypes)."""
        task = self.tasks[index]
        self._place(theta)
        logits = prototype_logits(
            split_features(self.encoder, self.prep, task.train, self.device),
            task.train.labels,
            task.classes,
            self.scale,
        )
        gen = fisher_generator(self.seed, index)
        order = fisher_order(task.train, self.samples, gen)
        fisher = task_fisher(
            self.encoder,
            self.prep,
            self.layers,
            task.train,
            task.classes,
            logits,
            order,
            self.batch_size,
            self.device,
            sample_labels=gen if self.sampled else None,
        )
        for m in self.layers.values():
            m.weight.grad = None
        if self.profiled and delta is not None:

            @contextmanager
            def at(s: float):  # the adapted weights at theta*_t - (1 - s) Delta_t, then back at theta*_t
                self._place({k: theta[k] - (1.0 - s) * delta[k].to(theta[k].dtype) for k in theta})
                try:
                    yield
                finally:
                    self._place(theta)

            losses = loss_profile(
                self.encoder,
                self.prep,
                task.train,
                task.classes,
                logits,
                order,
                self.batch_size,
                self.device,
                at,
                PROFILE_POINTS,
            )
            fisher, _ = rescale(fisher, delta, profile_curvature(PROFILE_POINTS, losses))
        return fisher
