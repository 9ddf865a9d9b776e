"""Training on several processes with PyTorch's own stack: torchrun starts them, torch.distributed joins them.

torchrun (or `pmserve train --nproc N`, which runs torchrun's elastic agent) starts one process per device and
sets RANK, WORLD_SIZE and LOCAL_RANK; `session` joins the process group (nccl on CUDA, gloo on CPU). Every
helper below is a no-op in a single process, so training has one code path and one process behaves exactly as
before. What each rank does with these helpers, and why N ranks follow one process's trajectory, is in train.py.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import PMError

T = TypeVar("T")


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def restarted() -> bool:
    """Whether torchrun restarted the workers (--max-restarts): the run then resumes from its last task."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _active() -> bool:
    return world() > 1 and dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the length of a run: nccl for CUDA devices, gloo for the CPU."""
    if world() == 1 or dist.is_initialized():
        yield
        return
    if restarted() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and is_main():
        # torchrun >= 2.5 hands the workers its rendezvous store, and a new attempt can read a dead one's keys
        warnings.warn(
            "torchrun restarted the workers on its shared store, where process-group setup can hang "
            "(pytorch/pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun",
            stacklevel=2,
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_batch(batch_size: int, ranks: int | None = None) -> None:
    """--batch-size is the global batch; every full batch must split evenly over the ranks (default: world())."""
    ranks = ranks or world()
    if batch_size % ranks:
        raise PMError(f"--batch-size: {batch_size} does not split evenly over {ranks} ranks")


def shard(n: int) -> slice:
    """This rank's contiguous part of n items (the first n % world ranks get one more; a part may be empty)."""
    q, extra = divmod(n, world())
    start = rank() * q + min(rank(), extra)
    return slice(start, start + q + (rank() < extra))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, in place (t itself in one process)."""
    if _active():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if _active():
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """fn() on rank 0 only; every rank gets its result, or raises its PMError, so a user error stops all ranks."""
    if not _active():
        return fn()
    box: list = [None]
    if is_main():
        try:
            box[0] = (fn(), None)
        except PMError as e:
            box[0] = (None, str(e))
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise PMError(error)
    return value


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP around module on several ranks, so backward averages the gradients; the module itself in one process.

    No initial broadcast of the weights (init_sync=False): every rank builds them identically from the same seeds
    and the same files, and a broadcast of a whole backbone per task would cost more than it checks.
    """
    if not _active():
        return module
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, init_sync=False)


def launch(nproc: int, argv: list[str]) -> None:
    """Run `python -m pmserve ARGV` as nproc processes on this machine under torchrun's elastic agent."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "pmserve", *argv]))
    except ChildFailedError as e:
        r, failure = e.get_first_failure()
        raise PMError(f"rank {r} failed (exit code {failure.exitcode}); its error is printed above") from None
