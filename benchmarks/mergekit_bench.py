"""`pmserve merge --format full` against mergekit on a synthetic Llama-style model (issue 18, groundwork).

Inputs (built once into --work, seeded):
  base:     a LlamaForCausalLM checkpoint (LlamaConfig, untied lm_head, random weights std 0.02, bf16
            model.safetensors written directly). --size-mb picks the shape: >= 600 MB hidden 2048 /
            intermediate 5632, else hidden 1024 / intermediate 2816; vocab 32000; the layer count that comes
            closest to the size (--size-mb 1000: hidden 2048, 8 layers, 542M parameters, 1.08 GB).
  adapters: --adapters PEFT LoRA adapters (rank 16, lora_alpha 32, fp32) on q/k/v/o/gate/up/down_proj, random A
            (randn / sqrt(in)) and B (randn * 1e-3, so B is not zero), written with PeftModel.save_pretrained.
Merges (each a subprocess, pmserve and mergekit alternated per method, median of --repeats; wall time, peak RSS
from os.wait4's ru_maxrss of the child and its waited-for descendants, and peak anonymous memory: RssAnon of the
process tree sampled every 20 ms, what the processes allocated without the pages of files they memory-map, which
RSS counts as far as the page cache keeps them):
  pmserve:  .venv/bin/python -m pmserve merge a0 .. aN --base BASE --method M --format full --out OUT
  mergekit: .venv-mergekit/bin/mergekit-yaml config.yml OUT --lora-merge-cache FRESH_TMP --random-seed 0
            with `model: BASE+ADAPTER` references. mergekit first applies each LoRA to the base with PEFT's
            merge_and_unload and saves that as a full model in --lora-merge-cache (a fresh folder per run, so
            that work is counted), then merges full models. The config (dtype float32 = mergekit's compute dtype,
            out_dtype bfloat16) is written per method; weights 1/N for linear (both normalise, so both are the
            average), 1 for the others, density 0.5.
Comparison: every output tensor, in fp32, max |pmserve - mergekit| and the relative difference
||pmserve - mergekit|| / ||pmserve - base|| over the adapted (LoRA) weights.
Limits: `copy` reads the base and adapter files and writes the base's bytes to a new file (a subprocess, same
page cache state as the merges); `flops` is the low-rank products, 2 * out * in * (16 * N) per module, at the
fp32 matmul rate measured here on a (out, 16N) @ (16N, in) product and on a 2048^3 one.

    bash benchmarks/mergekit_env.sh
    .venv/bin/python benchmarks/mergekit_bench.py --size-mb 200 --adapters 4 --repeats 1 --methods linear,ties \
        --json benchmarks/results/mergekit_bench-small.json
    .venv/bin/python benchmarks/mergekit_bench.py --smoke --json /tmp/mergekit_bench-smoke.json   # a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, ROOT, clean_env, measure, medians, venv_bin, write_json

VOCAB = 32000
SMOKE_SHAPE = {"hidden": 256, "intermediate": 688, "layers": 2, "vocab": 1024}  # --smoke: a few MB
RANK = 16
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# pmserve --method -> (mergekit merge_method, extra parameters)
MK_METHOD = {
    "linear": "linear",
    "task-arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare-linear": "dare_linear",
    "dare-ties": "dare_ties",
}


def shape_for(size_mb: float, smoke: bool = False) -> dict:
    if smoke:
        hidden, inter, layers, vocab = (SMOKE_SHAPE[k] for k in ("hidden", "intermediate", "layers", "vocab"))
    else:
        hidden, inter, vocab = (2048, 5632, VOCAB) if size_mb >= 600 else (1024, 2816, VOCAB)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    if not smoke:
        layers = max(1, round((size_mb * 1e6 / 2 - fixed) / per_layer))
    params = fixed + layers * per_layer
    return {
        "hidden": hidden,
        "intermediate": inter,
        "layers": layers,
        "vocab": vocab,
        "params": params,
        "bytes_bf16": 2 * params,
    }


def module_shapes(s: dict) -> dict[str, tuple[int, int]]:
    h, i = s["hidden"], s["intermediate"]
    out = {}
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}."
        for m in ATTN:
            out[p + "self_attn." + m] = (h, h)
        out[p + "mlp.gate_proj"] = (i, h)
        out[p + "mlp.up_proj"] = (i, h)
        out[p + "mlp.down_proj"] = (h, i)
    return out


def build_base(folder: Path, s: dict) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    h, vocab = s["hidden"], s["vocab"]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=h // 128,
        num_key_value_heads=h // 128,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": None, "lm_head.weight": None}

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t["model.embed_tokens.weight"] = rnd(vocab, h)
    t["lm_head.weight"] = rnd(vocab, h)
    t["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    for m, shape in module_shapes(s).items():
        t[m + ".weight"] = rnd(*shape)
    for layer in range(s["layers"]):
        t[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(folder))
    return folder


def build_adapters(base: Path, out: Path, n: int, s: dict) -> list[Path]:
    """n PEFT LoRA adapters saved with PeftModel.save_pretrained (the model is built on the meta device for the
    shapes, then the seeded factors are assigned)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folders = [out / f"a{i}" for i in range(n)]
    if all((d / "adapter_model.safetensors").is_file() for d in folders):
        return folders
    cfg = AutoConfig.from_pretrained(str(base))
    shapes = module_shapes(s)
    for i, d in enumerate(folders):
        if (d / "adapter_model.safetensors").is_file():
            continue
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        lcfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(ATTN + MLP), lora_dropout=0.0)
        pm = get_peft_model(model, lcfg)
        g = torch.Generator().manual_seed(100 + i)
        for name, mod in pm.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in shapes and hasattr(mod, "lora_A"):
                o, inp = shapes[key]
                mod.lora_A["default"].weight = torch.nn.Parameter(
                    torch.randn(RANK, inp, generator=g) / inp**0.5
                )
                mod.lora_B["default"].weight = torch.nn.Parameter(torch.randn(o, RANK, generator=g) * 1e-3)
        lcfg.base_model_name_or_path = str(base)
        pm.save_pretrained(str(d))
        del pm, model
    return folders


def mergekit_config(method: str, base: Path, adapters: list[Path], density: float) -> str:
    n = len(adapters)
    lines = [
        f"merge_method: {MK_METHOD[method]}",
        f"base_model: {base}",
        "dtype: float32",
        "out_dtype: bfloat16",
        "models:",
    ]
    for a in adapters:
        lines.append(f"  - model: {base}+{a}")
        lines.append("    parameters:")
        lines.append(f"      weight: {1.0 / n if method == 'linear' else 1.0}")
        if method in ("ties", "dare-linear", "dare-ties"):
            lines.append(f"      density: {density}")
    if method == "linear":
        # linear has no base model in mergekit; the base is only the donor of config and tokenizer
        lines = [x for x in lines if not x.startswith("base_model")]
    return "\n".join(lines) + "\n"


COPY_SCRIPT = r"""
import sys, shutil
base, out, *adapters = sys.argv[1:]
for a in adapters:
    with open(a, "rb") as f:
        while f.read(1 << 24):
            pass
shutil.copyfile(base, out)
"""

RATE_SCRIPT = r"""
import json, sys, time, torch
o, i, r = map(int, sys.argv[1:4])
def rate(m, k, n, reps):
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t)
print(json.dumps({"lowrank_gflops": rate(o, r, i, 5) / 1e9, "square_gflops": rate(2048, 2048, 2048, 3) / 1e9,
                  "threads": torch.get_num_threads()}))
"""


def compare(base: Path, a: Path, b: Path, lora_keys: set[str]) -> dict:
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = f
        return out

    def norm(k):
        return k if k.startswith("model.") or k == "lm_head.weight" else "model." + k

    ia = {norm(k): (k, f) for k, f in index(a).items()}
    ib = {norm(k): (k, f) for k, f in index(b).items()}
    i0 = {norm(k): (k, f) for k, f in index(base).items()}

    def load(ix, key):
        k, f = ix[key]
        with safe_open(str(f), "pt") as h:
            return h.get_tensor(k).float()

    common = sorted(set(ia) & set(ib))
    res = {
        "tensors_pmserve": len(ia),
        "tensors_mergekit": len(ib),
        "common": len(common),
        "only_pmserve": sorted(set(ia) - set(ib))[:10],
        "only_mergekit": sorted(set(ib) - set(ia))[:10],
    }
    max_all = max_lora = max_other = 0.0
    num = den = 0.0
    for k in common:
        x, y = load(ia, k), load(ib, k)
        d = (x - y).abs().max().item() if x.shape == y.shape else float("inf")
        max_all = max(max_all, d)
        if k in lora_keys:
            max_lora = max(max_lora, d)
            w0 = load(i0, k)
            num += (x - y).pow(2).sum().item()
            den += (x - w0).pow(2).sum().item()
        else:
            max_other = max(max_other, d)
    res.update(
        max_abs_diff=max_all,
        max_abs_diff_adapted=max_lora,
        max_abs_diff_other=max_other,
        rel_diff_adapted=(num / den) ** 0.5 if den else None,
    )
    # scale: the largest |delta| pmserve applied
    mx = 0.0
    for k in sorted(lora_keys)[:7]:
        if k in ia:
            mx = max(mx, (load(ia, k) - load(i0, k)).abs().max().item())
    res["max_abs_delta_pmserve_first_layer"] = mx
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1000)
    ap.add_argument("--adapters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="linear,task-arithmetic,ties,dare-ties")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pmserve-mergekit-bench")
    ap.add_argument("--json", type=Path, default=RESULTS / "mergekit_bench.json")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a few-MB model (hidden 256, 2 layers, vocab 1024), 2 adapters, 1 repeat: that both tools run",
    )
    ap.add_argument(
        "--fp32-lora",
        action="store_true",
        help="also run mergekit once per method with --lora-merge-dtype float32 and compare it",
    )
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs in --work/out")
    args = ap.parse_args()
    if args.smoke:
        args.adapters, args.repeats = min(args.adapters, 2), 1
    mk = venv_bin(".venv-mergekit", "mergekit-yaml", "mergekit_env.sh")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in MK_METHOD:
            sys.exit(f"{m}: not one of {', '.join(MK_METHOD)}")
    s = shape_for(args.size_mb, args.smoke)
    print(
        f"base: hidden {s['hidden']}, {s['layers']} layers, intermediate {s['intermediate']}, vocab {s['vocab']}: "
        f"{s['params'] / 1e6:.0f}M parameters, {s['bytes_bf16'] / 1e6:.0f} MB bf16",
        flush=True,
    )
    work = args.work / (f"smoke-{args.adapters}" if args.smoke else f"{int(args.size_mb)}mb-{args.adapters}")
    t0 = time.perf_counter()
    base = build_base(work / "base", s)
    adapters = build_adapters(base, work / "adapters", args.adapters, s)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s under {work}", flush=True)
    base_bytes = (base / "model.safetensors").stat().st_size
    adapter_bytes = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)
    shapes = module_shapes(s)
    lora_keys = {k + ".weight" for k in shapes}

    out_root = work / "out"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir()
    env = (
        clean_env()
    )  # each side from its own environment; mergekit's transformers must find the PyPI `kernels`
    rows = {m: {"pmserve": [], "mergekit": []} for m in methods}
    comparisons = {}
    for rep in range(args.repeats):
        for m in methods:
            for who in ("pmserve", "mergekit") if rep % 2 == 0 else ("mergekit", "pmserve"):
                out = out_root / f"{m}-{who}"
                shutil.rmtree(out, ignore_errors=True)
                if who == "pmserve":
                    cmd = [
                        str(ROOT / ".venv" / "bin" / "python"),
                        "-m",
                        "pmserve",
                        "merge",
                        *map(str, adapters),
                        "--base",
                        str(base),
                        "--method",
                        m,
                        "--format",
                        "full",
                        "--out",
                        str(out),
                        "-q",
                    ]
                    if m in ("ties", "dare-linear", "dare-ties"):
                        cmd += ["--density", str(args.density), "--seed", "0"]
                    if m == "linear":
                        cmd += ["--weights", ",".join([str(1.0 / len(adapters))] * len(adapters))]
                else:
                    cfg = out_root / f"{m}.yml"
                    cfg.write_text(mergekit_config(m, base, adapters, args.density))
                    cache = Path(tempfile.mkdtemp(prefix="mk-lora-", dir=out_root))
                    cmd = [
                        str(mk),
                        str(cfg),
                        str(out),
                        "--lora-merge-cache",
                        str(cache),
                        "--random-seed",
                        "0",
                        "--no-copy-tokenizer",
                        "--quiet",
                    ]
                res = measure(cmd, env)
                if who == "mergekit":
                    shutil.rmtree(cache, ignore_errors=True)
                rows[m][who].append(res)
                print(
                    f"repeat {rep + 1} {m:15s} {who:8s} {res['seconds']:7.1f} s {res['peak_rss_mb']:7.0f} MB RSS "
                    f"{res['peak_anon_mb']:7.0f} MB anonymous",
                    flush=True,
                )
            if rep == args.repeats - 1:
                comparisons[m] = compare(
                    base, out_root / f"{m}-pmserve", out_root / f"{m}-mergekit", lora_keys
                )
                print(
                    f"  {m}: max |pmserve - mergekit| {comparisons[m]['max_abs_diff']:.3g} "
                    f"(adapted {comparisons[m]['max_abs_diff_adapted']:.3g}, other "
                    f"{comparisons[m]['max_abs_diff_other']:.3g}), relative to the delta "
                    f"{comparisons[m]['rel_diff_adapted']:.3g}",
                    flush=True,
                )
                if args.fp32_lora:
                    # attribution: the same mergekit merge with the LoRA-applied intermediates kept in fp32
                    out = out_root / f"{m}-mergekit-fp32lora"
                    cache = Path(tempfile.mkdtemp(prefix="mk-lora-", dir=out_root))
                    res = measure(
                        [
                            str(mk),
                            str(out_root / f"{m}.yml"),
                            str(out),
                            "--lora-merge-cache",
                            str(cache),
                            "--lora-merge-dtype",
                            "float32",
                            "--random-seed",
                            "0",
                            "--no-copy-tokenizer",
                            "--quiet",
                        ],
                        env,
                    )
                    shutil.rmtree(cache, ignore_errors=True)
                    c = compare(base, out_root / f"{m}-pmserve", out, lora_keys)
                    comparisons[m]["fp32_lora"] = {**res, **c}
                    print(
                        f"  {m}: mergekit --lora-merge-dtype float32 {res['seconds']:.1f} s "
                        f"{res['peak_rss_mb']:.0f} MB, max |diff| {c['max_abs_diff']:.3g}, relative "
                        f"{c['rel_diff_adapted']:.3g}",
                        flush=True,
                    )
                    if not args.keep:
                        shutil.rmtree(out)
                if not args.keep:
                    shutil.rmtree(out_root / f"{m}-pmserve")
                    shutil.rmtree(out_root / f"{m}-mergekit")

    # physical limits
    copies = [
        measure(
            [
                sys.executable,
                "-c",
                COPY_SCRIPT,
                str(base / "model.safetensors"),
                str(out_root / "copy"),
                *[str(a / "adapter_model.safetensors") for a in adapters],
            ]
        )
        for _ in range(max(1, args.repeats))
    ]
    copy_s = statistics.median(c["seconds"] for c in copies)
    o, i = s["intermediate"], s["hidden"]
    rate = json.loads(
        subprocess.check_output(
            [sys.executable, "-c", RATE_SCRIPT, str(o), str(i), str(RANK * len(adapters))]
        ).decode()
    )
    flops = sum(2 * a * b * RANK * len(adapters) for a, b in shapes.values())
    limits = {
        "copy_seconds": copy_s,
        "copy_bytes_read": base_bytes + adapter_bytes,
        "copy_bytes_written": base_bytes,
        "lowrank_flops": flops,
        **rate,
        "flops_seconds_lowrank_rate": flops / (rate["lowrank_gflops"] * 1e9),
        "flops_seconds_square_rate": flops / (rate["square_gflops"] * 1e9),
    }
    print(
        f"limits: plain copy {copy_s:.2f} s; {flops / 1e9:.1f} GFLOP of low-rank products: "
        f"{limits['flops_seconds_lowrank_rate']:.2f} s at {rate['lowrank_gflops']:.0f} GFLOP/s "
        f"({limits['flops_seconds_square_rate']:.2f} s at the 2048^3 rate {rate['square_gflops']:.0f})"
    )

    summary = {}
    print(
        "\n| method | pmserve s | mergekit s | mergekit / pmserve | pmserve peak MiB | mergekit peak MiB |"
        " pmserve peak anon MiB | mergekit peak anon MiB | max abs diff | rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        med = {
            w: medians(rows[m][w], ("seconds", "peak_rss_mb", "peak_anon_mb"))
            for w in ("pmserve", "mergekit")
        }
        summary[m] = {"median": med, "speedup": med["mergekit"]["seconds"] / med["pmserve"]["seconds"]}
        c = comparisons[m]
        print(
            f"| {m} | {med['pmserve']['seconds']:.1f} | {med['mergekit']['seconds']:.1f} | "
            f"{summary[m]['speedup']:.2f}x | {med['pmserve']['peak_rss_mb']:.0f} | "
            f"{med['mergekit']['peak_rss_mb']:.0f} | {med['pmserve']['peak_anon_mb']:.0f} | "
            f"{med['mergekit']['peak_anon_mb']:.0f} | {c['max_abs_diff']:.3g} | {c['rel_diff_adapted']:.3g} |"
        )
    import importlib.metadata as md

    mk_version = (
        subprocess.check_output(
            [
                str(mk.with_name("python")),
                "-c",
                "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'), m.version('peft'))",
            ],
            env=env,
        )
        .decode()
        .split()
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "command": " ".join(sys.argv),
        "shape": s,
        "adapters": len(adapters),
        "rank": RANK,
        "density": args.density,
        "base_bytes": base_bytes,
        "adapter_bytes": adapter_bytes,
        "repeats": args.repeats,
        "versions": {
            "pmserve_torch": md.version("torch"),
            "pmserve_peft": md.version("peft"),
            "mergekit": mk_version[0],
            "mergekit_torch": mk_version[1],
            "mergekit_peft": mk_version[2],
        },
        "runs": rows,
        "summary": summary,
        "comparison": comparisons,
        "limits": limits,
        "configs": {
            m: mergekit_config(m, Path("BASE"), [Path(f"a{i}") for i in range(len(adapters))], args.density)
            for m in methods
        },
    }
    write_json(args.json, result, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
