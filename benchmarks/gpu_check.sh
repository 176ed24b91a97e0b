#!/usr/bin/env bash
# The prepared GPU session: one short script for the lent H200 (torch, Triton and transformers are
# preinstalled there and no registry is reachable, so it runs from the source tree).
#   run: bash benchmarks/gpu_check.sh        (about 6-8 minutes; results land in $OUT or benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# 1. Correctness on the real compiler: kernels (bf16 included) and the model on the Triton path.
timeout 240 python -m pytest -q -x -p no:cacheprovider tests/kernels tests/model 2>&1 | tail -25 | tee "$OUT/gpu-tests.txt"
# 2. Speed: kernels vs the PyTorch reference, SDPA and flash-linear-attention (if installed); decode.
timeout 200 python benchmarks/retention_kernels.py --out "$OUT/kernels-cuda.json" 2>&1 | tail -40 | tee "$OUT/gpu-kernels.txt"
timeout 60 python benchmarks/decode.py 2>&1 | tail -6 | tee "$OUT/gpu-decode.txt"
cp benchmarks/results/decode-cuda.json "$OUT/" 2>/dev/null || true
