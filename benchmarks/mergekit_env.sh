#!/usr/bin/env bash
# A virtual environment of its own for mergekit (default .venv-mergekit), used only by
# benchmarks/mergekit_bench.py. mergekit is never a dependency of pmserve.
#   bash benchmarks/mergekit_env.sh [VENV]     PMSERVE_TORCH=2.13.0 picks another torch version,
#                                             MERGEKIT_VERSION a mergekit version (default: the newest).
# Contents: the CPU build of torch (from a local wheel folder when pip finds one, else PyTorch's CPU index),
# then the mergekit PyPI package with the transformers, peft and safetensors it pulls in.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(realpath -m "${1:-$here/.venv-mergekit}")  # absolute: a later step runs from another directory
torch_version=${PMSERVE_TORCH:-2.13.0}
mergekit_version=${MERGEKIT_VERSION:-}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if "${pip[@]}" install "torch==$torch_version+cpu" 2>/dev/null; then :; else
  "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" install "mergekit${mergekit_version:+==$mergekit_version}"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md

print(", ".join(f"{p} {md.version(p)}" for p in ("mergekit", "torch", "transformers", "peft", "safetensors")))
PY
