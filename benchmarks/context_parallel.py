"""Context parallelism on CPU: one packed row split along time over C torchrun (gloo) ranks vs the whole row on one.

A random RetNet (hidden 256, 4 layers, 4 heads, vocab 4096, chunk 64, dropout 0, fp32, the fused loss head as
``retnet-train`` trains it) runs a training-mode forward + backward of one packed row of T random tokens, cut
into documents at random boundaries (``cu_seqlens``; one document is longer than a piece, so its state crosses
the cut). C = 1 is the baseline: the plain forward of the whole row (``labels=``, ``cu_seqlens=``). C = 2
splits the row with ``shard_sequences`` and runs ``model(**inputs, context_parallel=shard, ...)`` on each rank,
as ``tests/train/context_parallel_pieces_worker.py`` does. Every configuration is its own
``python -m torch.distributed.run`` launch (fresh processes, so one configuration's memory never shows in
another's), on the same total cores: ``OMP_NUM_THREADS`` = cores / C per rank (2 for C = 1, 1 a rank for C = 2
on a 2-core machine). A CPU has no second device to give the second rank, so the time ratio here measures what
the split costs at equal compute (ideal 1×); the memory ratio is what it buys.

Per configuration and rank:

- activation memory: the peak of torch's CPU allocations during the forward + backward above those live before
  it (activations and the parameters' gradients, which every rank holds whole), from the profiler's memory
  events (``torch.profiler.profile(profile_memory=True)``: every allocation and free of torch's CPU allocator,
  in order; summed, their running peak). Exact for torch tensors, blind to what oneDNN/OpenMP allocate
  themselves. It is taken on the warm-up pass (a later pass's peak was the same to the KiB). The peak resident
  set above the one before the pass (``ru_maxrss``) is recorded beside it as a cross-check; it is
  approximate, since glibc keeps freed memory for reuse and maps large blocks lazily. The ratio against C = 1
  has an ideal of the tokens' share / C + the gradients' (which do not split); the peak comes in the backward
  before the last gradients exist, so a measured ratio can dip just below it;
- time: the median of ``--repeats`` forward + backward passes after the warm-up (the ranks start each pass
  together behind a barrier; a pass lasts as long as its slowest rank). The load average before and after each
  launch is recorded: on a shared machine other work slows 2 OpenMP threads (C = 1) more than 1 a rank;
- the state exchange, computed: per layer the forward all-gathers a ``[C, B, H, K, V]`` fp32 tensor and the
  backward all-reduces one of the same size, so ``layers × C × B·H·K·V × 4`` bytes each way, whatever T is,
  shown beside the piece's own keys and values (what ring attention would pass round instead).

Before anything is written, the C = 2 pieces' losses (``num_items_in_batch`` = the whole row's targets) must sum
to the C = 1 loss to 1e-5 relative (``checks`` in the JSON); otherwise the script exits non-zero.

    python benchmarks/context_parallel.py [--quick] [--tokens 8192 32768] [--sizes 1 2] [--repeats 3]
    # writes benchmarks/results/context_parallel-cpu.json (--quick writes only to an --output given)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0], where benchmarks/kernels.py would shadow HuggingFace's
# `kernels` package (transformers probes for it): the repository root takes that place, before any import.
REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import retnet  # noqa: F401
from benchmarks._launch import threads_per_rank, torchrun, write_rank_result
from benchmarks._results import BenchmarkParser, output_help, results_path
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.context_parallel import shard_sequences

MODEL = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, chunk_size=64,
             dropout=0.0, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, fuse_linear_cross_entropy=True)
LOSS_RTOL = 1e-5
HOST_DEVICES = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)  # what the profiler counts as CPU memory


def build_model() -> RetNetForCausalLM:
    torch.manual_seed(0)  # every rank and every launch builds the same weights
    return RetNetForCausalLM(RetNetConfig(**MODEL)).train()


def build_row(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [1, T], labels [1, T], cu_seqlens [N + 1])``: random ids cut into documents at random places.
    A short document first, then one of 55-70% of T, so it runs across the middle (longer than a piece at C = 2,
    the state that crosses the cut is a live one), then documents of up to T/4 to the end."""
    generator = torch.Generator().manual_seed(tokens)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    lengths = [draw(tokens // 64, tokens // 8), draw(tokens * 55 // 100, tokens * 70 // 100)]
    while sum(lengths) < tokens:
        lengths.append(min(draw(tokens // 64, tokens // 4), tokens - sum(lengths)))
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    input_ids = torch.randint(2, MODEL["vocab_size"], (1, tokens), generator=generator)
    labels = input_ids.clone()
    labels[0, cu_seqlens[:-1].long()] = -100  # no document is predicted from the one before it
    return input_ids, labels, cu_seqlens


def state_bytes() -> int:
    """One layer's retention state ``[B=1, H, K, V]`` in fp32."""
    config = RetNetConfig(**MODEL)
    return config.num_attention_heads * config.head_dim * config.value_head_dim * 4


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _allocation_peak(prof) -> int:
    """The running peak of the profiled window's CPU allocations (frees of older blocks count down too)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        raise RuntimeError("the profiler recorded no memory events (profile_memory=True): cannot measure the peak")
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() in HOST_DEVICES:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------------------
# One rank of a torchrun launch
# ----------------------------------------------------------------------------------------------------------
def worker(args) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    # The collectives on a group of their own, as the trainer runs them beside DDP's.
    group = dist.new_group(list(range(size)))
    model = build_model()
    input_ids, labels, cu_seqlens = build_row(args.tokens[0])
    if size == 1:  # the baseline: the whole row, no context parallelism at all
        inputs, extra = {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu_seqlens}, {}
    else:
        inputs, shard, targets = shard_sequences(input_ids, labels, rank, size, cu_seqlens, group)
        extra = {"context_parallel": shard, "num_items_in_batch": targets}

    def step() -> float:
        loss = model(**inputs, **extra, use_cache=False).loss
        loss.backward()
        return float(loss.detach())

    dist.barrier()
    rss_before = _rss_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step()
    peak = _allocation_peak(prof)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before  # Linux reports KiB
    model.zero_grad(set_to_none=True)
    seconds = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    result = {"rank": rank, "size": size, "tokens": args.tokens[0], "piece": inputs["input_ids"].shape[1],
              "threads": torch.get_num_threads(), "loss": loss, "seconds": seconds,
              "activation_bytes": peak, "rss_peak_delta_bytes": max(rss_peak, 0),
              "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
              "documents": len(cu_seqlens) - 1}
    write_rank_result(args.out, rank, result)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------------------------------------
def launch(tokens: int, size: int, cores: int, repeats: int) -> list[dict]:
    """One torchrun launch of ``size`` ranks; returns the ranks' results."""
    threads = threads_per_rank(cores, size)
    return torchrun(__file__, size, threads, [f"--tokens={tokens}", f"--threads={threads}", f"--repeats={repeats}"],
                    what=f"T={tokens} C={size}", timeout=1200)


def summarize(ranks: list[dict]) -> dict:
    size = ranks[0]["size"]
    passes = [max(times) for times in zip(*(r["seconds"] for r in ranks), strict=True)]  # the slowest rank's
    layers, hidden = MODEL["num_hidden_layers"], MODEL["hidden_size"]
    config = RetNetConfig(**MODEL)
    piece = ranks[0]["piece"]
    kv_per_layer = piece * config.num_attention_heads * (config.head_dim + config.value_head_dim) * 4
    collective = layers * size * state_bytes() if size > 1 else 0
    return {
        "tokens": ranks[0]["tokens"], "size": size, "piece": piece, "threads_per_rank": ranks[0]["threads"],
        "documents": ranks[0]["documents"], "loss": sum(r["loss"] for r in ranks),
        "rank_losses": [r["loss"] for r in ranks], "median_s": statistics.median(passes), "seconds": passes,
        "activation_bytes_per_rank": max(r["activation_bytes"] for r in ranks),
        "activation_bytes_by_rank": [r["activation_bytes"] for r in ranks],
        "rss_peak_delta_bytes_by_rank": [r["rss_peak_delta_bytes"] for r in ranks],
        "grad_bytes": ranks[0]["grad_bytes"],
        # what each rank hands the collectives per step: the gathered states forward, their gradients backward
        "cp_forward_bytes": collective, "cp_backward_bytes": collective,
        "piece_hidden_bytes_per_layer": piece * hidden * 4, "piece_kv_bytes_per_layer": kv_per_layer,
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}" if n >= 2**20 else f"{n / 2**20:.2f}"


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help="T in 4096, 16384 (about 2 minutes on 2 idle cores); writes only to an "
                             "--output given")
    parser.add_argument("--output", type=Path, help=output_help("context_parallel-cpu.json"))
    parser.add_sized("--tokens", type=int, nargs="+", full=[8192, 32768], quick=[4096, 16384], help="row lengths T")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="context parallel sizes C (1 needed: "
                        "the baseline)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by a launch's ranks")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    tokens = args.tokens
    if 1 not in args.sizes:
        parser.error("--sizes needs 1: every ratio is against the whole row on one rank")
    for t in tokens:
        for c in args.sizes:
            if t % c:
                parser.error(f"T={t} does not split into {c} equal pieces")
    sizes = sorted(set(args.sizes))
    print(f"RetNet hidden {MODEL['hidden_size']} x {MODEL['num_hidden_layers']} layers, vocab {MODEL['vocab_size']}, "
          f"chunk {MODEL['chunk_size']}, fp32, CPU, {args.cores} cores per launch; T {tokens}, C {sizes}, "
          f"{args.repeats} timed passes", flush=True)

    rows = []
    for t in tokens:
        for c in sizes:
            started, load = time.perf_counter(), os.getloadavg()[0]
            row = summarize(launch(t, c, args.cores, args.repeats))
            # other work on a shared machine slows a launch unevenly (2 OpenMP threads more than 1): its trace
            row["load_before"], row["load_after"] = load, os.getloadavg()[0]
            rows.append(row)
            print(f"  T={t} C={c}: {row['median_s']:.2f} s a pass, activations "
                  f"{mib(row['activation_bytes_per_rank'])} MiB a rank, loss {row['loss']:.6f} "
                  f"({time.perf_counter() - started:.0f} s with the launch; load {load:.1f} -> "
                  f"{row['load_after']:.1f})", flush=True)

    checks, base = {}, {row["tokens"]: row for row in rows if row["size"] == 1}
    for row in rows:
        whole = base[row["tokens"]]
        row["time_vs_c1"] = row["median_s"] / whole["median_s"]
        row["activation_vs_c1"] = row["activation_bytes_per_rank"] / whole["activation_bytes_per_rank"]
        grads = whole["grad_bytes"]
        # the tokens' share splits C ways, the parameters' gradients do not
        row["activation_ideal_vs_c1"] = ((whole["activation_bytes_per_rank"] - grads) / row["size"] + grads) / \
            whole["activation_bytes_per_rank"]
        if row["size"] > 1:
            checks[f"loss_rel_diff_T{row['tokens']}_C{row['size']}"] = abs(row["loss"] - whole["loss"]) / abs(whole["loss"])

    print(f"\n{'T':>6} {'C':>2} {'s/pass':>7} {'time/C1':>8} {'act MiB/rank':>13} {'act/C1':>7} {'ideal':>6} "
          f"{'CP MiB fwd+bwd':>15} {'piece KV MiB':>13}")
    for row in rows:
        print(f"{row['tokens']:>6} {row['size']:>2} {row['median_s']:7.2f} {row['time_vs_c1']:7.2f}x "
              f"{mib(row['activation_bytes_per_rank']):>13} {row['activation_vs_c1']:6.2f}x "
              f"{row['activation_ideal_vs_c1']:5.2f}x {mib(row['cp_forward_bytes'] + row['cp_backward_bytes']):>15} "
              f"{mib(row['piece_kv_bytes_per_layer'] * MODEL['num_hidden_layers']):>13}")
    print("time/C1 < 1: faster than the whole row on one rank (same total cores); act/C1: activation memory a "
          "rank, ideal = the tokens' share / C + the whole gradients; CP MiB: what a rank hands the state "
          "all-gather (forward) and all-reduce (backward) per step; piece KV: the piece's keys and values over "
          "all layers, what ring attention would pass round instead")
    print("loss check (summed pieces vs whole row, relative): " +
          ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    if any(v > LOSS_RTOL for v in checks.values()):
        raise SystemExit(f"the pieces' summed loss is not the whole row's (relative difference {checks}, "
                         f"allowed {LOSS_RTOL}): context parallelism computed something else")

    report = {"device": "cpu", "quick": args.quick, "cores": args.cores, "torch": torch.__version__,
              "model": MODEL, "params": sum(p.numel() for p in build_model().parameters()),
              "state_bytes_per_layer": state_bytes(), "repeats": args.repeats,
              "memory": "peak of torch CPU allocations during forward+backward (profiler memory events) above "
                        "those live before it; rss_peak_delta_bytes: ru_maxrss above the RSS before, approximate",
              "checks": checks, "rows": rows}
    out = results_path(args.output, args.quick, REPO / "benchmarks" / "results" / "context_parallel-cpu.json")
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
