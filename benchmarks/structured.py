"""Structured output's cost per decode step: the sampler over B rows held to a JSON schema against the same rows
sampling freely, in the same run (a byte-level BPE trained on the stdlib's sources, ~22k tokens; random logits,
so the grammar's states are those of real text of that schema). Reports the median step of each and the ratio,
and what compiling the schema costs (the first compile also wraps the tokenizer, once per server).

    python benchmarks/structured.py [--rows 1 8 32] [--steps 60] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where benchmarks/kernels.py would shadow HuggingFace's
# `kernels` package (transformers probes for it): the repository root takes that place, before any import.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from retnet.serve.sampling import RowSampler, SamplingParams, sample_step
from retnet.serve.structured import GrammarCompiler, requested_grammar

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "count": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "count", "tags"],
    "additionalProperties": False,
}


def step_times(rows: list[RowSampler], vocab: int, steps: int, seed: int) -> list[float]:
    """Seconds of each of ``steps`` sample_step calls; a row whose grammar ended starts a new document."""
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        logits = torch.randn(len(rows), vocab, generator=generator) * 3
        began = time.perf_counter()
        sample_step(logits, rows)
        times.append(time.perf_counter() - began)
        for row in rows:
            if row.grammar is not None and row.grammar.ended:
                row.grammar.matcher.reset()
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (rows per step)")
    parser.add_argument("--steps", type=int, default=60, help="steps timed per batch size and variant")
    parser.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary asked for (the stdlib gives less)")
    parser.add_argument("--out", type=Path, default=RESULTS / "structured-cpu.json")
    args = parser.parse_args(argv)

    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.data import stdlib_files

    tokenizer = train_byte_level_bpe([f.read_text(errors="replace") for f in stdlib_files()[:400]],
                                     vocab_size=args.vocab)
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, {tokenizer.eos_token_id})
    began = time.perf_counter()
    grammar = compiler.compile(*requested_grammar({"guided_json": SCHEMA}))
    first_compile = time.perf_counter() - began
    began = time.perf_counter()
    compiler.compile(*requested_grammar({"guided_json": SCHEMA}))
    compile_s = time.perf_counter() - began
    print(f"vocab {vocab}: first compile {first_compile * 1e3:.1f} ms (wraps the tokenizer), then "
          f"{compile_s * 1e3:.2f} ms")
    rows_out = []
    for count in args.rows:
        medians = {}
        for repeat in range(2):  # alternated: the shared machine's noise falls on both variants
            for variant in ("free", "json"):
                rows = [RowSampler(SamplingParams(temperature=1.0, seed=i), [], vocab,
                                   grammar=grammar.matcher() if variant == "json" else None) for i in range(count)]
                times = step_times(rows, vocab, args.steps, seed=repeat)
                medians.setdefault(variant, []).append(statistics.median(times) * 1e3)
        free, constrained = min(medians["free"]), min(medians["json"])
        rows_out.append(dict(rows=count, free_ms=free, json_ms=constrained, ratio=constrained / free,
                             added_ms_per_row=(constrained - free) / count))
        print(f"{count:3d} rows: free {free:.2f} ms/step, JSON schema {constrained:.2f} ms/step "
              f"({constrained / free:.2f}x, +{(constrained - free) / count:.3f} ms a row)")
    result = dict(vocab=vocab, first_compile_ms=first_compile * 1e3, compile_ms=compile_s * 1e3, rows=rows_out,
                  torch=torch.__version__, python=platform.python_version())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
