#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run, at most 8 minutes on one H100/H200, written as one JSON:
#   - one layer, forward and backward, d 4096, rank 16, bf16, 4k and 16k tokens, median of 50 after warm-up (CUDA
#     events): plain nn.Linear, PEFT's LoRA Linear, the fused kernel, s drawn per call and per row, and plain and
#     fused replayed from a CUDA graph (benchmarks/kernel_bench.py --graphs);
#   - one task trained with --kernel triton against --kernel torch: steps/s, and the loss curve with nothing
#     perturbed (benchmarks/gpu_train_check.py);
#   - ONNX Runtime CUDA fp16 with IOBinding against PyTorch fp16 at batch 1, 8, 32 (`pmserve bench`), and
#     `pmserve serve` on the GPU: both need onnxruntime with its CUDA provider, say so when it is missing, and get
#     only the time the parts above leave.
# Each part is bounded by `timeout`, and all of them by one 8-minute budget (GPU_CHECK_BUDGET_S, 470 s by
# default: a part gets at most what is left); a part that fails or is skipped is recorded as such and the rest go
# on. The JSON's "targets" says, for issue 39, whether the fused layer is within 1.2x plain nn.Linear and the task
# trains at least as fast with --kernel triton.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_JSON] [MODEL]   (MODEL: a local HF folder, default builtin:minilm)
#
# Without a GPU it says what it skipped and exits 0. --dry-run runs the same parts on the CPU through Triton's
# interpreter with tiny shapes and a tiny model (a few minutes; the figures mean nothing): a test of this script.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-gpu_check.json}
model=${2:-builtin:minilm}
py=${PYTHON:-python3}
case $py in /*) ;; */*) py=$PWD/$py ;; esac  # a relative PYTHON (.venv/bin/python) must survive a cd
budget=${GPU_CHECK_BUDGET_S:-470}
scale=1  # the dry run's interpreter is slow: three times the per-part limits, 25 minutes in all
if [ "$dry" = 1 ]; then scale=3; budget=${GPU_CHECK_BUDGET_S:-1500}; fi
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$dry" = 1 ]; then
  echo "gpu_check: dry run on the CPU (TRITON_INTERPRET=1, tiny shapes): the figures mean nothing" >&2
  kernel_args=(--dry-run --graphs)
  train_args=(--dry-run)
elif "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  kernel_args=(--tokens 4096 16384 --d 4096 --rank 16 --dtype bf16 --warmup 10 --iters 50 --graphs)
  train_args=(--model "$model")
else
  echo "gpu_check: no CUDA device here: skipped the kernel, training, ONNX Runtime CUDA and serving checks"
  echo '{"skipped": "no CUDA device"}' >"$out"
  exit 0
fi

# The parts import pmserve (kernels/ is installed as pmserve.kernels): on a bare GPU machine, install this checkout
# first, without dependencies or network. Checked from $work: in the repository root, ./pmserve would shadow the
# installed package (it has no kernels/).
setup=ok
if ! (cd "$work" && "$py" -c "import pmserve.kernels, peft") >/dev/null 2>&1; then
  if "$py" -m pip install -q --no-deps --no-build-isolation -e "$here/.." >"$work/setup.log" 2>&1; then
    setup="installed this checkout (pip install --no-deps -e .)"
  else
    setup="failed: pmserve or peft does not import: $(tail -n 2 "$work/setup.log" | tr '\n' ' ')"
  fi
  echo "gpu_check: setup: $setup" >&2
fi
echo "$setup" >"$work/setup.status"

part() {  # part NAME SECONDS COMMAND...: run one check within the budget, stdout and stderr kept in $work/NAME.log
  local name=$1 limit=$2 left
  shift 2
  limit=$((limit * scale))
  left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "skipped: the ${budget}s budget was spent by the parts before it" >"$work/$name.status"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: $name (at most ${limit}s)" >&2
  if timeout "$limit" "$@" >"$work/$name.log" 2>&1; then echo ok >"$work/$name.status"
  else echo "failed (exit $?): $(tail -n 3 "$work/$name.log" | tr '\n' ' ')" >"$work/$name.status"; fi
}

part kernel_per_call 140 "$py" "$here/kernel_bench.py" "${kernel_args[@]}" --json "$work/kernel_per_call.json"
part kernel_per_row 140 "$py" "$here/kernel_bench.py" "${kernel_args[@]}" --per-row --json "$work/kernel_per_row.json"
part train 180 "$py" "$here/gpu_train_check.py" "${train_args[@]}" --json "$work/train.json"

if [ "$dry" = 1 ]; then
  echo "skipped: dry run (ONNX Runtime CUDA needs a GPU)" >"$work/ort_cuda.status"
elif "$py" -c "import sys, onnxruntime as o; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; then
  part ort_cuda 180 sh -c "'$py' -m pmserve train builtin:wordnet-nouns:tasks=1 --model '$model' --method frozen \
    --epochs 1 --out '$work/run' --quiet && '$py' -m pmserve export '$work/run' --out '$work/fp16' --dtype fp16 -q \
    && '$py' -m pmserve bench '$work/fp16' --provider cuda --batch-sizes 1,8,32 --backends onnxruntime,torch-merged \
    --json '$work/ort_cuda.json'"
else
  echo "skipped: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)" >"$work/ort_cuda.status"
fi
echo "skipped: pmserve serve runs ONNX Runtime; on a GPU it needs the CUDA provider, measured by ort_cuda's setup" \
  >"$work/serve.status"
if [ "$(cat "$work/ort_cuda.status")" = ok ]; then
  echo "not measured yet: run benchmarks/serve_bench.py --provider cuda against $work/fp16" >"$work/serve.status"
fi

"$py" - "$work" "$out" "$dry" "$SECONDS" <<'EOF'
import json, sys
from pathlib import Path
work, out, dry, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
import torch
device = "cpu (dry run: Triton interpreter, figures meaningless)" if dry else torch.cuda.get_device_name()
setup = (work / "setup.status").read_text().strip()
result = {"device": device, "torch": torch.__version__, "dry_run": dry, "seconds": seconds, "setup": setup, "parts": {}}
for name in ("kernel_per_call", "kernel_per_row", "train", "ort_cuda", "serve"):
    status = (work / f"{name}.status").read_text().strip() if (work / f"{name}.status").exists() else "not run"
    part = {"status": status}
    if (work / f"{name}.json").exists():
        part["result"] = json.loads((work / f"{name}.json").read_text())
    if (work / f"{name}.log").exists():
        part["log_tail"] = (work / f"{name}.log").read_text()[-4000:]
    result["parts"][name] = part

# Issue 39's targets: fused <= 1.2x plain nn.Linear (per call and per row, every token count measured), and
# --kernel triton at least as fast as --kernel torch on the task. None where the figure is missing.
targets = {"layer": [], "train": None}
for name in ("kernel_per_call", "kernel_per_row"):
    for row in result["parts"][name].get("result", {}).get("results", []):
        targets["layer"].append({
            "tokens": row["tokens"], "per_row": row["per_row"],
            "fused_over_plain": row["fused_over_plain"], "fused_over_peft": row["fused_over_peft"],
            "fused_graph_over_plain_graph": row.get("fused_graph_over_plain_graph"),
            "met": None if dry else row["fused_over_plain"] <= 1.2,
        })
train = result["parts"]["train"].get("result", {})
if "triton_over_torch" in train:
    targets["train"] = {"triton_over_torch": train["triton_over_torch"], "met": None if dry else train["triton_over_torch"] >= 1.0}
result["targets"] = targets
out.write_text(json.dumps(result, indent=2))
verdict = {True: "met", False: "not met", None: "dry run"}
print(f"gpu_check: wrote {out} in {seconds}s: " + ", ".join(f"{k} {v['status'][:40]}" for k, v in result["parts"].items()))
for t in targets["layer"]:
    print(f"  layer {t['tokens']} tokens, {'per row' if t['per_row'] else 'per call'}: fused/plain "
          f"{t['fused_over_plain']:.2f}, fused/peft {t['fused_over_peft']:.2f} (target <= 1.2x plain: "
          f"{verdict[t['met']]})")
if targets["train"]:
    print(f"  train: triton/torch steps/s {targets['train']['triton_over_torch']:.2f} "
          f"(target >= 1: {verdict[targets['train']['met']]})")
EOF
