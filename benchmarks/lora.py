"""What serving LoRA and DoRA adapters unmerged costs: one recurrent decode step of a batch, per adapter mix.

The server's own path (``retnet.serve.lora``): the model's Linear layers wrapped by ``LoraLinear``, the adapter
of each row set with ``LoraSlots.tokens`` before the forward, as the engine sets it. Adapters are rank ``--rank``
on q/k/v/o/up/down with random matrices (their values do not change the cost). For each model and batch size the
mixes are timed interleaved, one step each in turn, so load from other processes hits all alike; the ratios are
against the unwrapped model of the same round (> 1: slower).

    python benchmarks/lora.py [--models micro h768] [--batches 1 32] [--steps 40] [--rank 16] [--quick] [--output PATH]
    # writes benchmarks/results/lora-cpu.json (--quick writes only to an --output given)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where benchmarks/kernels.py would shadow HuggingFace's
# `kernels` package (transformers probes for it): the repository root takes that place, before any import.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

import retnet  # noqa: F401
from benchmarks._results import BenchmarkParser, output_help, results_path
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.serve.lora import LoraAdapter, install, linear_modules

MODELS = {
    "micro": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "h768": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=4,
                 intermediate_size=2048),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
# Each mix: the adapter slot of every row (0: the base model), as a function of the batch size.
MIXES = {
    "wrapped, all base": lambda b: [0] * b,
    "all LoRA a": lambda b: [1] * b,
    "all DoRA c": lambda b: [3] * b,
    "base / LoRA a / LoRA b": lambda b: [i % 3 for i in range(b)],
    "base / LoRA a / DoRA c": lambda b: [(0, 1, 3)[i % 3] for i in range(b)],
}


def random_adapter(name: str, linears, rank: int, dora: bool, generator: torch.Generator) -> LoraAdapter:
    adapter = LoraAdapter(name, f"<random {name}>", None, rank)
    for module, linear in linears.items():
        if module.rsplit(".", 1)[-1] in TARGETS:
            a = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
            b = torch.randn(linear.out_features, rank, generator=generator) * 0.02
            adapter.weights[module] = (a, b)
            if dora:
                adapter.magnitudes[module] = linear.weight.detach().float().norm(dim=1) * 1.1
    return adapter


@torch.no_grad()
def prefill(model, batch: int, vocab: int):
    out = model(torch.randint(0, vocab, (batch, 16)), use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def measure(name: str, batch: int, steps: int, rank: int) -> list[dict]:
    torch.manual_seed(0)
    config = RetNetConfig(**MODELS[name])
    plain = RetNetForCausalLM(config).eval()
    wrapped = RetNetForCausalLM(config).eval()
    wrapped.load_state_dict(plain.state_dict())
    generator = torch.Generator().manual_seed(0)
    linears = linear_modules(wrapped)
    adapters = [random_adapter(n, linears, rank, dora, generator)
                for n, dora in (("a", False), ("b", False), ("c", True))]
    for slot, adapter in enumerate(adapters, start=1):
        adapter.slot = slot
    slots = install(wrapped, adapters, torch.device("cpu"), torch.float32)

    runs = {"no adapters": (plain, None), **{mix: (wrapped, rows(batch)) for mix, rows in MIXES.items()}}
    state = {mix: prefill(model, batch, config.vocab_size) for mix, (model, _) in runs.items()}
    latencies = {mix: [] for mix in runs}
    for _ in range(steps):
        for mix, (model, rows) in runs.items():
            cache, token = state[mix]
            context = slots.tokens(rows) if rows is not None else contextlib.nullcontext()
            start = time.perf_counter()
            with context:
                out = model(token, cache=cache, use_cache=True)
            latencies[mix].append(time.perf_counter() - start)
            state[mix] = (cache, out.logits[:, -1:].argmax(-1))
    # The lower quartile: the step's own cost, least disturbed by the other processes of a shared machine.
    ms = {mix: 1e3 * statistics.quantiles(values, n=4)[0] for mix, values in latencies.items()}
    return [{"model": name, "batch": batch, "mix": mix, "ms_per_step": ms[mix],
             "ratio_vs_no_adapters": ms[mix] / ms["no adapters"]} for mix in runs]


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="the micro model only, 12 steps; writes only to an --output given")
    parser.add_sized("--models", nargs="+", choices=sorted(MODELS), full=["micro", "h768"], quick=["micro"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_sized("--steps", type=int, full=40, quick=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--output", type=Path, help=output_help("lora-cpu.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for batch in args.batches:
            results = measure(name, batch, args.steps, args.rank)
            rows.extend(results)
            print(f"{name}, batch {batch}: " + " | ".join(
                f"{r['mix']} {r['ms_per_step']:.2f} ms ({r['ratio_vs_no_adapters']:.2f}x)" for r in results))
    path = results_path(args.output, args.quick, Path(__file__).parent / "results" / "lora-cpu.json")
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": args.rank, "threads": args.threads, "steps": args.steps, "rows": rows},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
