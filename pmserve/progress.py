"""Progress of a training run: rich bars on a terminal, plain timestamped lines anywhere else.

A run can take an hour on a CPU, and is often started under nohup, in CI or with its output in a log file,
where a progress bar prints nothing until it ends. So when stdout is not a terminal each epoch and each task
prints one line with the elapsed time and an estimate of what is left (from the steps done so far, which is
where the time goes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class TrainProgress:
    """Steps of every task still to train, counted as they are taken.

    mode: "bar" (rich, on a terminal), "lines" (one line per epoch and task) or "off".
    """

    def __init__(self, total_steps: int, mode: str = "auto", log: Callable[[str], None] = print):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode, self.log, self.total = mode, log, max(total_steps, 1)
        self.done, self.start = 0, time.perf_counter()
        self._bar = self._bar_task = None
        self._task_steps = self._task_done = 0
        self._name, self._loss = "", None

    def __enter__(self) -> TrainProgress:
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def task_started(self, name: str, steps: int) -> None:
        self._name, self._task_steps, self._task_done = name, steps, 0
        if self._bar is not None:
            self._bar_task = self._bar.add_task(name, total=steps)

    def step(self, loss) -> None:
        self.done += 1
        self._task_done += 1
        self._loss = loss.detach() if hasattr(loss, "detach") else loss  # read later, without its graph
        if self._bar is not None:
            self._bar.update(
                self._bar_task, advance=1, description=f"{self._name} loss {float(self._loss):.3f}"
            )

    def epoch_done(self, epoch: int, epochs: int) -> None:
        if self.mode == "lines":
            loss = "" if self._loss is None else f" loss {float(self._loss):.3f}"
            self.log(f"{self._name}: epoch {epoch}/{epochs}{loss}, {self._times()}")

    def task_done(self, line: str) -> None:
        """The task's result line (printed in every mode but off)."""
        if self.mode != "off":
            self.log(f"{line}, {self._times()}" if self.mode == "lines" else line)

    def _times(self) -> str:
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return f"elapsed {_clock(elapsed)}, about {_clock(left)} left"
