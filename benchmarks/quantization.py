"""Weight-only int8 (``--quantization int8``) against float32: weight memory, decode tokens/s, and the eval loss
it costs, both measured in the same run on the same weights.

The model: ``--model DIR`` (an export, e.g. ``runs/demo/export`` from ``make demo``), or by default a RetNet of
``--hidden`` / ``--layers`` with a byte-level BPE, trained here for ``--train-steps`` AdamW steps on the Python
standard library's sources (retnet-eval's default corpus) so that its predictions are not uniform: a random
model's loss says nothing about what rounding costs. The loss is retnet-eval's own scoring
(``retnet.train.evaluate``) on standard-library files the training never saw. Decode: a prefill of 64 tokens,
then ``--steps`` greedy recurrent steps at batch 1 and ``--batch``, steps alternating between the two models
so that load from other processes hits both alike; the median step. Ratios are int8 / float32.

    python benchmarks/quantization.py [--model DIR] [--hidden 768] [--layers 4] [--train-steps 150] [--quick] [--output PATH]
    # writes benchmarks/results/quantization-<device>.json (--quick writes only to an --output given)

Needs torchao (``pip install 'retnet-stack[quant]'``).
"""

from __future__ import annotations

import argparse
import json
import random
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
from retnet.model.quantization import quantize_model
from retnet.train.data import stdlib_files
from retnet.train.evaluate import encode, evaluate

PREFILL = 64


def build_trained(hidden: int, layers: int, steps: int, seq_len: int, batch: int, device: torch.device):
    """(model, tokenizer): a RetNet trained ``steps`` steps on the first standard-library files (the eval uses
    the last ones)."""
    from retnet.tokenization import train_byte_level_bpe

    files = stdlib_files()
    texts = [f.read_text(errors="replace") for f in files[: len(files) // 2]]
    tokenizer = train_byte_level_bpe(texts[:400], vocab_size=4096)
    stream = torch.tensor([t for ids in tokenizer(texts[:800])["input_ids"] for t in ids], dtype=torch.long)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 256), tie_word_embeddings=True,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = RetNetForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 20)  # a short warmup: AdamW's first steps at 2e-3 diverge
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
        ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).to(device)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"  train step {step:>4}: loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)")
    return model.eval(), tokenizer


def load_export(path: str, device: torch.device):
    from retnet.train.evaluate import load_model

    return load_model(path, device=str(device), dtype="float32")


def eval_documents(tokenizer, count: int, max_chars: int) -> list:
    files = stdlib_files()
    held_out = files[-count:]  # the training above read the first half
    return encode(tokenizer, [f.read_text(errors="replace")[:max_chars] for f in held_out])


@torch.inference_mode()
def decode_rates(models: dict, batch: int, steps: int, vocab: int, device: torch.device) -> dict[str, float]:
    """Tokens/s of each model's greedy recurrent steps at ``batch`` rows (median step), steps interleaved."""
    prompt = torch.randint(2, vocab, (batch, PREFILL), generator=torch.Generator().manual_seed(1)).to(device)
    running = {}
    for name, model in models.items():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        running[name] = (out.cache, out.logits[:, -1:].argmax(-1))
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            cache, token = running[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - began)
            running[name] = (out.cache, token)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="hidden 512, 30 training steps of 8 x 64 tokens, 16 eval documents, 16 decode "
                             "steps; writes only to an --output given")
    parser.add_argument("--model", default=None, help="an export to measure instead of training one here")
    parser.add_sized("--hidden", type=int, full=768, quick=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_sized("--train-steps", type=int, full=150, quick=30)
    parser.add_sized("--train-seq-len", type=int, full=128, quick=64)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_sized("--eval-documents", type=int, full=40, quick=16)
    parser.add_argument("--eval-chars", type=int, default=4000, help="each held-out file cut to this many characters")
    parser.add_sized("--steps", type=int, full=64, quick=16, help="decode steps timed per model and batch size")
    parser.add_argument("--batch", type=int, default=16, help="the larger decode batch (the other is 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help=output_help("quantization-<device>.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    random.seed(0)
    if args.model:
        fp32, tokenizer = load_export(args.model, device)
        source = args.model
    else:
        print(f"training a RetNet (hidden {args.hidden}, {args.layers} layers) for {args.train_steps} steps")
        fp32, tokenizer = build_trained(args.hidden, args.layers, args.train_steps, args.train_seq_len,
                                        args.train_batch, device)
        source = f"trained here: hidden {args.hidden}, {args.layers} layers, {args.train_steps} steps"
    int8 = RetNetForCausalLM(fp32.config).to(device).eval()
    int8.load_state_dict(fp32.state_dict())
    report = quantize_model(int8, "int8")
    params = sum(p.numel() for p in fp32.parameters())
    print(f"model: {source}; {params / 1e6:.1f}M parameters, vocab {fp32.config.vocab_size}")
    print(report)

    documents = eval_documents(tokenizer, args.eval_documents, args.eval_chars)
    losses = {name: evaluate(model, documents, segment_tokens=512, batch_size=4)
              for name, model in (("float32", fp32), ("int8", int8))}
    models = {"float32": fp32, "int8": int8}
    rates = {batch: decode_rates(models, batch, args.steps, fp32.config.vocab_size, device)
             for batch in (1, args.batch)}

    f, q = losses["float32"], losses["int8"]
    print(f"eval loss on {f.documents} held-out stdlib files ({f.tokens} tokens): float32 {f.loss:.4f}, int8 "
          f"{q.loss:.4f} (delta {q.loss - f.loss:+.4f} nats, perplexity {f.perplexity:.2f} -> {q.perplexity:.2f})")
    print(f"weights: decoder Linear {report.linear_bytes_before / 2**20:.1f} -> "
          f"{report.linear_bytes_after / 2**20:.1f} MiB ({report.linear_bytes_before / report.linear_bytes_after:.2f}x smaller); whole model "
          f"{report.model_bytes_before / 2**20:.1f} -> {report.model_bytes_after / 2**20:.1f} MiB "
          f"({report.model_bytes_before / report.model_bytes_after:.2f}x)")
    for batch, rate in rates.items():
        print(f"decode batch {batch:>3}: float32 {rate['float32']:.0f} tok/s, int8 {rate['int8']:.0f} tok/s "
              f"(ratio int8/float32 {rate['int8'] / rate['float32']:.2f}x)")

    path = results_path(args.output, args.quick, Path(__file__).parent / "results" / f"quantization-{device.type}.json")
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "device": str(device), "torch": torch.__version__, "model": source, "parameters": params,
        "quick": args.quick, "report": {k: getattr(report, k) for k in report.__slots__},
        "eval": {name: {"documents": r.documents, "tokens": r.tokens, "loss": r.loss, "perplexity": r.perplexity}
                 for name, r in losses.items()},
        "decode_tokens_per_s": {str(batch): rate for batch, rate in rates.items()},
    }, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
