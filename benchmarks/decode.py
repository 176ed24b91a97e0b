"""Per-token decode latency and state size: RetNet's O(1) recurrent state vs a Llama KV cache.

Both models (~27.3M parameters, matched width/depth/vocab) are built in the same run; for each context
length the prompt is prefilled once, then ``--steps`` single-token decode steps are timed (median). The
ratios are Llama / RetNet, so > 1 means RetNet is faster or smaller.

    python benchmarks/decode.py [--contexts 128 1024 4096] [--steps 32] [--device cpu|cuda] [--quick] [--output PATH]
    # writes benchmarks/results/decode-<device>.json (--quick writes only to an --output given)
"""

from __future__ import annotations

import argparse
import inspect
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

VOCAB, HIDDEN, LAYERS = 16384, 512, 6


def build_models(device: torch.device, dtype: torch.dtype):
    # (here, after retnet's import: transformers imported first logs torchao's CUDA-extension warnings)
    from transformers import LlamaConfig, LlamaForCausalLM

    retnet_model = RetNetForCausalLM(RetNetConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        tie_word_embeddings=True,
    ))
    # Llama matched to RetNet per layer: q,k (2d²) + v,g (2·2d²) + o (2d²) + FFN (2·d·2d) = 12d² = 4d² + 3·d·I.
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=8,
        num_key_value_heads=8, intermediate_size=HIDDEN * 8 // 3, tie_word_embeddings=True,
        max_position_embeddings=8192, attn_implementation="sdpa",
    ))
    return [("retnet", retnet_model.to(device, dtype).eval()), ("llama", llama.to(device, dtype).eval())]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_kwarg(model) -> str:
    """The name the model's forward takes its cache under. transformers renamed ``past_key_values`` to
    ``cache`` in 5.2x (RetNet takes both); a name the forward lacks would vanish into its ``**kwargs``
    and every decode step would silently start from an empty cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill(name, model, context: int, device: torch.device):
    """Run the prompt once; returns (cache, next token)."""
    from transformers import DynamicCache

    prompt = torch.randint(0, VOCAB, (1, context), device=device)
    cache = None if name == "retnet" else DynamicCache(config=model.config)
    out = model(prompt, **({cache_kwarg(model): cache} if cache is not None else {}), use_cache=True,
                logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return cache, out.logits[:, -1:].argmax(-1)


def state_bytes(name, cache) -> int:
    if name == "retnet":
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def measure(models, context: int, steps: int, device: torch.device) -> dict:
    """Median ms per decode step of each model. Steps alternate between the models, so load from other
    processes on a shared machine hits both alike and the ratio stays meaningful."""
    running = {name: prefill(name, model, context, device) for name, model in models}
    latencies = {name: [] for name, _ in models}
    for _ in range(steps):
        for name, model in models:
            cache, token = running[name]
            synchronize(device)
            start = time.perf_counter()
            out = model(token, **{cache_kwarg(model): cache}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            synchronize(device)
            latencies[name].append(time.perf_counter() - start)
            running[name] = (cache, token)
    return {
        name: {"model": name, "context": context, "ms_per_token": 1e3 * statistics.median(latencies[name]),
               "state_bytes": state_bytes(name, running[name][0])}
        for name, _ in models
    }


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="contexts 128 and 1024, 8 steps; writes only to an --output given")
    parser.add_sized("--contexts", type=int, nargs="+", full=[128, 1024, 4096], quick=[128, 1024])
    parser.add_sized("--steps", type=int, full=32, quick=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help=output_help("decode-<device>.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    models = build_models(device, dtype)
    for name, model in models:
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    rows = []
    for context in args.contexts:
        results = measure(models, context, args.steps, device)
        rows.extend(results.values())
        r, ll = results["retnet"], results["llama"]
        print(f"context {context:>5}: retnet {r['ms_per_token']:.2f} ms/token, {r['state_bytes'] / 2**20:.2f} MiB state"
              f" | llama {ll['ms_per_token']:.2f} ms/token, {ll['state_bytes'] / 2**20:.2f} MiB KV"
              f" | latency ratio llama/retnet {ll['ms_per_token'] / r['ms_per_token']:.2f}x,"
              f" memory ratio {ll['state_bytes'] / r['state_bytes']:.2f}x")
    path = results_path(args.output, args.quick, Path(__file__).parent / "results" / f"decode-{device.type}.json")
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": str(device), "dtype": str(dtype), "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
