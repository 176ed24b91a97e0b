#!/usr/bin/env bash
# The prepared GPU session: one short script for the lent H200 (torch, Triton and transformers are
# preinstalled there and no registry is reachable, so it runs from the source tree).
#   run: bash benchmarks/gpu_check.sh        (at most ~12 minutes: every step has its own timeout; results land in $OUT)
# Each step's whole log goes to $OUT (the console shows its tail), so a step cut off by its timeout still
# leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# 1. Correctness on the real compiler: kernels (bf16 included) and the model on the Triton path (the
#    compile-only check, test_aot_compile.py, already runs on every CPU machine).
timeout 240 python -m pytest -q -x -p no:cacheprovider tests/kernels tests/model --ignore=tests/kernels/test_aot_compile.py 2>&1 | tee "$OUT/gpu-tests.txt" | tail -25
# 2. Speed: kernels vs the PyTorch reference, SDPA and flash-linear-attention (if installed); decode.
timeout 200 python benchmarks/kernels.py --out "$OUT/kernels-cuda.json" 2>&1 | tee "$OUT/gpu-kernels.txt" | tail -40
timeout 60 python benchmarks/decode.py 2>&1 | tee "$OUT/gpu-decode.txt" | tail -6
cp benchmarks/results/decode-cuda.json "$OUT/" 2>/dev/null || true
# 3. Training on the GPU: NCCL through torchrun (one rank), bf16 autocast, the Triton varlen kernels on packed
#    documents; then training throughput and MFU against a matched Llama (bf16 where the machine has it).
timeout 120 torchrun --standalone --nproc_per_node=1 -m retnet.train --config tiny --train.steps=300 \
    --train.output_dir="$OUT/train-gpu" --logging.progress=false --logging.tensorboard=false \
    --checkpoint.export=false 2>&1 | tee "$OUT/gpu-train.txt" | tail -12
timeout 80 python benchmarks/train.py --steps 3 --tokens 16384 2>&1 | tee "$OUT/gpu-train-bench.txt" | tail -14
cp benchmarks/results/train-cuda.json "$OUT/" 2>/dev/null || true
