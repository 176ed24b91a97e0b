"""Embedding throughput of the pooling engine: packed ``cu_seqlens`` forwards vs one forward an input vs padded batches.

Everything runs in one process, on one random RetNet (saved with a BPE tokenizer, loaded as ``--convert embed``
loads it), with the same inputs of mixed lengths (text of the standard library, cut to ``--min-tokens`` ..
``--max-tokens`` tokens):

- ``packed``: the server's :class:`~retnet.serve.pooling.PoolingEngine` on its own thread, every input sent as a
  request of its own, all at once (asyncio): the engine packs the waiting inputs into forwards of at most
  ``--prefill-token-budget`` tokens;
- ``one_by_one``: the baseline, each input alone through the backbone (batch 1), as a plain loop embeds;
- ``padded``: HF-style batches, right-padded with an ``attention_mask``, the same inputs in the same groups the
  budget packs them into (so the same batch sizes), each input's row read at its last real token.

Each repeat runs the three in turn (so load from other processes on a shared machine hits all alike); the median
over repeats is reported, as inputs/s and real tokens/s, with the ratios packed / one_by_one and packed / padded
(> 1: packing faster). Before timing, every path's embeddings are checked against one_by_one's (``checks``).

    python benchmarks/pooling.py [--quick] [--inputs 64] [--repeats 3] [--out PATH]
    # writes benchmarks/results/pooling-<device>.json (--quick writes only to an --out given)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where benchmarks/kernels.py would shadow HuggingFace's
# `kernels` package (transformers probes for it): the repository root takes that place, before any import.
REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import torch

import retnet  # noqa: F401
from benchmarks._results import BenchmarkParser, output_help, results_path
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.serve.metrics import ServeMetrics
from retnet.serve.pooling import PoolingEngine
from retnet.serve.settings import ServeSettings
from retnet.tokenization import train_byte_level_bpe


def build_model(out: Path, hidden: int, layers: int, vocab: int):
    """A RetNet (random weights) and a BPE tokenizer trained on the standard library, saved as the trainer
    exports them; returns the tokenizer and the parameter count."""
    texts = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60]]
    tokenizer = train_byte_level_bpe(texts, vocab_size=vocab)
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return tokenizer, sum(p.numel() for p in model.base_model.parameters())


def make_inputs(tokenizer, count: int, low: int, high: int) -> list[list[int]]:
    """``count`` token-id lists of uniformly drawn lengths in [low, high], cut from standard-library source."""
    text = "".join(p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[60:90])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    inputs = []
    for _ in range(count):
        length = rng.randint(low, high)
        start = rng.randrange(0, len(ids) - length)
        inputs.append(ids[start:start + length])
    return inputs


def budget_groups(inputs: list[list[int]], budget: int) -> list[list[list[int]]]:
    """The inputs in order, grouped as the engine's ``_next_batch`` groups a full queue: up to ``budget`` tokens a
    group (an input over it alone)."""
    groups, tokens = [[]], 0
    for ids in inputs:
        if groups[-1] and tokens + len(ids) > budget:
            groups.append([])
            tokens = 0
        groups[-1].append(ids)
        tokens += len(ids)
    return groups


# ----------------------------------------------------------------------------------------------------------
# The three paths; each returns the rows [N, hidden] (fp32, unnormalized, LAST pooling) in input order
# ----------------------------------------------------------------------------------------------------------
class CountingEngine(PoolingEngine):
    """The server's engine, counting the packed forwards it runs."""

    forwards = 0

    def _forward(self, batch) -> None:
        self.forwards += 1
        super()._forward(batch)


class Packed:
    """The server's engine on its own thread, loaded from ``model_dir`` as ``--convert embed`` loads it."""

    def __init__(self, model_dir: Path, budget: int, requests: int):
        settings = ServeSettings(model=str(model_dir), convert="embed", prefill_token_budget=budget,
                                 max_queue=max(256, requests), max_prompt_tokens=65536)
        self.engine = CountingEngine(settings, ServeMetrics())
        self.engine.start()
        if not self.engine.wait_ready(180):
            raise RuntimeError(f"the pooling engine did not start: {self.engine.dead}")

    @property
    def forwards(self) -> int:
        return self.engine.forwards

    def __call__(self, inputs: list[list[int]]) -> torch.Tensor:
        async def send_all():
            # One request an input, all waiting together: what concurrent clients of /v1/embeddings give it.
            rows = await asyncio.gather(*(self.engine.score([ids]) for ids in inputs))
            return torch.stack([row[0] for row in rows])

        return asyncio.run(send_all())

    def close(self) -> None:
        self.engine.shutdown()


@torch.inference_mode()
def one_by_one(model, inputs: list[list[int]]) -> torch.Tensor:
    return torch.stack([model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, -1].float()
                        for ids in inputs]).cpu()  # (.cpu(): on a GPU, the wait for the last forward)


@torch.inference_mode()
def padded(model, groups: list[list[list[int]]], pad_id: int) -> torch.Tensor:
    rows = []
    for group in groups:
        width = max(map(len, group))
        ids = torch.tensor([g + [pad_id] * (width - len(g)) for g in group])
        mask = torch.tensor([[1] * len(g) + [0] * (width - len(g)) for g in group])
        hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
        rows.append(hidden[torch.arange(len(group)), mask.sum(-1) - 1])
    return torch.cat(rows).cpu()


def timed(run) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    rows = run()
    return time.perf_counter() - start, rows


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="hidden 256 x 4 layers, 64 inputs, 5 repeats (CPU, under a minute); writes "
                             "only to an --out given")
    parser.add_sized("--inputs", type=int, full=256, quick=64, help="inputs a round")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--prefill-token-budget", type=int, default=2048, help="the engine's (the server's default)")
    parser.add_sized("--repeats", type=int, full=3, quick=5, help="rounds of the three paths")
    parser.add_argument("--out", "--output", type=Path, metavar="PATH", help=output_help("pooling-<device>.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModel  # (after retnet's import: see decode.py's build_models)

    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error(f"--min-tokens and --max-tokens must satisfy 1 <= min <= max; got {args.min_tokens} and "
                     f"{args.max_tokens}")
    device = "cpu"  # the engine picks its own device (cuda when there is one); the baselines run beside it
    hidden, layers, vocab = (256, 4, 2048) if args.quick else (512, 6, 8192)
    count, repeats = args.inputs, args.repeats

    tmp = Path(tempfile.mkdtemp(prefix="retnet-pooling-bench-"))
    tokenizer, params = build_model(tmp, hidden, layers, vocab)
    inputs = make_inputs(tokenizer, count, args.min_tokens, args.max_tokens)
    tokens = sum(map(len, inputs))
    groups = budget_groups(inputs, args.prefill_token_budget)
    packed = Packed(tmp, args.prefill_token_budget, count)
    device = str(packed.engine.device)
    backbone = AutoModel.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
    padded_tokens = sum(len(g) * max(map(len, g)) for g in groups)
    print(f"RetNet backbone {params / 1e6:.1f}M parameters (hidden {hidden} x {layers} layers) on {device}; "
          f"{count} inputs of {args.min_tokens}-{args.max_tokens} tokens ({tokens} tokens; padded batches of "
          f"{min(map(len, groups))}-{max(map(len, groups))} inputs hold {padded_tokens}), budget "
          f"{args.prefill_token_budget}", flush=True)

    paths = {"packed": lambda: packed(inputs), "one_by_one": lambda: one_by_one(backbone, inputs),
             "padded": lambda: padded(backbone, groups, tokenizer.pad_token_id)}
    try:
        # Warm-up, and the check that every path computes the same embeddings as one_by_one.
        reference = paths["one_by_one"]().cpu()
        checks = {name: float((run().cpu() - reference).abs().max() / reference.abs().max())
                  for name, run in paths.items() if name != "one_by_one"}
        print("max relative difference from one_by_one: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
        if max(checks.values()) > 1e-3:
            raise SystemExit(f"the paths disagree (relative difference {checks}): a ratio would compare different "
                             "computations")
        seconds = {name: [] for name in paths}
        forwards_before = packed.forwards
        for repeat in range(repeats):
            for name, run in paths.items():
                seconds[name].append(timed(run)[0])
            print(f"  round {repeat + 1}: " + "  ".join(f"{name} {seconds[name][-1] * 1e3:7.1f} ms" for name in paths),
                  flush=True)
        packed_forwards = (packed.forwards - forwards_before) / repeats
    finally:
        packed.close()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        rows[name] = {"path": name, "median_s": median, "seconds": values, "inputs_per_s": count / median,
                      "tokens_per_s": tokens / median}
    rows["packed"]["forwards_per_round"] = packed_forwards
    rows["one_by_one"]["forwards_per_round"] = count
    rows["padded"]["forwards_per_round"] = len(groups)
    ratios = {"packed_vs_one_by_one": rows["one_by_one"]["median_s"] / rows["packed"]["median_s"],
              "packed_vs_padded": rows["padded"]["median_s"] / rows["packed"]["median_s"]}
    print(f"\n{'path':11s} {'inputs/s':>9s} {'tokens/s':>9s} {'forwards':>9s}")
    for row in rows.values():
        print(f"{row['path']:11s} {row['inputs_per_s']:9.1f} {row['tokens_per_s']:9.0f} {row['forwards_per_round']:9.1f}")
    print(f"ratios (> 1: packed faster): packed / one_by_one x{ratios['packed_vs_one_by_one']:.2f}, "
          f"packed / padded x{ratios['packed_vs_padded']:.2f}")

    report = {"device": device, "quick": args.quick, "threads": torch.get_num_threads(), "params": params,
              "model": {"hidden": hidden, "layers": layers, "vocab": vocab}, "pooling": "LAST",
              "inputs": count, "tokens": tokens, "padded_tokens": padded_tokens,
              "lengths": [args.min_tokens, args.max_tokens], "prefill_token_budget": args.prefill_token_budget,
              "repeats": repeats, "checks": checks, "rows": list(rows.values()), "ratios": ratios}
    out = results_path(args.out, args.quick, REPO / "benchmarks" / "results" / f"pooling-{device.split(':')[0]}.json",
                       flag="--out")
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
