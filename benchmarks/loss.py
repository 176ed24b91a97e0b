"""The LM head's loss: chunked ``linear_cross_entropy`` vs logits then ``causal_lm_loss``, forward + backward.

Each variant runs in its own process, so its peak memory is its own: on CUDA ``max_memory_allocated``, on CPU
the peak resident set above the process's after the inputs exist. Times are medians of alternated runs. The
default shape is the ``small`` preset's head (hidden 512, vocab 16384) at 8 × 512 tokens; ``--gpu`` takes a
1.3B-like head (hidden 2048, vocab 50k) at 8 × 2048 tokens in bf16.

    python benchmarks/loss.py [--batch 8] [--seq-len 512] [--hidden 512] [--vocab 16384] [--steps 5] [--out PATH]
    # writes only to an --out given: the recorded benchmarks/results/loss-cpu.json is not the default shape's run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where benchmarks/kernels.py would shadow HuggingFace's
# `kernels` package (transformers probes for it): the repository root takes that place, before any import.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F

from benchmarks._results import BenchmarkParser
from retnet.model.loss import linear_cross_entropy
from retnet.model.modeling_retnet import causal_lm_loss


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.batch, args.seq_len, args.hidden, generator=generator).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5).to(device, dtype)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=generator).to(device)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step() -> float:
        if variant == "chunked":
            loss = linear_cross_entropy(hidden, weight, labels)
        else:
            loss = causal_lm_loss(F.linear(hidden, weight), labels)
        loss.backward()
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    loss = step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()) - base
    return {"variant": variant, "loss": loss, "seconds": times, "peak_bytes": peak}


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_flag="--gpu", quick_help="a 1.3B-like head: hidden 2048, vocab 50304, 8 × 2048")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_sized("--seq-len", type=int, full=512, quick=2048)
    parser.add_sized("--hidden", type=int, full=512, quick=2048)
    parser.add_sized("--vocab", type=int, full=16384, quick=50304)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--out", "--output", type=Path, metavar="PATH", help="where the JSON goes (default: nowhere; "
                        "benchmarks/results/loss-cpu.json records a run of --seq-len 1024 --vocab 32768)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process: one variant, JSON out
    return parser


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(given)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    results: dict[str, list[dict]] = {"logits": [], "chunked": []}
    forwarded = [a for a in given if a != "--gpu"] + [
        f"--batch={args.batch}", f"--seq-len={args.seq_len}", f"--hidden={args.hidden}", f"--vocab={args.vocab}",
        f"--dtype={args.dtype}", f"--device={args.device}"]
    for _ in range(args.rounds):
        for variant in results:
            done = subprocess.run([sys.executable, __file__, *forwarded, f"--variant={variant}"], capture_output=True,
                                  text=True, check=True)
            results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"device {args.device} {args.dtype}; {args.batch} × {args.seq_len} tokens, hidden {args.hidden}, "
          f"vocab {args.vocab}")
    summary = {}
    for variant, runs in results.items():
        seconds = statistics.median(s for run in runs for s in run["seconds"])
        peak = statistics.median(run["peak_bytes"] for run in runs)
        summary[variant] = {"seconds": seconds, "peak_bytes": peak, "loss": runs[0]["loss"]}
        print(f"{variant:<8} {seconds * 1e3:9.1f} ms  peak {peak / 2**20:9.1f} MiB  loss {runs[0]['loss']:.5f}")
    ratio_time = summary["logits"]["seconds"] / summary["chunked"]["seconds"]
    ratio_memory = summary["logits"]["peak_bytes"] / max(1, summary["chunked"]["peak_bytes"])
    print(f"chunked vs logits: {ratio_time:.2f}× the speed, {ratio_memory:.1f}× less peak memory")
    if args.out is None:
        print("nothing written (give --out to keep it)")
        return
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": {"batch": args.batch, "seq_len": args.seq_len, "hidden": args.hidden,
                                         "vocab": args.vocab, "dtype": args.dtype}, "summary": summary,
                               "speed_ratio": ratio_time, "memory_ratio": ratio_memory}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
