"""Cost benchmark: a P&M training step against a plain LoRA step; the Fisher pass and the loss profile (the
curvature scale of --curvature profile) against one epoch.

    python benchmarks/step_cost.py --steps 15 --repeats 7 --json benchmarks/results/step_cost.json
    python benchmarks/step_cost.py --decoder --steps 5 --repeats 5 --json benchmarks/results/decoder_step_cost.json
    python benchmarks/step_cost.py --decoder --head both --steps 4 --repeats 5 \
        --json benchmarks/results/decoder_step_cost_head_split.json
Both step kinds run on the same PEFT model and the same batches, interleaved (plain, pm, plain, pm, ...), so
machine noise hits both alike; the ratio of medians is reported. Per step, the perturbation folds s into the
LoRA scaling (no extra operation), so it should cost nothing measurable: the target is <= 1.05. The Fisher pass
over one epoch's worth of samples is timed against an epoch of the batches training takes (target <= 1), and so
is the loss profile over the same samples (three forward passes, merging.curvature), the Fisher pass and the
profile alternated --repeats times.

--decoder: the same for a causal LM (issue 35): builtin:smollm2 with its default LoRA (every linear layer of its
blocks) on builtin:clinc150-gen's first task, batches of --batch-size (8) x exactly --tokens (48) tokens, the
response loss (lm_learner.token_losses) with and without the perturbation; then the Fisher and the profile of
the decoder's default --fisher-samples, against the steps of one epoch of the task. --head both times the loss's
two ways of getting logits in the same run, interleaved by repeat: "full" (the model's forward: the output layer
at every position) and "split" (the base model, then the output layer at the response positions only:
lm_learner.ResponseLogits, the default where the model passes check_head_split). Its batches are each example's
last --tokens tokens, so they share no prefix: training's shared-prefix pass (run_shared) is not in these
figures; benchmarks/decoder_task.py times a real task with it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from harness import write_json

from pmserve.adapters import ADAPTER, add_lora, lora_layers
from pmserve.backbone import load_encoder
from pmserve.learner import Learner, TrainConfig, bucketed_batches
from pmserve.perturb import Perturbation
from pmserve.tasks import Task, load_tasks


def first_nouns_task(batch_size: int) -> tuple[Learner, Task, torch.Tensor, torch.Tensor]:
    """Task 0 of builtin:wordnet-nouns and a Learner on the default model with the task's head rows and a fresh
    LoRA: what training holds when the task starts (fisher_products.py times its Fisher pass on the same)."""
    torch.manual_seed(0)
    cfg = TrainConfig(data="builtin:wordnet-nouns", batch_size=batch_size)
    task = load_tasks(cfg.data, 0)[0]
    enc, prep, _ = load_encoder(cfg.model, "text", cfg.max_length)
    learner = Learner(cfg, enc, prep, torch.device("cpu"))
    learner.head.add_labels(task.classes, torch.Generator().manual_seed(0))
    w, b = learner.head.rows(task.classes)
    learner.encoder.model = add_lora(learner.encoder.model, cfg.lora)
    return learner, task, w, b


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def report(out: dict, path: str | None) -> None:
    """Print a benchmark's figures, and write them to `path` when given."""
    print(json.dumps(out, indent=1))
    if path:
        write_json(path, out, indent=1)


def decoder_main(args) -> None:
    from pmserve.lm_learner import (
        HEAD_SPLIT,
        DecoderLearner,
        causal_lm,
        decoder_config,
        load_decoder,
        pad_batch,
        token_losses,
    )
    from pmserve.perturb import Perturbation

    torch.manual_seed(0)
    cfg = decoder_config(TrainConfig(data="builtin:clinc150-gen:tasks=1,train=30", model="builtin:smollm2"))
    task = load_tasks(cfg.data, 0)[0]
    dec, fmt, _ = load_decoder(cfg.model, cfg.max_length)
    learner = DecoderLearner(cfg, dec, fmt, torch.device("cpu"))
    peft_model = add_lora(learner.encoder.model, cfg.lora)
    learner.encoder.model = peft_model
    layers = lora_layers(peft_model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    encoded = fmt.encode_split(task.train)
    bs, width = args.batch_size or 8, args.tokens
    batches = []
    for k in range(args.steps):  # the last `width` tokens of each example, padded to `width`: bs x width
        rows = [encoded[(k * bs + r) % len(encoded)] for r in range(bs)]
        cut = [(ids[-width:], max(n - (len(ids) - width), 0) if len(ids) > width else n) for ids, n in rows]
        b = pad_batch(cut, fmt.pad_id)
        pad = width - b["input_ids"].shape[1]
        b = {
            kk: F.pad(v, (0, pad), value=fmt.pad_id if kk == "input_ids" else (-100 if kk == "labels" else 0))
            for kk, v in b.items()
        }
        batches.append(b)
    pert = Perturbation(layers, cfg.eps, cfg.perturb_per, seed=0, adapter=ADAPTER)

    lm = causal_lm(peft_model)
    checked = getattr(lm, HEAD_SPLIT)
    heads = ["full", "split"] if args.head == "both" else [args.head]
    if "split" in heads and not checked:
        raise SystemExit(f"{cfg.model}: check_head_split failed, no split path to time")

    def use(head: str) -> None:
        setattr(lm, HEAD_SPLIT, head == "split")

    def run(perturb: bool) -> float:
        t0 = time.perf_counter()
        for b in batches:
            if perturb:
                pert.draw(bs)
            else:
                pert.off()
            per_seq, n = token_losses(peft_model, b)
            loss = per_seq.sum() / n.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / len(batches)

    for head in heads:  # warm-up
        use(head)
        run(False)
    plain: dict[str, list[float]] = {h: [] for h in heads}
    pm: dict[str, list[float]] = {h: [] for h in heads}
    for _ in range(args.repeats):
        for head in heads:
            use(head)
            plain[head].append(run(False))
            pm[head].append(run(True))
            print(f"{head} step s: plain {plain[head][-1]:.2f}  pm {pm[head][-1]:.2f}", flush=True)
    pert.off()
    fishers: dict[str, list[float]] = {h: [] for h in heads}
    profiles: dict[str, list[float]] = {h: [] for h in heads}
    for _ in range(max(1, args.repeats // 2)):
        for head in heads:
            use(head)
            t0 = time.perf_counter()
            learner._fisher(task, 0, layers)
            fishers[head].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            learner._profile(task, 0, layers)
            profiles[head].append(time.perf_counter() - t0)
            print(f"{head} fisher s {fishers[head][-1]:.1f}  profile s {profiles[head][-1]:.1f}", flush=True)
    use("split" if checked else "full")

    def figures(head: str) -> dict:
        step = statistics.median(plain[head])
        return {
            "step_ms_plain_lora": 1000 * step,
            "step_ms_pm": 1000 * statistics.median(pm[head]),
            "ratio_pm_over_plain": statistics.median(pm[head]) / step,
            "steps_plain_ms_all": [1000 * x for x in plain[head]],
            "steps_pm_ms_all": [1000 * x for x in pm[head]],
            "fisher_seconds": statistics.median(fishers[head]),
            "profile_seconds": statistics.median(profiles[head]),
            "fisher_seconds_all": fishers[head],
            "profile_seconds_all": profiles[head],
        }

    out = {
        "machine": machine(),
        "model": cfg.model,
        "batch": f"{bs} x {width} tokens",
        "head_split_checked": checked,
        "fisher_samples": cfg.fisher_samples,
        "steps": args.steps,
        "repeats": args.repeats,
        "perturb_per": cfg.perturb_per,
    }
    if len(heads) == 1:
        out.update(head=heads[0], **figures(heads[0]))
    else:
        out.update({h: figures(h) for h in heads})
        for k in ("step_ms_plain_lora", "step_ms_pm", "fisher_seconds", "profile_seconds"):
            out[f"{k}_split_over_full"] = out["split"][k] / out["full"][k]
    report(out, args.json)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 (encoder), 8 (--decoder)")
    ap.add_argument("--perturb-per", default="step")
    ap.add_argument("--decoder", action="store_true", help="SmolLM2-135M on builtin:clinc150-gen (issue 35)")
    ap.add_argument("--tokens", type=int, default=48, help="--decoder: tokens per example")
    ap.add_argument(
        "--head",
        choices=["split", "full", "both"],
        default="split",
        help="--decoder: the loss's logits at the response positions only, at every position, or both interleaved",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.decoder:
        decoder_main(args)
        return
    args.batch_size = args.batch_size or 32
    learner, task, w, b = first_nouns_task(args.batch_size)
    peft_model, prep = learner.encoder.model, learner.prep
    params = [p for p in peft_model.parameters() if p.requires_grad] + [w, b]
    opt = torch.optim.AdamW(params, lr=1e-3)
    pos = {y: k for k, y in enumerate(task.classes)}
    # the batches training takes (bucketed by length), so the epoch estimate is a real epoch's
    lengths = [len(x) for x in task.train.inputs]
    epoch = bucketed_batches(lengths, args.batch_size, torch.Generator().manual_seed(0))
    batches = []
    for k in range(args.steps):
        idx = epoch[k % len(epoch)].tolist()
        batches.append(
            (
                prep([task.train.inputs[j] for j in idx]),
                torch.tensor([pos[task.train.labels[j]] for j in idx]),
            )
        )
    pert = Perturbation(lora_layers(peft_model), 0.5, args.perturb_per, seed=0, adapter=ADAPTER)

    def run(perturb: bool) -> float:
        t0 = time.perf_counter()
        for batch, ys in batches:
            if perturb:
                pert.draw(len(ys))
            else:
                pert.off()
            loss = F.cross_entropy(learner.head.logits(learner.encoder(**batch), w, b), ys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / len(batches)

    run(False)  # warm-up
    plain, pm = [], []
    for _ in range(args.repeats):
        plain.append(run(False))
        pm.append(run(True))
    # the Fisher pass over one epoch's worth of samples, against one epoch of training steps
    pert.off()
    n = len(task.train.labels)
    learner.cfg.fisher_samples = n
    fishers, profiles = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        learner._fisher(task, 0, lora_layers(peft_model), w, b)
        fishers.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        learner._profile(task, 0, lora_layers(peft_model), w, b)
        profiles.append(time.perf_counter() - t0)
    fisher_s, profile_s = statistics.median(fishers), statistics.median(profiles)
    epoch_s = statistics.median(plain) * (n / args.batch_size)
    out = {
        "machine": machine(),
        "step_ms_plain_lora": 1000 * statistics.median(plain),
        "step_ms_pm": 1000 * statistics.median(pm),
        "ratio_pm_over_plain": statistics.median(pm) / statistics.median(plain),
        "fisher_seconds_one_epoch_of_samples": fisher_s,
        "epoch_seconds_estimate": epoch_s,
        "fisher_over_epoch": fisher_s / epoch_s,
        "profile_seconds_one_epoch_of_samples": profile_s,
        "profile_over_epoch": profile_s / epoch_s,
        "profile_over_fisher": profile_s / fisher_s,
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "perturb_per": args.perturb_per,
    }
    report(out, args.json)


if __name__ == "__main__":
    main()
