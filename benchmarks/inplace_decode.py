"""The server's decode step with its states updated in place (``RetNetCache.update_in_place``) vs a new state tensor
per layer per step, at several batch sizes.

One model (hidden 512, 8 layers, vocab 32000: the profile that found the allocation) decodes each batch twice
over, from the same prefilled states, under ``torch.inference_mode`` as the engine does; the steps alternate
between the two caches, so load from other processes hits both alike. The ratio is new-tensor / in-place
median ms per step, so > 1 means the in-place step is faster.

    python benchmarks/inplace_decode.py [--batches 1 8 16] [--steps 64] [--device cpu|cuda] [--quick] [--output PATH]
    # writes benchmarks/results/inplace_decode-<device>.json (--quick writes only to an --output given)
"""

from __future__ import annotations

import argparse
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

VOCAB, HIDDEN, LAYERS, PROMPT = 32000, 512, 8, 32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(model, batch: int, steps: int, device: torch.device) -> dict:
    """Median ms per decode step (``logits_to_keep=1``, the engine's call) with and without in-place states."""
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), device=device)
    prefilled = model(prompt, use_cache=True, logits_to_keep=1).cache
    first = torch.randint(0, VOCAB, (batch, 1), device=device)
    running = {}
    for in_place in (False, True):
        cache = prefilled.clone()
        cache.update_in_place = in_place
        running[in_place] = (cache, first)
    latencies = {False: [], True: []}
    for _ in range(steps):
        for in_place, (cache, token) in running.items():
            synchronize(device)
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True, retention_mode="recurrent",
                        logits_to_keep=1, return_dict=True)
            synchronize(device)
            latencies[in_place].append(time.perf_counter() - start)
            running[in_place] = (cache, out.logits[:, -1:].argmax(-1))
    # Both decoded the same tokens from the same states: the figures compare the same work.
    same = all(torch.equal(a, b) for a, b in zip(running[False][0].states, running[True][0].states))
    new, kept = (1e3 * statistics.median(latencies[key]) for key in (False, True))
    return {"batch": batch, "new_state_ms": new, "in_place_ms": kept, "ratio": new / kept, "same_states": same}


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="8 steps; writes only to an --output given")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_sized("--steps", type=int, full=64, quick=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help=output_help("inplace_decode-<device>.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                           tie_word_embeddings=True)).to(device, dtype).eval()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {device}, {dtype}, "
          f"{torch.get_num_threads()} CPU threads")
    rows = []
    for batch in args.batches:
        row = measure(model, batch, args.steps, device)
        rows.append(row)
        print(f"batch {batch:>3}: new state {row['new_state_ms']:.2f} ms/step | in place {row['in_place_ms']:.2f} "
              f"ms/step | ratio {row['ratio']:.3f}x | same states: {row['same_states']}")
    path = results_path(args.output, args.quick, Path(__file__).parent / "results" / f"inplace_decode-{device.type}.json")
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
                                "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
