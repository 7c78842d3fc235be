#!/usr/bin/env bash
# GPU check: train, export and sample the default models on CUDA (bf16) and on the CPU, side by side.
#
#   bench/gpu_check.sh [--models digits-unet,pydoc-gpt] [--seconds 30] [--samples 16]
#
# Makes a venv (GPU_VENV, default /tmp/genflow-gpu-venv) with a CUDA build of torch and
# onnxruntime-gpu plus genflow's own dependencies, then runs bench/gpu_check.py in it.
#   GPU_PYTHON=/path/to/python   use an interpreter that already has CUDA torch + onnxruntime-gpu
#   TORCH_INDEX=URL              where CUDA torch comes from (default: the cu124 wheels)
#   PIP_FIND_LINKS=DIR           plus PIP_NO_INDEX=1: install from a folder of wheels (no network)
# Budget: install ~2 min with a warm pip cache, then ~4-5 min for the three default models (< 8 min).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi); run this on a machine with one" >&2
  exit 1
fi
nvidia-smi -L

if [[ -n "${GPU_PYTHON:-}" ]]; then
  PY="$GPU_PYTHON"
else
  VENV="${GPU_VENV:-/tmp/genflow-gpu-venv}"
  TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu124}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip
  # CUDA torch first, so that genflow's "torch>=2.4" is already met by it and not replaced
  "$PY" -m pip install -q torch --index-url "$TORCH_INDEX"
  "$PY" -m pip install -q -e ".[gpu]"
  # onnxruntime (CPU build) beside onnxruntime-gpu would shadow the CUDA provider
  "$PY" -m pip uninstall -q -y onnxruntime >/dev/null 2>&1 || true
fi

"$PY" - <<'EOF'
import onnxruntime as ort
import torch

assert torch.cuda.is_available(), f"torch {torch.__version__} was built without CUDA or sees no GPU"
providers = ort.get_available_providers()
assert "CUDAExecutionProvider" in providers, f"onnxruntime {ort.__version__} lists no CUDA provider: {providers}"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), onnxruntime {ort.__version__}: {providers}")
EOF

exec timeout 420 "$PY" bench/gpu_check.py "$@"
