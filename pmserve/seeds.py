"""Every seed pmserve derives from the user's --seed, in one place.

Each random draw of task t comes from its own seed, so a resumed run replays exactly what an uninterrupted one
drew, and every rank of a distributed run draws the same. The formulas are fixed: changing one changes every
result that depends on it.
"""

from __future__ import annotations

import torch

# the generator streams of task t (stream_generator)
HEAD_INIT, SHUFFLE, FISHER, GATE = 1, 2, 3, 4


def stream_generator(seed: int, task: int, stream: int) -> torch.Generator:
    """The generator of one stream of task `task`: head rows, batch order, Fisher samples and labels, the
    adaptation gate's held-out rows."""
    return torch.Generator().manual_seed(seed * 1_000_003 + task * 101 + stream)


def task_seed(seed: int, task: int) -> int:
    """Task `task`'s global-generator seed: PEFT's lora_A initialisation; DARE's pruning of module `task`."""
    return seed * 1_000_003 + task


def perturb_seed(seed: int, task: int) -> int:
    """The seed of task `task`'s perturbation draws (perturb.step_seed mixes in the step)."""
    return seed * 7919 + task


def ridge_seed(seed: int, task: int) -> int:
    """The seed of ridge's held-out split of task `task`'s training data."""
    return seed * 31 + task
