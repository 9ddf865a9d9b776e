"""Continual training with Perturb-and-Merge as a RUN: one task after another, one merged model after each.

A RUN folder (formats.run) holds config.json, plan.json, one folder per completed task (written under a temporary
name and renamed, so a killed run never leaves a half task), the state after the last task and metrics.json. This
module starts a RUN, continues it (`--resume`), grows it (`--add`) and keeps its plan; one task's learning is
pmserve.learner's. Every random draw of task t comes from generators seeded by (seed, t), and the merged weights
are always written as W_0 + D, so `--resume` replays the finished task folders and ends bitwise equal to a run
that was never interrupted. Under torchrun every rank runs this same loop; only rank 0 writes.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import distributed, metrics
from .adapters import (
    base_fingerprint,
)
from .backbone import Encoder, Preprocessor, load_encoder
from .errors import PMError
from .formats import MODEL_CARD, atomic_dir, read_json, write_json
from .formats import run as run_files
from .formats.peft import save_adapter
from .gate import choose_scale, split_task
from .learner import (
    EXECUTION_ONLY,
    Learner,
    TrainConfig,
    resolve_targets,
    training_device,
)
from .model_card import task_card
from .progress import TrainProgress
from .tasks import (
    Split,
    Task,
    builtin_tasks,
    check_tasks,
    is_task_folder,
    load_split,
    load_task_folder,
    load_tasks,
    save_split,
    task_folders,
    task_hash,
)


def _joint_task(tasks: list[Task]) -> Task:
    tr = Split([x for t in tasks for x in t.train.inputs], [y for t in tasks for y in t.train.labels])
    te = Split([x for t in tasks for x in t.test.inputs], [y for t in tasks for y in t.test.labels])
    classes = list(dict.fromkeys(y for t in tasks for y in t.classes))
    return Task("joint", tasks[0].kind, tr, te, classes)


# What a run whose config.json predates an option used for it, where that is not the option's default today.
PREDATES = {"fisher_labels": "true", "curvature": "fisher", "ridge_select": "holdout", "ridge_drift": "none"}
PER_TASK = ("epochs",)  # may differ for tasks added later: recorded in plan.json and each task.json


def _saved_config(raw: dict, where: Path | None = None) -> dict:
    """A saved config.json as today's TrainConfig fields: options added since get the value the run used.
    With `where` (a RUN about to be written), an option this pmserve does not know is refused: the RUN was
    made by a newer pmserve, and continuing it without that option would change what it computes."""
    names = {f.name for f in fields(TrainConfig)} - {"given"}
    unknown = sorted(k for k in raw if k not in names)
    if unknown and where is not None:
        raise PMError(
            f"{where}: options {', '.join(unknown)} are unknown to this pmserve (a newer one wrote this RUN); "
            "continue it with that version"
        )
    return {**PREDATES, **{k: v for k, v in raw.items() if k in names}}


def run_config(run: Path, writing: bool = False) -> TrainConfig:
    """The RUN's TrainConfig, every option given (a RUN keeps the values it recorded: decoder_config changes
    none); `writing`: for continuing it, where an unknown option is refused."""
    saved = _saved_config(run_files.read_config(run), Path(run) / run_files.CONFIG if writing else None)
    return TrainConfig(**saved, given=frozenset(f.name for f in fields(TrainConfig)))


def continued_config(run: Path, given: dict, adding: bool = False) -> tuple[TrainConfig, dict]:
    """The RUN's own configuration, and the per-task options for tasks added now.

    `given`: the options typed on the command line. --device, --kernel, --keep-test and --keep-fisher change
    nothing a run computes and replace the RUN's; --epochs applies to the tasks added now (--add); any other
    option that differs from the RUN's is refused, naming it: a RUN keeps one configuration.
    """
    run = Path(run)
    if not run_files.is_run(run):
        raise PMError(f"{run}: not a pmserve RUN (no {run_files.CONFIG} marked as one)")
    run_files.check_growable(run)
    cfg = run_config(run, writing=True)
    per_task = {}
    for k, v in given.items():
        if k in EXECUTION_ONLY:
            setattr(cfg, k, v)
        elif k in PER_TASK and adding:
            per_task[k] = v
        elif k == "data" and not adding:
            if _absolute_data(v) != cfg.data:
                raise PMError(
                    f"DATA: {v} is not the RUN's data, {cfg.data} ({run / run_files.CONFIG}); omit DATA with --resume"
                )
        elif getattr(TrainConfig(**{**asdict(cfg), k: v}), k) != getattr(
            cfg, k
        ):  # as normalised (0 = rank...)
            raise PMError(
                f"--{k.replace('_', '-')}: {v!r} differs from the RUN's {getattr(cfg, k)!r} ({run / run_files.CONFIG}); "
                "a RUN keeps its configuration (omit the option; only --device, --kernel, --keep-test, "
                "--keep-fisher and, with --add, --epochs may change)"
            )
    return cfg, per_task


def _absolute_data(data: str) -> str:
    """DATA as config.json records it: a folder's absolute path (commands work from any directory)."""
    return data if data.startswith("builtin:") else str(Path(data).resolve())


def _plan_entry(task: Task, source: dict, epochs: int) -> dict:
    return {
        "name": task.name,
        "kind": task.kind,
        "source": source,
        "sha256": task_hash(task),
        "epochs": epochs,
        "labels": task.classes,
        "examples": {"train": len(task.train.labels), "test": len(task.test.labels)},
    }


def _data_plan(cfg: TrainConfig, tasks: list[Task]) -> list[dict]:
    if cfg.data.startswith("builtin:"):
        sources = [{"builtin": cfg.data, "index": k} for k in range(len(tasks))]
    else:
        sources = [{"path": str(p)} for p in task_folders(Path(cfg.data))]
    return [_plan_entry(t, src, cfg.epochs) for t, src in zip(tasks, sources)]


def _load_planned(entry: dict, seed: int, index: int) -> Task:
    """A planned task from its recorded source, checked against its recorded hash."""
    src = entry["source"]
    if "builtin" in src:
        task = builtin_tasks(src["builtin"], seed)[src["index"]]
        where = f"{src['builtin']} task {src['index']}"
    else:
        task = load_task_folder(Path(src["path"]))
        where = src["path"]
    if task_hash(task) != entry["sha256"]:
        raise PMError(f"{where}: its data changed since it became task {index} of this RUN (sha256 differs)")
    return task


def _test_of(run: Path, index: int, entry: dict, seed: int) -> Split | None:
    """Task `index`'s test split: the RUN's copy, else its source while that still holds the same data, else
    None (not evaluated, never 0 accuracy)."""
    folder = run_files.task_dir(run, index, entry["name"])
    if (folder / run_files.TEST).is_file():
        return load_split(folder)
    try:
        return _load_planned(entry, seed, index).test
    except PMError:
        return None


def run_tests(run: Path) -> list[Task]:
    """Every finished task of a RUN with its test split (test None where it is no longer reachable)."""
    cfg, plan = run_config(run), run_files.read_plan(run)
    done = len(run_files.finished_tasks(run)) if cfg.method != "joint" else len(plan)
    out = []
    for j, e in enumerate(plan[:done]):
        out.append(Task(e["name"], e["kind"], Split([], []), _test_of(run, j, e, cfg.seed), e["labels"]))
    return out


def _prepare_out(out: Path, cfg: TrainConfig, resume: bool, model: nn.Module) -> None:
    """A new RUN's folder and config.json, or the checks before a RUN continues (`resume`). Called by the
    writer, under the RUN's writer lock."""
    cfg_path = out / run_files.CONFIG
    if cfg_path.exists():
        if not resume:
            raise PMError(
                f"{out}: already holds a run; pass --resume to continue it, --add to add tasks, or choose "
                "another --out"
            )
        run_files.check_growable(out)
        old = run_files.read_config(out)
        mine = cfg.results_key()
        # a key the older run's config lacks was added since: the run used PREDATES' value, else the default
        old = TrainConfig(**{"data": cfg.data, **_saved_config(old, cfg_path)}).saved()
        old["target_modules"] = resolve_targets(model, old["target_modules"])  # "all-linear" before 2026-12
        diff = [k for k in mine if old[k] != mine[k]]
        if diff:
            k = diff[0]
            raise PMError(
                f"{cfg_path}: holds another run's config ({k} is {old.get(k)!r}, this run's is {mine[k]!r})"
            )
        run_files.recover(out)
        return
    if out.exists() and any(out.iterdir()):
        raise PMError(f"{out}: exists and is not a pmserve run; choose an empty or new --out")
    (out / run_files.TASKS).mkdir(parents=True, exist_ok=True)
    run_files.write_config(out, cfg.saved())


def load_backbone(spec: str, kind: str, max_length: int) -> tuple:
    """(backbone, its preprocessor, its folder) for a RUN's kind of task: a decoder for generative tasks."""
    if kind == "generative":
        from .lm_learner import load_decoder

        return load_decoder(spec, max_length)
    return load_encoder(spec, kind, max_length)


def make_learner(cfg: TrainConfig, backbone: tuple, device: torch.device) -> Learner:
    """The learner of the backbone's kind: pmserve.learner's for encoders, lm_learner's for decoders."""
    from .lm_learner import Decoder, DecoderLearner

    model, prep, _ = backbone
    return (DecoderLearner if isinstance(model, Decoder) else Learner)(cfg, model, prep, device)


def open_run(run: Path, device: str = "cpu") -> tuple[TrainConfig, list[Task], Learner, list[Path]]:
    """A finished RUN for measurements: its config, tasks, a Learner in the state after its last task, and its
    task folders in order. Keys a newer TrainConfig does not know are ignored."""
    cfg = run_config(run)
    plan = run_files.read_plan(run)
    tasks = (
        [_load_planned(e, cfg.seed, i) for i, e in enumerate(plan)]
        if plan
        else load_tasks(cfg.data, cfg.seed)
    )
    learner = make_learner(cfg, load_backbone(cfg.model, tasks[0].kind, cfg.max_length), torch.device(device))
    snap = run_files.snapshot(run)
    learner.load_state(snap.state)
    return cfg, tasks, learner, snap.finished


def train(
    cfg: TrainConfig, out: Path | str, resume: bool = False, progress=True, log=print, on_task=None
) -> dict:
    """Run (or resume) continual training into `out`; returns the metrics dict also written to metrics.json.

    progress: True (bars on a terminal, else a line per epoch), False, or a TrainProgress mode.
    on_task: called as on_task(index, learner) after each task is on disk (benchmarks measure there).
    Under torchrun every rank calls this: rank 0 writes and logs, and a restart by torchrun resumes.
    """
    cfg.data = _absolute_data(cfg.data)
    cfg.validate()
    device = training_device(cfg)
    out = Path(out)
    resume = resume or distributed.restarted()
    with distributed.session(device):
        plan = run_files.read_plan(out) if resume else []
        loaded: dict[int, Task] = {}
        if not plan:  # a new run (or one killed before its plan was written): bad data fails before any write
            tasks = load_tasks(cfg.data, cfg.seed)
            loaded = dict(enumerate(tasks))
        kind = plan[0]["kind"] if plan else tasks[0].kind
        if kind == "generative":  # a decoder's own defaults; encoder-only options refused
            from .lm_learner import decoder_config

            decoder_config(cfg).validate()
        # a model that does not load fails before any write too
        backbone = load_backbone(cfg.model, kind, cfg.max_length)
        # config.json records the modules adapted, not the rule that chose them
        cfg.target_modules = resolve_targets(backbone[0].model, cfg.target_modules)
        with ExitStack() as held:
            _hold_writer(out, held)
            distributed.on_main(lambda: _prepare_out(out, cfg, resume, backbone[0].model))
            if resume and run_files.read_plan(out) != plan:
                raise PMError(f"{out}: its plan changed while this command started; run it again")
            if not plan:
                plan = _data_plan(cfg, tasks)
                distributed.on_main(lambda: run_files.write_plan(out, plan))
            return _continue(cfg, out, plan, loaded, backbone, device, progress, log, on_task)


def add_tasks(
    out: Path | str, paths: list[Path | str], given: dict | None = None, progress=True, log=print
) -> dict:
    """Append the tasks in `paths` (task folders, or DATA folders of task folders, in the order given) to the
    finished RUN `out` and train them: only their data is read; nothing finished is retrained or rewritten.
    `given`: options typed with --add (continued_config says which may differ). The same --add run again after
    it was interrupted (or restarted by torchrun) finishes it."""
    out = Path(out)
    cfg, per_task = continued_config(out, given or {}, adding=True)
    cfg.validate()
    if cfg.method == "joint":
        raise PMError(f"{out}: a joint run trains every task at once; it cannot grow (train a new joint run)")
    epochs = per_task.get("epochs", cfg.epochs)
    if epochs < 1:
        raise PMError(f"--epochs: must be at least 1, got {epochs}")
    folders = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise PMError(f"--add: {p}: task folder does not exist")
        folders += [p] if is_task_folder(p) else task_folders(p)
    if not folders:
        raise PMError("--add: no task folders given")
    new = [load_task_folder(p) for p in folders]
    entries = [_plan_entry(t, {"path": str(p.resolve())}, epochs) for t, p in zip(new, folders)]

    planned = run_files.read_plan(out)
    if not planned:
        raise PMError(
            f"{out}: no task is planned yet; `pmserve train --resume --out {out}` first, then --add"
        )
    kind = planned[0]["kind"]  # a RUN's kind never changes
    check_tasks(new, kind=kind, seen=[y for e in planned for y in e["labels"]])
    device = training_device(cfg)
    with distributed.session(device), ExitStack() as held:
        backbone = load_backbone(cfg.model, kind, cfg.max_length)
        _hold_writer(out, held)
        plan, first = distributed.on_main(lambda: _grow_plan(out, entries, folders))
        loaded = {first + k: t for k, t in enumerate(new)}
        return _continue(cfg, out, plan, loaded, backbone, device, progress, log)


def _grow_plan(out: Path, entries: list[dict], folders: list[Path]) -> tuple[list[dict], int]:
    """The RUN's plan with the tasks of this --add at its end, written, and where they start in it. Called by
    the writer, after it took the writer lock.

    An --add is a retry where the plan already ends with its first tasks (a killed --add, or one that
    finished: then nothing is left to do, and that is no error); the rest are appended. Anything else that
    is planned but not finished must be finished first (--resume), and a task already in the RUN elsewhere
    is a conflict."""
    run_files.recover(out)
    plan = run_files.read_plan(out)
    done = len(run_files.finished_tasks(out))
    have, mine = [e["sha256"] for e in plan], [e["sha256"] for e in entries]
    k = next((k for k in range(min(len(have), len(mine)), 0, -1) if have[-k:] == mine[:k]), 0)
    if done < len(plan) - k:
        raise PMError(
            f"{out}: task {done} of {len(plan)} is not finished; `pmserve train --resume --out {out}` "
            "first, then --add"
        )
    known = {h: i for i, h in enumerate(have)}
    for e, p in zip(entries[k:], folders[k:]):
        if e["sha256"] in known:
            raise PMError(f"--add: {p}: already in this RUN as task {known[e['sha256']]} (the same data)")
        known[e["sha256"]] = len(known)
    if entries[k:]:
        plan = plan + entries[k:]
        run_files.write_plan(out, plan)
    return plan, len(plan) - len(entries)


def _hold_writer(out: Path, held: ExitStack) -> None:
    """The RUN's writer lock, taken by the process that writes (rank 0 under torchrun) and held as long as
    `held`; a RUN another process writes stops every rank with that one line."""
    distributed.on_main(lambda: held.enter_context(run_files.writing(out)))


def _continue(
    cfg: TrainConfig,
    out: Path,
    plan: list[dict],
    loaded: dict[int, Task],
    backbone: tuple[Encoder, Preprocessor, Path],
    device: torch.device,
    progress,
    log,
    on_task=None,
) -> dict:
    """Train the RUN's planned tasks that are not finished, after restoring the state of the finished ones."""
    main = distributed.is_main()
    if not main:
        progress, log = False, lambda *_: None
    kind = plan[0]["kind"]
    model_dir = backbone[2]
    learner = make_learner(cfg, backbone, device)
    fingerprint = base_fingerprint(model_dir)
    joint = cfg.method == "joint"

    done = [read_json(f / run_files.TASK_INFO) for f in run_files.finished_tasks(out)]
    if done:
        learner.load_state(out / run_files.STATE)
        total = 1 if joint else len(plan)
        if len(done) < total:
            log(f"continuing {out} after task {len(done)} of {total}")
        else:
            log(
                f"{out}: all {total} tasks are finished, nothing to train (`pmserve train --add` grows a RUN)"
            )

    def task(i: int) -> Task:
        if i not in loaded:
            loaded[i] = _load_planned(plan[i], cfg.seed, i)
        return loaded[i]

    if joint:
        todo = [] if done else [(0, _joint_task([task(i) for i in range(len(plan))]), cfg.epochs)]
    else:
        todo = [(i, task(i), plan[i]["epochs"]) for i in range(len(done), len(plan))]
    labels = list(dict.fromkeys(y for e in plan[: len(done)] for y in e["labels"]))
    steps = sum(ep * -(-len(t.train.labels) // cfg.batch_size) for _, t, ep in todo)  # for the time left

    mode = progress if isinstance(progress, str) else "auto" if progress else "off"
    old_tests: dict[int, Split | None] = {}  # test splits of tasks finished before this call
    with TrainProgress(steps, mode, log) as bar:
        for i, current, epochs in todo:
            t0 = time.perf_counter()
            bar.task_started(current.name, epochs * -(-len(current.train.labels) // cfg.batch_size))
            fit, held = split_task(current, cfg.seed, i) if cfg.gate else (current, None)
            before = learner.features_before(current)
            peft_model, delta, fisher, scaled = learner.train_task(fit, i, epochs, bar)
            labels += [y for y in current.classes if y not in labels]
            folder = run_files.task_dir(out, i, current.name)
            # only rank 0 writes; readers see the task folder and its state appear together (run_files.snapshot)
            with ExitStack() as swap:
                with atomic_dir(folder) if main else nullcontext() as tmp:
                    alpha, gated, previous = None, None, learner.merged
                    if peft_model is not None:
                        if main:
                            meta = {
                                "kind": "chained",
                                "task": i,
                                "name": current.name,
                                "base_model": cfg.model,
                                "base_fingerprint": fingerprint,
                                "labels": current.classes,
                                "method": cfg.method,
                            }
                            save_adapter(peft_model, tmp, str(model_dir), meta)
                        learner.encoder.model = peft_model.unload()
                        alpha = learner.merge(
                            i + 1, delta, fisher
                        )  # the same on every rank: the Fisher was summed
                        if held is not None:
                            gated = choose_scale(learner, i, previous, fit.train, held)
                    lam = learner.update_classifiers(current, i, before)
                    seen = range(len(plan)) if joint else range(i + 1)
                    for j in seen:  # read an earlier task's test split once per call, not once per new task
                        if j not in old_tests and j not in loaded:
                            old_tests[j] = _test_of(out, j, plan[j], cfg.seed)
                    tests = [loaded[j].test if j in loaded else old_tests[j] for j in seen]
                    t_eval = time.perf_counter()
                    accs = [None if t is None else learner.accuracy(t) for t in tests]
                    t_eval = time.perf_counter() - t_eval
                    info = {
                        "index": i,
                        "name": current.name,
                        "method": cfg.method,
                        "labels": current.classes,
                        "alpha": alpha,
                        "curvature": scaled,
                        "ridge_lambda": lam,
                        "ridge_lambda_on_edge": learner.ridge_on_edge(),
                        "ridge_drift_mu": learner.drift_mu,
                        "gate": gated,
                        "reject_threshold": learner.classifiers[cfg.head].threshold() if cfg.reject else None,
                        "epochs": epochs,
                        "device": str(device),
                        "seconds": time.perf_counter() - t0,
                        "seconds_evaluating": t_eval,  # of "seconds": the evaluation on every test set so far
                        "timing": getattr(learner, "timing", None),  # a decoder's steps, Fisher, profile
                        "data": {k: plan[i][k] for k in ("source", "sha256", "examples")}
                        if not joint
                        else None,
                        "acc": {h: [None if a is None else a[h] for a in accs] for h in learner.measures},
                    }
                    for k in learner.losses:  # a decoder's NLL of the reference responses
                        info[k] = [None if a is None else a[k] for a in accs]
                    if main:
                        if peft_model is not None and cfg.keep_fisher:
                            save_file(fisher, str(tmp / run_files.FISHER))
                        if cfg.keep_test and not joint:
                            save_split(current.test, kind, tmp)
                        write_json(tmp / run_files.TASK_INFO, info)
                        if peft_model is not None:  # the adapter's card (a frozen task has no adapter)
                            names = [e["name"] for e in plan]  # a joint run's one folder covers every task
                            card = task_card(
                                info, cfg.saved(), names, base_path=str(model_dir), folder=str(folder)
                            )
                            (tmp / MODEL_CARD).write_text(card)
                        with run_files.next_state(out) as state:
                            learner.save_state(state, len(done) + 1, labels, kind)
                        swap.enter_context(run_files.swapping(out))  # held from here to the swap: a moment
                if main:  # the task folder is in place (atomic_dir's rename): its state follows at once
                    run_files.promote_state(out)
            done.append(info)
            if on_task is not None:
                on_task(i, learner)
            row = " ".join("-" if a is None else f"{a:.3f}" for a in info["acc"][learner.measures[0]])
            edge = "  (ridge lambda at its grid's end)" if info["ridge_lambda_on_edge"] else ""
            bar.task_done(
                f"{current.name}: alpha {alpha if alpha is None else round(alpha, 4)}  acc {row}{edge}"
            )

    result = _result(cfg, plan, done, learner.measures, learner.losses)
    if main:
        write_json(out / run_files.METRICS, result)
    distributed.barrier()  # every rank returns once the run is on disk
    return result


def _result(
    cfg: TrainConfig, plan: list[dict], done: list[dict], heads: list[str], losses: tuple[str, ...] = ()
) -> dict:
    """metrics.json: acc_matrix and its summary for the RUN's own measure (heads[0]: the --head, or a
    decoder's "exact"), every measure's in by_head, and a decoder's NLL matrix."""
    by_head = {}
    for h in heads:
        acc = [d["acc"][h] for d in done]
        by_head[h] = {"acc_matrix": acc, **metrics.summary(acc)}
        if cfg.method == "joint":  # one model on everything: an upper bound, not a sequence
            by_head[h].update(AAA=None, forgetting=None)
    return {
        "method": cfg.method,
        "head": heads[0],
        "tasks": [e["name"] for e in plan],
        "task_labels": [e["labels"] for e in plan],
        **by_head[heads[0]],
        **{f"{k}_matrix": [d.get(k) for d in done] for k in losses},
        "alphas": [d["alpha"] for d in done],
        "curvatures": [d.get("curvature") for d in done],
        "ridge_lambdas": [d["ridge_lambda"] for d in done],
        "ridge_lambdas_on_edge": [d.get("ridge_lambda_on_edge") for d in done],
        "ridge_drift_mus": [d.get("ridge_drift_mu") for d in done],
        "seconds": sum(d["seconds"] for d in done),
        "by_head": by_head,
        "config": cfg.saved(),
    }
