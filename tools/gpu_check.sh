#!/usr/bin/env bash
# One-GPU check in one script (< 12 min on an H100/H200; every part has its own timeout):
#   1. tools/gpu_check.py: SDPA flash path, then DeepSpeed (NCCL, ZeRO-2, bf16) training steps of the SD2-size
#      U-Net at 256 px and 512 px: img/s and MFU; then 256 px again with model.compile=true (eager vs compiled);
#   2. tools/benchmark_unet.py: the same U-Net step against diffusers' UNet2DConditionModel (ours/theirs);
#   3. the gpu-marked tests. The last lines summarise the ratios; reports land in $GPU_CHECK_DIR (default .).
#   bash tools/gpu_check.sh [extra gpu_check.py args]     e.g. --steps 20
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${GPU_CHECK_DIR:-.}"
mkdir -p "$OUT"
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
status=0
timeout 150 "$PY" tools/gpu_check.py --device cuda --resolution 256 --json "$OUT/gpu_256.json" "$@" || status=1
timeout 150 "$PY" tools/gpu_check.py --device cuda --resolution 512 --micro-batch 16 --json "$OUT/gpu_512.json" "$@" \
  || status=1
timeout 240 "$PY" tools/gpu_check.py --device cuda --resolution 256 --compile --warmup 5 \
  --json "$OUT/gpu_256_compiled.json" "$@" || status=1
timeout 150 "$PY" tools/benchmark_unet.py --device cuda --resolutions 256 512 --iters 10 --repeats 2 \
  | tee "$OUT/unet_vs_diffusers.txt" || status=1
timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_training.py || status=1
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("gpu_*.json"))}
for name, r in runs.items():
    t = r["train"]
    print(f"summary {name}: {t['images_per_sec']:.1f} img/s, MFU {100 * t['mfu']:.1f}% "
          f"(goal: >= 40% at 256 px, >= 45% at 512 px)")
if {"gpu_256", "gpu_256_compiled"} <= runs.keys():
    ratio = runs["gpu_256_compiled"]["train"]["images_per_sec"] / runs["gpu_256"]["train"]["images_per_sec"]
    print(f"summary compiled/eager at 256 px: {ratio:.2f}x")
text = (out / "unet_vs_diffusers.txt")
if text.is_file():
    print("summary " + text.read_text().strip().splitlines()[-1] + " (ours/diffusers; goal >= 1.25x)")
PY
echo "gpu_check.sh: done in $((SECONDS - start)) s (status $status)"
exit $status
