#!/usr/bin/env bash
# One-GPU check, under 5 minutes on an H100: SDPA flash path, then DeepSpeed (NCCL, ZeRO-2, bf16) training
# steps of the SD2-size U-Net at 256 px with img/s and MFU (tools/gpu_check.py), then the gpu-marked tests.
#   bash tools/gpu_check.sh [extra gpu_check.py args]     e.g. --micro-batch 64 --steps 20
# PYTHON picks the interpreter (default: python3); GPU_CHECK_JSON=FILE also writes the report as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY
start=$SECONDS
timeout 240 "$PY" tools/gpu_check.py --device cuda ${GPU_CHECK_JSON:+--json "$GPU_CHECK_JSON"} "$@"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_training.py
echo "gpu_check.sh: done in $((SECONDS - start)) s"
