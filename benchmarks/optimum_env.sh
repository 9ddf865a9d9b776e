#!/usr/bin/env bash
# A virtual environment of its own for Hugging Face Optimum (default .venv-optimum), used only by
# benchmarks/optimum_bench.py. optimum-onnx pins transformers below what pmserve runs on, so it cannot share
# pmserve's environment, and it is never a dependency of pmserve itself.
#   bash benchmarks/optimum_env.sh [VENV]     PMSERVE_TORCH=2.13.0 picks another torch version, ORT_VERSION
#                                             another onnxruntime (default: the one in pmserve's .venv).
# Contents: the CPU build of torch, optimum-onnx (with optimum 2.x and the transformers it pins), and plain
# onnxruntime (CPU; onnxruntime and onnxruntime-gpu in one environment overwrite each other's files) at the
# version pmserve's environment runs, so a latency difference is the graphs' and not the runtimes'.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(realpath -m "${1:-$here/.venv-optimum}")  # absolute: a later step runs from another directory
torch_version=${PMSERVE_TORCH:-2.13.0}
python=${PYTHON:-python3}
ort_version=${ORT_VERSION:-}
if [ -z "$ort_version" ] && [ -x "$here/.venv/bin/python" ]; then
  ort_version=$("$here/.venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || true)
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# the CPU build: from a local wheel folder when the machine has one (PIP_FIND_LINKS), else PyTorch's CPU index
if "${pip[@]}" install "torch==$torch_version+cpu" 2>/dev/null; then :; else
  "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" install "optimum-onnx==0.1.0" "optimum>=2,<3" "onnxruntime${ort_version:+==$ort_version}"
if "${pip[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
  echo "$venv: onnxruntime-gpu was pulled in beside onnxruntime; remove one" >&2
  exit 1
fi
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

print(", ".join(f"{p} {md.version(p)}" for p in ("optimum", "optimum-onnx", "transformers", "torch", "onnxruntime")))
EOF
