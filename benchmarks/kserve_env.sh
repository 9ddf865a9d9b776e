#!/usr/bin/env bash
# A virtual environment of its own for KServe's Python model server (default .venv-kserve), used only by
# benchmarks/kserve_bench.py. kserve pins many packages (fastapi, uvicorn, pydantic, protobuf, grpcio ...), so it
# cannot share pmserve's environment, and it is never a dependency of pmserve itself.
#   bash benchmarks/kserve_env.sh [VENV]      KSERVE_VERSION picks another kserve (default 0.21.0),
#                                             PMSERVE_TORCH another torch, ORT_VERSION another onnxruntime and
#                                             TRANSFORMERS_VERSION another transformers (default: the ones in
#                                             pmserve's .venv).
# Contents: kserve, the CPU build of torch, transformers and plain onnxruntime (CPU; onnxruntime and
# onnxruntime-gpu in one environment overwrite each other's files) at the versions pmserve's environment runs,
# plus what importing pmserve.predict needs, and this checkout's pmserve itself, editable and without its
# dependencies (--no-deps: pmserve's own pins would fight kserve's): the KServe model class wraps the very
# OrtModel (tokenizer and ONNX Runtime session) that `pmserve serve` runs, so a difference in throughput is the
# servers' and not the models'. The editable install maps the package names only; the repository root is never
# on this environment's path (its kernels/ would hide the PyPI `kernels` from transformers).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(realpath -m "${1:-$here/.venv-kserve}")  # absolute: a later step runs from another directory
kserve_version=${KSERVE_VERSION:-0.21.0}
torch_version=${PMSERVE_TORCH:-2.13.0}
python=${PYTHON:-python3}
pm() { [ -x "$here/.venv/bin/python" ] && "$here/.venv/bin/python" -c "import $1; print($1.__version__)" 2>/dev/null || true; }
ort_version=${ORT_VERSION:-$(pm onnxruntime)}
tf_version=${TRANSFORMERS_VERSION:-$(pm transformers)}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# the CPU build: from a local wheel folder when the machine has one (PIP_FIND_LINKS), else PyTorch's CPU index
if "${pip[@]}" install "torch==$torch_version+cpu" 2>/dev/null; then :; else
  "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" install "kserve==$kserve_version" "onnxruntime${ort_version:+==$ort_version}" \
  "transformers${tf_version:+==$tf_version}" safetensors pillow httpx
"${pip[@]}" install --no-deps -e "$here"
if "${pip[@]}" show onnxruntime-gpu >/dev/null 2>&1; then
  echo "$venv: onnxruntime-gpu was pulled in beside onnxruntime; remove one" >&2
  exit 1
fi
(cd / && env -u PYTHONPATH "$venv/bin/python" - <<'PY'
import importlib.metadata as md

import pmserve.predict  # noqa: F401 -- the model class wraps pmserve's OrtModel: it must import here

print(", ".join(f"{p} {md.version(p)}" for p in ("kserve", "fastapi", "uvicorn", "transformers", "torch", "onnxruntime")))
PY
)
