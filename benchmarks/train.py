"""Training throughput and MFU: RetNet presets vs a matched HF Llama (SDPA), in the same run.

For each preset (``tiny``, ``small``) and sequence length (512, 2048) both models run a full training step
(forward, backward, AdamW step) on random tokens, RetNet with the loss ``retnet-train`` uses (from the hidden
states, without the logits), Llama with transformers' own; the steps alternate between the models so that noise on
a shared machine hits both. Llama is matched per layer: RetNet's q, k (2d²), v, gate (4d²), out (2d²) and
FFN (4d²) = 12d² = Llama's 4d² attention + 3·d·I with I = 8d/3; same hidden size, layers, heads and vocab.
The ratio is RetNet / Llama tokens/s (> 1: RetNet trains faster). MFU uses ``retnet.train.trainer``'s
FLOP count for RetNet and 6N + 12·L·d·T (nanoGPT's) for Llama, against ``--peak-flops`` or the GPU table.

    python benchmarks/train.py [--presets tiny small] [--seq-lens 512 2048] [--steps 5] [--quick] [--out PATH]
    # writes benchmarks/results/train-<device>.json (--quick writes only to an --out given)
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
from retnet.train.flops import flops_per_token, peak_flops


def build(preset: str, device: torch.device):
    # (here, after retnet's import: transformers imported first logs torchao's CUDA-extension warnings)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = RetNetConfig.from_preset(preset, fuse_linear_cross_entropy=True)  # as retnet-train trains it
    torch.manual_seed(0)
    ret = RetNetForCausalLM(config).to(device)
    d = config.hidden_size
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=d, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        intermediate_size=d * 8 // 3, tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=8192, attn_implementation="sdpa",
    )).to(device)
    return config, {"retnet": ret.train(), "llama": llama.train()}


def llama_flops_per_token(model, seq_len: int) -> float:
    config = model.config
    # parameters minus the input embedding (a lookup); when tied it is also the output head, counted once
    n = sum(p.numel() for p in model.parameters()) - (
        0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    return 6.0 * n + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def step_fn(model, optimizer, batch, device):
    def step() -> float:
        autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                        enabled=False)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step


def measure(preset: str, seq_len: int, batch: int, steps: int, device: torch.device, peak: float | None) -> list[dict]:
    config, models = build(preset, device)
    runners, times = {}, {name: [] for name in models}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        data = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
        runners[name] = step_fn(model, optimizer, data, device)
        runners[name]()  # warm-up (allocations, kernel selection)
    for _ in range(steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, model in models.items():
        seconds = statistics.median(times[name])
        tokens_per_s = batch * seq_len / seconds
        flops = flops_per_token(config, seq_len, device=device) if name == "retnet" else llama_flops_per_token(model, seq_len)
        rows.append({
            "preset": preset, "model": name, "seq_len": seq_len, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()), "step_s": seconds,
            "tokens_per_s": tokens_per_s, "flops_per_token": flops,
            "mfu": flops * tokens_per_s / peak if peak else None,
        })
    del models, runners
    return rows


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="2 timed steps of 2048 tokens; writes only to an --out given")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_sized("--tokens", type=int, full=8192, quick=2048, help="tokens per step (batch = tokens / seq_len)")
    parser.add_sized("--steps", type=int, full=5, quick=2, help="timed steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="per-device peak FLOP/s for MFU")
    parser.add_argument("--out", "--output", type=Path, metavar="PATH", help=output_help("train-<device>.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    peak = peak_flops(device, args.peak_flops)
    rows = []
    print(f"device {device}; tokens/step {args.tokens}; peak {peak or 'n/a'} FLOP/s")
    print(f"{'preset':<7} {'seq':>5} {'model':<7} {'params':>8} {'tok/s':>10} {'MFU':>7}")
    for preset in args.presets:
        for seq_len in args.seq_lens:
            batch = max(1, args.tokens // seq_len)
            pair = measure(preset, seq_len, batch, args.steps, device, peak)
            rows.extend(pair)
            for row in pair:
                mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
                print(f"{preset:<7} {seq_len:>5} {row['model']:<7} {row['params'] / 1e6:>7.1f}M "
                      f"{row['tokens_per_s']:>10,.0f} {mfu:>7}")
            print(f"{'':<7} {'':>5} ratio retnet/llama tokens/s: {pair[0]['tokens_per_s'] / pair[1]['tokens_per_s']:.2f}")
    path = results_path(args.out, args.quick, Path(__file__).resolve().parent / "results" / f"train-{device.type}.json",
                        flag="--out")
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": str(device), "tokens_per_step": args.tokens, "steps": args.steps,
                                "quick": args.quick, "peak_flops": peak, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
