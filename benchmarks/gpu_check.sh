#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run (about 5 minutes on one H100/H200), written as one JSON:
#   - the fused LoRA + P&M kernel against PEFT's LoRA Linear and a plain nn.Linear, forward and backward,
#     d 4096, rank 16, bf16, s drawn per call and per row (benchmarks/kernel_bench.py);
#   - one task trained with --kernel triton against --kernel torch: steps/s, and the loss curve with nothing
#     perturbed (benchmarks/gpu_train_check.py);
#   - ONNX Runtime CUDA fp16 with IOBinding against PyTorch fp16 at batch 1, 8, 32 (`pmserve bench`), and
#     `pmserve serve` on the GPU: both need onnxruntime with its CUDA provider, and say so when it is missing.
# Each part is bounded by `timeout`; a part that fails or is skipped is recorded as such and the rest go on.
#
#   bash benchmarks/gpu_check.sh [OUT_JSON] [MODEL]      (MODEL: a local HF folder, default builtin:minilm)
#
# Without a GPU it says what it skipped and exits 0.
set -uo pipefail
out=${1:-gpu_check.json}
model=${2:-builtin:minilm}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here: skipped the kernel, training, ONNX Runtime CUDA and serving checks"
  echo '{"skipped": "no CUDA device"}' >"$out"
  exit 0
fi

part() {  # part NAME SECONDS COMMAND...: run one check, its stdout and stderr kept in $work/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name" >&2
  if timeout "$limit" "$@" >"$work/$name.log" 2>&1; then echo ok >"$work/$name.status"
  else echo "failed (exit $?): $(tail -n 3 "$work/$name.log" | tr '\n' ' ')" >"$work/$name.status"; fi
}

part kernel_per_call 150 "$py" "$here/kernel_bench.py" --tokens 4096 16384 --d 4096 --rank 16 --dtype bf16 \
  --json "$work/kernel_per_call.json"
part kernel_per_row 150 "$py" "$here/kernel_bench.py" --tokens 4096 16384 --d 4096 --rank 16 --dtype bf16 \
  --per-row --json "$work/kernel_per_row.json"
part train 180 "$py" "$here/gpu_train_check.py" --model "$model" --json "$work/train.json"

if "$py" -c "import sys, onnxruntime as o; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; then
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

"$py" - "$work" "$out" <<'EOF'
import json, subprocess, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
import torch
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parts": {}}
for name in ("kernel_per_call", "kernel_per_row", "train", "ort_cuda", "serve"):
    status = (work / f"{name}.status").read_text().strip() if (work / f"{name}.status").exists() else "not run"
    part = {"status": status}
    if (work / f"{name}.json").exists():
        part["result"] = json.loads((work / f"{name}.json").read_text())
    if (work / f"{name}.log").exists():
        part["log_tail"] = (work / f"{name}.log").read_text()[-4000:]
    result["parts"][name] = part
out.write_text(json.dumps(result, indent=2))
print(f"gpu_check: wrote {out}: " + ", ".join(f"{k} {v['status'][:40]}" for k, v in result["parts"].items()))
EOF
