#!/usr/bin/env bash
# The prepared GPU session: one short script for the lent H200 (torch, Triton and transformers are
# preinstalled there and no registry is reachable, so it runs from the source tree).
#   run: bash benchmarks/gpu_check.sh, carry ["benchmarks/wheels"]  (after `make gpu-wheels`; every step has its own timeout: at most 575 s in all, each cut to what is left of 590 s, so the last pack runs within one 600 s `run` call)
# Steps go in order of importance, so a session cut short still has the first ones. Each step's whole log
# is kept (the console shows its tail), so a step cut off by its timeout still leaves what it measured;
# pytest runs verbose for the same reason (a killed run prints no summary). `run` brings back at most 8 files
# from $OUT: the logs and JSON go to one folder, packed into $OUT/gpu-check.tar.gz after every step.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"  # absolute: a step that changes directory still imports this tree
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# The image documents its Python as python3 (a venv's): where `python` or `torchrun` is not on PATH, stand-ins for
# them (after PATH, so real ones win; `timeout` runs programs, not shell functions).
SHIMS=$(mktemp -d)
if ! command -v python >/dev/null; then
    # a script, not a link: a link to a venv's python3 from here would start without the venv (pyvenv.cfg is
    # looked up beside the path it was started by)
    printf '#!/bin/sh\nexec python3 "$@"\n' > "$SHIMS/python" && chmod +x "$SHIMS/python"
fi
if ! command -v torchrun >/dev/null; then
    printf '#!/bin/sh\nexec python -m torch.distributed.run "$@"\n' > "$SHIMS/torchrun" && chmod +x "$SHIMS/torchrun"
fi
export PATH="$PATH:$SHIMS"
LOGS=$(mktemp -d)/gpu-check
mkdir -p "$LOGS"
pack() { tar -czf "$OUT/gpu-check.tar.gz.part" -C "$LOGS/.." gpu-check && mv "$OUT/gpu-check.tar.gz.part" "$OUT/gpu-check.tar.gz"; }
# flash-linear-attention, the kernels' baseline, is not installed there: `make gpu-wheels` here puts its wheels
# (pure Python) in benchmarks/wheels, `run` carries that folder (carry: ["benchmarks/wheels"]), and they are
# unpacked onto PYTHONPATH. Without them the benchmark says fla is unavailable and times the rest.
if ! python -c "import fla" 2>/dev/null && compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    FLA_DIR=$(mktemp -d)
    for wheel in benchmarks/wheels/*.whl; do python -m zipfile -e "$wheel" "$FLA_DIR"; done
    export PYTHONPATH="$PYTHONPATH:$FLA_DIR"
fi
# The steps' own timeouts sum to 575 s, but the imports, the wheels and the packs between them take time too: each
# step gets at most what is left of BUDGET, so a slow start shortens the last step instead of `run` killing the
# script before its last pack (which would lose that step's whole log).
BUDGET=${GPU_CHECK_BUDGET:-590}
left() { local rest=$((BUDGET - SECONDS)); if ((rest < $1)); then echo $((rest > 1 ? rest : 1)); else echo "$1"; fi; }
PYTEST=(python -m pytest -v --tb=short -p no:cacheprovider --durations=10)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOGS/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)
try:
    import fla; print('fla', fla.__version__)
except Exception as exc: print('fla unavailable:', type(exc).__name__, exc)" | tee -a "$LOGS/gpu.txt"
pack
# 1. bf16 on the real compiler: the kernels against the fp32 reference, the model's bf16-autocast training
#    step on them, and real autotuning around an in-place decode state. (The suite runs untuned:
#    tests/conftest.py sets RETNET_AUTOTUNE=0, one compile per shape.) Not the fla conversion's, as in step 3.
timeout "$(left 90)" "${PYTEST[@]}" tests/kernels tests/model --ignore=tests/kernels/test_aot_compile.py \
    --ignore=tests/model/test_convert_fla.py -k "bf16 or model_on_triton or real_autotuning" 2>&1 \
    | tee "$LOGS/gpu-tests-bf16.txt" | tail -25
pack
# 2. Speed: kernels (autotuned) vs the PyTorch reference and SDPA; then vs flash-linear-attention apart, so the
#    minutes its first calls spend autotuning (every config of every kernel compiled) cannot cut this one short.
timeout "$(left 140)" python benchmarks/kernels.py --providers triton,torch-ref,sdpa --out "$LOGS/kernels-cuda.json" 2>&1 \
    | tee "$LOGS/gpu-kernels.txt" | tail -40
pack
#    Head dim 256 first: fla's gap there is the one to close, and its autotuning may not leave time for both.
timeout "$(left 80)" python benchmarks/kernels.py --providers triton,fla --head-dims 256 128 --out "$LOGS/kernels-cuda-fla.json" 2>&1 \
    | tee "$LOGS/gpu-kernels-fla.txt" | tail -30
pack
# 3. The rest of the kernel and model tests, compiled for real (the compile-only check, test_aot_compile.py,
#    already runs on every CPU machine).
#    (Not the fla conversion's: fla would spend the step autotuning its own kernels.)
#    Compiling is most of it: ~270 kernel specializations at 0.3-0.7 s of CPU each (Triton 3.6, sm_90), and the
#    CPU-only model files queue first (longest first), so one process would not reach most kernel tests in 85 s.
#    Spread over pytest-xdist workers (in the image), by file as `make test` spreads them.
if python -c "import xdist" 2>/dev/null; then PYTEST+=(-n 8 --dist loadfile); fi
timeout "$(left 85)" "${PYTEST[@]}" tests/kernels tests/model --ignore=tests/kernels/test_aot_compile.py \
    --ignore=tests/model/test_convert_fla.py --deselect tests/model/test_triton_path.py -k "not bf16 and not real_autotuning" 2>&1 \
    | tee "$LOGS/gpu-tests.txt" | grep -E "FAILED|ERROR|passed|failed" | tail -25
pack
# 4. Training on the GPU: NCCL through torchrun (one rank), FSDP2 with bf16 parameters, the Triton varlen
#    kernels on packed documents, a sharded checkpoint at step 100 and 200, the export gathered from FSDP2.
timeout "$(left 80)" torchrun --standalone --nproc_per_node=1 -m retnet.train --config tiny --train.steps=200 \
    --train.parallelism=fsdp --checkpoint.interval=100 \
    --train.output_dir="$LOGS/train-gpu" --logging.progress=false --logging.tensorboard=false \
    2>&1 | tee "$LOGS/gpu-train.txt" | tail -12
#    ... and that model scored on whole documents in bf16: packed rows continuing cache rows (varlen + states).
timeout "$(left 25)" python -m retnet.train.evaluate --model "$LOGS/train-gpu/export" --max-documents 64 --segment-tokens 512 \
    --batch-size 8 --device cuda --dtype bfloat16 --no-progress --json 2>&1 | tee "$LOGS/gpu-eval.txt" | tail -3
rm -rf "$LOGS/train-gpu/checkpoints" "$LOGS/train-gpu/export"  # weights: not worth carrying back
pack
# 5. Decode latency vs a KV cache; training throughput and MFU against a matched Llama.
timeout "$(left 30)" python benchmarks/decode.py 2>&1 | tee "$LOGS/gpu-decode.txt" | tail -6
cp benchmarks/results/decode-cuda.json "$LOGS/" 2>/dev/null || true
pack
timeout "$(left 45)" python benchmarks/train.py --steps 3 --tokens 16384 2>&1 | tee "$LOGS/gpu-train-bench.txt" | tail -14
cp benchmarks/results/train-cuda.json "$LOGS/" 2>/dev/null || true
echo "gpu_check: ${SECONDS} s" | tee -a "$LOGS/gpu.txt"
pack
