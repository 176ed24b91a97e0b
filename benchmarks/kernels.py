"""Retention kernel benchmark.

On a GPU: forward and forward+backward time, TFLOP/s and peak memory, bf16, of the Triton chunkwise kernel
(``retnet.kernels.chunk``) against the PyTorch chunkwise reference, causal
``scaled_dot_product_attention`` at the same shapes, and flash-linear-attention's
``fla.ops.retention.chunk_retention`` when it is installed. T from 1k to 16k, head dims 128 and 256,
a fixed token budget per step (B = tokens / T) and a fixed model width (H = 2048 / D).

On a CPU: the fp32 references only, to show the chunkwise form's linear cost in T against the parallel
form's quadratic one.

    python benchmarks/kernels.py            # full run (GPU: < 3 minutes on one H200)
    python benchmarks/kernels.py --quick    # a few shapes, written only to an --out given

Results are printed as a table and written to ``benchmarks/results/kernels-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where it would shadow HuggingFace's `kernels` package
# (transformers probes for it): the repository root takes that place instead, before anything is imported.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks._results import BenchmarkParser, output_help, results_path
from retnet.kernels import naive

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHUNK = 64


def log_decays(num_heads: int, device) -> torch.Tensor:
    """ln γ_h for γ_h = 1 - 2^(-5-h), computed in float64 (exact for every head) then cast to fp32."""
    heads = torch.arange(num_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - heads)).float().to(device)


def device_name() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        return re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "nvidia ")).strip("-")
    return "cpu"


# ----------------------------------------------------------------------------------------------------------
# FLOP counts (what each algorithm executes; causal SDPA counts only the lower triangle)
# ----------------------------------------------------------------------------------------------------------
def chunk_flops(B, T, H, K, V, backward: bool) -> float:
    """Chunkwise retention with chunk C: per token, intra-chunk q·kᵀ and A·v over full C-wide tiles,
    plus the state product q·h and the state update kᵀ·v. The backward recomputes the states and runs
    the state-gradient pass, dv (A, k·dh, Aᵀ·do) and dq/dk (do·vᵀ, do·hᵀ, v·dhᵀ, dA·k, dAᵀ·q)."""
    fwd = 2 * CHUNK * (K + V) + 4 * K * V
    bwd = 6 * CHUNK * K + 4 * CHUNK * V + 10 * K * V
    return B * H * T * (fwd + (bwd if backward else 0))


def attention_flops(B, T, H, D, backward: bool) -> float:
    fwd = 2 * B * H * T * T * D  # q·kᵀ and p·v, 2 FLOPs each, half the T×T square
    return fwd * (3.5 if backward else 1.0)


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
def time_cpu(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_gpu(fn, grad_to_none=None, rep: int = 60) -> float:
    """Mean ms by triton's do_bench, after one untimed call: do_bench sizes its warmup and repetitions
    from its first calls, and a first call that compiles and autotunes (seconds) would leave one repetition."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=15, rep=rep, grad_to_none=grad_to_none)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    header = " ".join(f"{title:>{width}}" for _, title, width in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for key, _, width in columns:
            value = row.get(key)
            if value is None:
                text = "-"
            elif isinstance(value, float):
                text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
            else:
                text = str(value)
            cells.append(f"{text:>{width}}")
        print(" ".join(cells))


# ----------------------------------------------------------------------------------------------------------
# CPU: the references' scaling
# ----------------------------------------------------------------------------------------------------------
def run_cpu(args) -> dict:
    lengths = [256, 512, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096]
    B, H, D = 1, 4, 64
    torch.manual_seed(0)
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
        log_decay = log_decays(H, "cpu")
        repeats = 3 if T <= 1024 else 1
        with torch.no_grad():
            t_par = time_cpu(partial(naive.parallel_retention, q, k, v, log_decay), repeats)
            t_chunk = time_cpu(partial(naive.chunk_retention, q, k, v, log_decay, chunk_size=CHUNK), repeats)
        rows.append(dict(
            T=T, parallel_ms=t_par, chunk_ms=t_chunk, parallel_over_chunk=t_par / t_chunk,
            parallel_us_per_token=t_par * 1e3 / T, chunk_us_per_token=t_chunk * 1e3 / T,
        ))
    print(f"fp32 references on CPU, forward, B={B} H={H} K=V={D} chunk={CHUNK} ({torch.get_num_threads()} threads)")
    print_table(rows, [
        ("T", "T", "6"), ("parallel_ms", "parallel ms", "12"), ("chunk_ms", "chunk ms", "10"),
        ("parallel_over_chunk", "par/chunk", "10"), ("parallel_us_per_token", "par us/tok", "11"),
        ("chunk_us_per_token", "chunk us/tok", "13"),
    ])
    first, last = rows[0], rows[-1]
    growth = last["T"] / first["T"]
    print(
        f"T x{growth:.0f}: parallel time x{last['parallel_ms'] / first['parallel_ms']:.1f}, "
        f"chunkwise time x{last['chunk_ms'] / first['chunk_ms']:.1f} (linear would be x{growth:.0f})"
    )
    return dict(mode="cpu-reference", B=B, H=H, K=D, V=D, chunk_size=CHUNK, rows=rows)


# ----------------------------------------------------------------------------------------------------------
# GPU: Triton kernel vs reference, SDPA and fla
# ----------------------------------------------------------------------------------------------------------
PROVIDERS = ("triton", "torch-ref", "sdpa", "fla")


def _providers(text: str) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in chosen if name not in PROVIDERS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"expected names of {', '.join(PROVIDERS)}; got {text!r}")
    return chosen


def _fla_op():
    try:
        from fla.ops.retention import chunk_retention as fla_chunk_retention
    except Exception as exc:  # not installed, or incompatible with this torch/triton
        print(f"flash-linear-attention not available ({type(exc).__name__}: {exc}); skipping it")
        return None
    return fla_chunk_retention


def measure(op, q, k, v, do, backward: bool) -> tuple[float, float | None]:
    """(milliseconds, peak MiB above the inputs) of ``op(q, k, v)``, or of it and its backward from ``do``.
    The peak comes from one extra call (CUDA only): what the op allocates, output and gradients included."""
    if backward:
        fn = lambda: torch.autograd.backward(op(q, k, v), do)
        ms = time_gpu(fn, grad_to_none=[q, k, v]) if q.is_cuda else time_cpu(fn, 1)
    else:
        fn = lambda: op(q, k, v)
        with torch.no_grad():
            ms = time_gpu(fn) if q.is_cuda else time_cpu(fn, 1)
    if not q.is_cuda:
        return ms, None
    for x in (q, k, v):
        x.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.set_grad_enabled(backward):
        fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    for x in (q, k, v):
        x.grad = None
    return ms, peak


def run_gpu(args) -> dict:
    from retnet.kernels.chunk import chunk_retention as triton_chunk_retention

    fla_chunk_retention = _fla_op() if "fla" in args.providers else None
    if "fla" in args.providers and fla_chunk_retention is None and set(args.providers) <= {"triton", "fla"}:
        # Left alone, triton would be timed again at every shape: minutes of a GPU session spent on what the pass
        # with the other providers already measured.
        print("nothing to compare triton with here: no shapes timed")
        return dict(mode="gpu", providers=list(args.providers), fla_available=False, fla_version=None, checks=[],
                    rows=[])
    lengths, head_dims = args.lengths, args.head_dims
    tokens, width, dtype, device = args.tokens, 2048, torch.bfloat16, "cuda"
    if args.triton_on_cpu:  # harness smoke test under TRITON_INTERPRET=1 (numbers meaningless)
        lengths, head_dims, tokens, width, dtype, device = [64, 128], [16], 128, 32, torch.float32, "cpu"
    max_ref_T = args.max_ref_T

    def providers(log_decay):
        """The timed ops (those of ``--providers``) and the fp32 reference the outputs are checked against."""
        ops = {
            "triton": lambda q, k, v: triton_chunk_retention(q, k, v, log_decay, chunk_size=CHUNK)[0],
            "torch-ref": lambda q, k, v: naive.chunk_retention(q, k, v, log_decay, chunk_size=CHUNK)[0],
            "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2),
        }
        if fla_chunk_retention is not None:
            ops["fla"] = lambda q, k, v: fla_chunk_retention(q, k, v)[0]
        return {name: op for name, op in ops.items() if name in args.providers}, ops["torch-ref"]

    rows, checks = [], []
    for D in head_dims:
        H = width // D
        log_decay = log_decays(H, device)
        for T in lengths:
            B = max(1, tokens // T)
            gen = torch.Generator(device=device).manual_seed(T + D)
            q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
            q, k = q * D**-0.25, k * D**-0.25
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            do = torch.randn_like(v)
            ops, reference = providers(log_decay)
            if lengths[0] == T:
                # fla fixes its decays (γ_h = 1 - 2^(-5-h)) and scale (K^-1/2) inside its op: matching the
                # reference here shows the timed ops compute the same retention, not just the same shapes.
                with torch.no_grad():
                    ref = reference(q, k, v).float()
                    for name in [name for name in ("triton", "fla") if name in ops]:
                        err = ((ops[name](q, k, v).float() - ref).abs().max() / ref.abs().max()).item()
                        checks.append(dict(D=D, T=T, provider=name, max_rel_err_vs_reference=err))
                        print(f"check D={D} T={T}: max |{name} - reference| / max |reference| = {err:.2e}")
            for mode in ("fwd", "fwd+bwd"):
                backward = mode == "fwd+bwd"
                timed, peaks = {}, {}
                for name, op in ops.items():
                    if name == "torch-ref" and max_ref_T < T:
                        continue
                    try:
                        timed[name], peaks[name] = measure(op, q, k, v, do, backward)
                    except Exception as exc:  # e.g. out of memory, or an fla/triton mismatch
                        print(f"  {name} D={D} T={T} {mode}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                        torch.cuda.empty_cache()
                print(f"  D={D} T={T} B={B} {mode}: " + ", ".join(
                    f"{name} {ms:.3g} ms" + (f" {peaks[name]:.0f} MiB" if peaks.get(name) is not None else "")
                    for name, ms in timed.items()
                ), flush=True)  # as it goes: a run cut off by a timeout keeps what it measured
                for name, ms in timed.items():
                    flops = attention_flops(B, T, H, D, backward) if name == "sdpa" else chunk_flops(
                        B, T, H, D, D, backward
                    )
                    rows.append(dict(
                        D=D, T=T, B=B, H=H, mode=mode, provider=name, ms=ms,
                        tflops=flops / (ms * 1e-3) / 1e12, peak_mib=peaks.get(name),
                        speedup_of_triton=(ms / timed["triton"]) if "triton" in timed else None,
                    ))
            del q, k, v, do
            torch.cuda.empty_cache()
    print(f"\n{str(dtype).removeprefix('torch.')}, {tokens} tokens per step (B = tokens / T), H = {width} / D, chunk {CHUNK}; "
          "speedup = provider time / triton time (> 1: triton faster)")
    print_table(rows, [
        ("D", "D", "4"), ("T", "T", "6"), ("B", "B", "3"), ("H", "H", "3"), ("mode", "mode", "8"),
        ("provider", "provider", "10"), ("ms", "ms", "9"), ("tflops", "TFLOP/s", "8"), ("peak_mib", "peak MiB", "9"),
        ("speedup_of_triton", "speedup", "8"),
    ])
    return dict(
        mode="gpu", dtype=str(dtype).removeprefix("torch."), tokens_per_step=tokens, model_width=width, chunk_size=CHUNK,
        providers=list(args.providers), fla_available=fla_chunk_retention is not None,
        fla_version=getattr(sys.modules.get("fla"), "__version__", None), checks=checks, rows=rows,
    )


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__.split("\n\n")[0], quick_help="fewer shapes (CPU: T up to 2048; "
                             "GPU: T 1024 and 4096, head dim 128, the reference up to 4096); writes only to an --out "
                             "given")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step on the GPU (B = tokens / T)")
    parser.add_sized("--max-ref-T", type=int, full=16384, quick=4096, help="longest T for the PyTorch reference on GPU")
    parser.add_argument("--out", type=Path, default=None, help=output_help("kernels-<device>.json"))
    parser.add_sized("--head-dims", type=int, nargs="+", full=[128, 256], quick=[128], help="GPU: head dims, in this "
                     "order")
    parser.add_sized("--lengths", type=int, nargs="+", full=[1024, 2048, 4096, 8192, 16384], quick=[1024, 4096],
                     help="GPU: sequence lengths")
    parser.add_argument(
        "--providers", type=_providers, default=PROVIDERS,
        help=f"comma-separated ops to time on the GPU, of {','.join(PROVIDERS)} (default: all; fla when importable)",
    )
    parser.add_argument(
        "--triton-on-cpu", action="store_true",
        help="smoke-test the GPU comparison on tiny shapes through Triton's interpreter (set TRITON_INTERPRET=1)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    started = time.perf_counter()
    device = device_name()
    if args.triton_on_cpu:
        device = "cpu-interpreter"
    result = run_gpu(args) if torch.cuda.is_available() or args.triton_on_cpu else run_cpu(args)
    result.update(
        device=device, quick=args.quick, torch=torch.__version__, python=platform.python_version(),
        seconds=round(time.perf_counter() - started, 1),
    )
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    print()
    out = results_path(args.out, args.quick, RESULTS_DIR / f"kernels-{device}.json", flag="--out",
                       note=f" ({result['seconds']} s)")
    if out is None:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
