"""Tensor parallelism on CPU: one training step of a RetNet split over TP torchrun (gloo) ranks vs whole on one.

A random RetNet (default hidden 512, 4 layers, 8 heads, vocab 32768, GLU FFN with SiLU, tied embeddings, dropout 0,
fp32, the fused loss head) trains on B × T random tokens: forward, backward, ``AdamW(foreach=False).step()`` (the
for-loop path: a split model mixes DTensor and plain parameters), gradients set to None. The vocabulary is 32768 so
that the tied embedding / LM head is what it is in a small real model, about half the parameters. TP = 1, the
baseline, is the plain model in one process; TP = 2 runs ``parallelize_retnet`` on each rank (the layers split,
the embedding / LM head whole on every rank), and "TP = 2 vocab" ``parallelize_retnet(..., vocab_parallel=True)``
(the embedding / LM head split by vocabulary rows too), and "TP = 2 vocab+seq" with ``sequence_parallel=True`` as
well (the residual stream and the norms between the blocks split along time); every rank is fed the same tokens. Each configuration is its
own ``python -m torch.distributed.run`` launch (``benchmarks/_launch.py``) on the same total cores
(``OMP_NUM_THREADS`` = cores / TP a rank): with no second device for the second rank, the time ratio is what the
split costs at equal compute (ideal 1×); the memory ratios are what it buys. Per configuration and rank:

- parameters, gradients, AdamW's ``exp_avg``/``exp_avg_sq``: the bytes of the rank's tensors (a split weight's
  local shard; the norms, and unless vocab-parallel the embedding / LM head, whole on every rank), beside the
  ratio expected from the whole model's shapes (``param_bytes_expected``);
- activation memory: the peak of torch's CPU allocations during the first forward + backward above those live
  before it (gradients included as they appear), from the profiler's memory events, as
  ``benchmarks/context_parallel.py`` measures it (its ``_allocation_peak``);
- collectives, measured on that first step: a ``TorchDispatchMode`` logs every ``_c10d_functional`` op (DTensor's
  redistributions, ``from_local``'s backward, the fused loss's all-gathers) by kind (``all_reduce``,
  ``all_gather_into_tensor``, ...) with the bytes a rank hands it, forward, backward and AdamW step apart; the
  design's count is recorded beside it (``collectives_expected``: Megatron's 2 all-reduces of ``[B, T, hidden]``
  fp32 a layer each way; vocab-parallel adds the embedding's and the loss's hidden-gradient all-reduces and one
  ``[1, 2, n]`` all-gather per loss chunk of n tokens, all in the forward);
- time: the median of ``--repeats`` steps after that one (started together behind a barrier; a step lasts as long
  as its slowest rank), with the load average around each launch.

The split runs' first-step losses must equal the whole run's, and every rank's its first rank's, to 1e-5 relative
(``checks``; later steps' differences recorded too), or the script exits non-zero before writing anything.

    python benchmarks/tensor_parallel.py [--quick] [--hidden 512 --layers 4 --heads 8 --vocab 32768]
        [--batch 4 --seq 512] [--sizes 1 2] [--vocab-parallel 2] [--sequence-parallel 2] [--repeats 3]
        [--output PATH]
    # writes benchmarks/results/tensor_parallel-cpu.json (--quick writes only to an --output given)
"""

from __future__ import annotations

import argparse
import json
import os
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import retnet  # noqa: F401
from benchmarks._launch import threads_per_rank, torchrun, write_rank_result
from benchmarks._results import BenchmarkParser, output_help, results_path
from benchmarks.context_parallel import _allocation_peak, mib
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.loss import _chunk_tokens
from retnet.model.tensor_parallel import (
    COLUMN_PARALLEL,
    ROW_PARALLEL,
    parallelize_retnet,
    vocab_split_problem,
)

LOSS_RTOL = 1e-5
DEFAULT = dict(hidden=512, layers=4, heads=8, vocab=32768, batch=4, seq=512)
QUICK = dict(hidden=128, layers=2, heads=4, vocab=1024, batch=2, seq=384)


def model_config(spec: dict) -> dict:
    return dict(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                num_attention_heads=spec["heads"], ffn_glu=True, hidden_act="silu", dropout=0.0,
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, fuse_linear_cross_entropy=True)


class CollectiveBytes(TorchDispatchMode):
    """Logs ``(name, bytes this rank hands it)`` for every functional collective run while active. DTensor's own
    dispatch runs first; its collectives come back here on plain tensors."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(kind, DTensor) for kind in types):
            return NotImplemented
        if func.namespace == "_c10d_functional" and not func.__name__.startswith(("wait_tensor", "_wrap")):
            self.log.append((func.__name__.split(".")[0], sum(t.nbytes for t in tree_leaves(args)
                                                              if isinstance(t, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def tally(log: list[tuple[str, int]]) -> dict[str, list[int]]:
    """``{name: [calls, bytes]}`` of a stretch of :class:`CollectiveBytes`' log."""
    return {name: [sum(n == name for n, _ in log), sum(b for n, b in log if n == name)] for name in dict(log)}


def local_bytes(tensors) -> int:
    """Bytes of the tensors as this rank holds them (a DTensor's local shard)."""
    with torch.no_grad():
        return sum(t.to_local().nbytes if isinstance(t, DTensor) else t.nbytes for t in tensors)


def label(size: int, vocab_parallel: bool, sequence_parallel: bool = False) -> str:
    return f"TP={size}" + (" vocab" if vocab_parallel else "") + ("+seq" if sequence_parallel else "")


def expected_param_bytes(model: torch.nn.Module, size: int, vocab_parallel: bool) -> int:
    """The largest rank's parameter bytes, from the whole model's shapes: the layers' column-parallel weights (and
    biases), row-parallel weights and head norms ``1 / size`` each; with ``vocab_parallel`` the embedding / LM head
    (a tied pair once) ``ceil(vocab / size)`` rows; everything else whole."""
    split = (*(f".{path}.{kind}" for path in COLUMN_PARALLEL for kind in ("weight", "bias")),
             *(f".{path}.weight" for path in ROW_PARALLEL), ".retention.head_norm.weight")
    total = 0
    for name, param in model.named_parameters():  # a tied weight once
        if size > 1 and ".layers." in name and name.endswith(split):
            total += param.nbytes // size  # heads and intermediate_size divide by size (checked)
        elif size > 1 and vocab_parallel and name in ("model.embed_tokens.weight", "lm_head.weight"):
            total += -(-param.shape[0] // size) * param[0].nbytes
        else:
            total += param.nbytes
    return total


def expected_collectives(spec: dict, size: int, vocab_parallel: bool,
                          sequence_parallel: bool = False) -> dict[str, dict[str, list[int]]]:
    """``{phase: {kind: [calls, bytes a rank hands them]}}`` a step, from the design: Megatron's two
    ``[B, T, hidden]`` fp32 all-reduces a layer each way; with ``vocab_parallel`` the embedding's lookup and the
    fused loss's hidden-state gradient all-reduced once each in the forward, and the loss's ``[1, 2, n]`` fp32
    (log-sum-exp, target logit) all-gathered once per chunk of ``n`` tokens (256 MiB of a rank's fp32 logits).
    With ``sequence_parallel`` each layer's all-reduces become an all-gather of a rank's ``T / TP`` tokens before each
    block and a reduce-scatter after it (and the reverse backward), the final norm's output is gathered (its
    backward a slice) and the first layer's cut is all-gathered backward; each block's input, kept sharded for the
    backward, is all-gathered again there (one more a block); each norm's parameters (LayerNorm: weight and bias)
    get a ``[hidden]`` fp32 all-reduce backward."""
    phases: dict[str, dict[str, list[int]]] = {"forward": {}, "backward": {}, "adamw_step": {}}
    if size == 1:
        return phases
    tokens, layers = spec["batch"] * spec["seq"], spec["layers"]
    stream = tokens * spec["hidden"] * 4
    forward_reduces = (0 if sequence_parallel else 2 * layers) + (2 if vocab_parallel else 0)
    if forward_reduces:
        phases["forward"]["all_reduce"] = [forward_reduces, forward_reduces * stream]
    if sequence_parallel:
        gathers, scatters = 2 * layers + 1, 2 * layers
        for phase, more in (("forward", 0), ("backward", 2 * layers)):
            phases[phase]["all_gather_into_tensor"] = [gathers + more, (gathers + more) * stream // size]
            phases[phase]["reduce_scatter_tensor"] = [scatters, scatters * stream]
    if vocab_parallel:
        rows = -(-spec["vocab"] // size)  # the loss sizes its chunks by a rank's rows (rank 0's, the most)
        chunks = -(-tokens // _chunk_tokens(rows))
        gathered = phases["forward"].setdefault("all_gather_into_tensor", [0, 0])
        gathered[0] += chunks
        gathered[1] += 2 * tokens * 4
    if sequence_parallel:
        norm_params = (2 * layers + 1) * 2  # LayerNorm's weight and bias
        phases["backward"]["all_reduce"] = [norm_params, norm_params * spec["hidden"] * 4]
    else:
        phases["backward"]["all_reduce"] = [2 * layers, 2 * layers * stream]
    return phases


def worker(spec: dict, out: Path) -> None:
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # every rank and every launch builds the same weights
    model = RetNetForCausalLM(RetNetConfig(**model_config(spec))).train()
    if size > 1:  # TP = 1 is the plain model: no DTensor anywhere
        parallelize_retnet(model, init_device_mesh("cpu", (size,), mesh_dim_names=("tp",))["tp"],
                           vocab_parallel=spec["vocab_parallel"], sequence_parallel=spec["sequence_parallel"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    input_ids = torch.randint(2, spec["vocab"], (spec["batch"], spec["seq"]),
                              generator=torch.Generator().manual_seed(1))
    param_bytes = local_bytes(model.parameters())

    counter, marks = CollectiveBytes(), [0]
    dist.barrier()
    with counter:  # the first step: memory and collectives (the profiler and the mode slow it: not timed)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            marks.append(len(counter.log))
            loss.backward()
        marks.append(len(counter.log))
        grad_bytes = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
    marks.append(len(counter.log))
    optimizer.zero_grad(set_to_none=True)
    collectives = {phase: tally(counter.log[start:end])
                   for phase, start, end in zip(("forward", "backward", "adamw_step"), marks, marks[1:])}
    state_bytes = local_bytes(t for state in optimizer.state.values() for t in state.values()
                              if isinstance(t, torch.Tensor) and t.dim() > 0)  # not the scalar `step`
    losses, seconds = [float(loss.detach())], []
    for _ in range(spec["repeats"]):
        dist.barrier()
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    result = {"size": size, "threads": torch.get_num_threads(), "losses": losses, "seconds": seconds,
              "param_bytes": param_bytes, "grad_bytes": grad_bytes, "adamw_state_bytes": state_bytes,
              "activation_bytes": _allocation_peak(prof), "collectives": collectives}
    write_rank_result(out, rank, result)
    dist.destroy_process_group()


def launch(spec: dict, size: int, vocab_parallel: bool, sequence_parallel: bool, cores: int) -> list[dict]:
    """One torchrun launch of ``size`` ranks; returns the ranks' results."""
    threads = threads_per_rank(cores, size)
    worker_spec = dict(spec, threads=threads, vocab_parallel=vocab_parallel, sequence_parallel=sequence_parallel)
    return torchrun(__file__, size, threads, [f"--spec={json.dumps(worker_spec)}"],
                    what=label(size, vocab_parallel, sequence_parallel), timeout=1800)


def summarize(ranks: list[dict], spec: dict, vocab_parallel: bool, sequence_parallel: bool,
              expected_params: int) -> dict:
    size = ranks[0]["size"]
    steps = [max(times) for times in zip(*(r["seconds"] for r in ranks), strict=True)]  # the slowest rank's
    row = {"config": label(size, vocab_parallel, sequence_parallel), "size": size, "vocab_parallel": vocab_parallel,
           "sequence_parallel": sequence_parallel,
           "threads_per_rank": ranks[0]["threads"], "median_s": statistics.median(steps), "seconds": steps,
           "losses": ranks[0]["losses"], "rank_losses": [r["losses"] for r in ranks],
           # every kind of _c10d_functional collective, {phase: {kind: [calls, bytes a rank hands them]}}
           "collectives": ranks[0]["collectives"], "collectives_by_rank": [r["collectives"] for r in ranks],
           "collectives_expected": expected_collectives(spec, size, vocab_parallel, sequence_parallel)}
    row["collectives_as_expected"] = all(r["collectives"] == row["collectives_expected"] for r in ranks)
    for key in ("param_bytes", "grad_bytes", "adamw_state_bytes", "activation_bytes"):
        row[f"{key}_by_rank"] = [r[key] for r in ranks]
        row[key] = max(row[f"{key}_by_rank"])
    row["param_bytes_expected"] = expected_params
    return row


def human(n: int) -> str:
    return f"{mib(n)} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def describe(phases: dict[str, dict[str, list[int]]]) -> str:
    parts = [f"{phase} " + ", ".join(f"{kind} {calls}x {human(nbytes)}" for kind, (calls, nbytes) in kinds.items())
             for phase, kinds in phases.items() if kinds]
    return "; ".join(parts) or "none"


def build_parser() -> BenchmarkParser:
    parser = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             quick_help=f"tiny sizes (hidden 128, 2 layers, 4 heads, vocab {QUICK['vocab']}, 2 x 384 "
                             "tokens; under a minute on 2 cores); writes only to an --output given")
    for name, what in (("hidden", "hidden size"), ("layers", "decoder layers"), ("heads", "retention heads"),
                       ("vocab", "vocabulary size"), ("batch", "rows a step"), ("seq", "tokens a row")):
        parser.add_sized(f"--{name}", type=int, full=DEFAULT[name], quick=QUICK[name], help=what)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="tensor parallel sizes TP (1 needed: "
                        "the baseline)")
    parser.add_argument("--vocab-parallel", type=int, nargs="*", default=[2], metavar="TP",
                        help="TP sizes (> 1) also run with vocab_parallel=True (default 2; none: the flag alone)")
    parser.add_argument("--sequence-parallel", type=int, nargs="*", default=[2], metavar="TP",
                        help="TP sizes (> 1) also run with vocab_parallel=True and sequence_parallel=True (default 2; "
                             "none: the flag alone)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by a launch's ranks")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--output", type=Path, help=output_help("tensor_parallel-cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.spec), Path(args.out))
        return
    spec = {name: getattr(args, name) for name in DEFAULT} | {"repeats": args.repeats}
    if 1 not in args.sizes:
        parser.error("--sizes needs 1: every ratio is against the whole model in one process")
    configs = [(tp, False, False) for tp in sorted(set(args.sizes))]
    configs += [(tp, True, False) for tp in sorted(set(args.vocab_parallel))]
    configs += [(tp, True, True) for tp in sorted(set(args.sequence_parallel))]
    config = RetNetConfig(**model_config(spec))  # validates the sizes before any launch
    for tp, vocab_parallel, _ in configs:
        for field in ("num_attention_heads", "intermediate_size"):
            if getattr(config, field) % tp:
                parser.error(f"TP={tp} does not divide {field}={getattr(config, field)}")
        if vocab_parallel and (tp < 2 or vocab_split_problem(spec["vocab"], tp)):
            parser.error(f"--vocab-parallel {tp}: needs TP > 1 and a vocabulary of {spec['vocab']} that leaves "
                         f"every rank rows")
    whole_model = RetNetForCausalLM(config)
    params = sum(p.numel() for p in whole_model.parameters())
    vocab_params = whole_model.get_input_embeddings().weight.numel()
    print(f"RetNet {spec} (GLU FFN {config.intermediate_size}, fp32, {params / 1e6:.1f}M parameters, "
          f"{vocab_params / 1e6:.1f}M of them the tied embedding / LM head); CPU, {args.cores} cores a launch; "
          f"{', '.join(label(*c) for c in configs)}", flush=True)

    rows = []
    for tp, vocab_parallel, sequence_parallel in configs:
        started, load = time.perf_counter(), os.getloadavg()[0]
        row = summarize(launch(spec, tp, vocab_parallel, sequence_parallel, args.cores), spec, vocab_parallel,
                        sequence_parallel, expected_param_bytes(whole_model, tp, vocab_parallel))
        row["load_before"], row["load_after"] = load, os.getloadavg()[0]
        rows.append(row)
        print(f"  {row['config']}: {row['median_s']:.2f} s a step, loss {row['losses'][0]:.6f} "
              f"({time.perf_counter() - started:.0f} s with the launch; load {load:.1f} -> {row['load_after']:.1f})",
              flush=True)

    whole, checks = rows[0], {}
    for row in rows:
        for key in ("median_s", "param_bytes", "grad_bytes", "activation_bytes"):
            row[f"{key}_vs_tp1"] = row[key] / whole[key]
        row["param_bytes_expected_vs_tp1"] = row["param_bytes_expected"] / whole["param_bytes_expected"]
        row["grad_adamw_vs_tp1"] = ((row["grad_bytes"] + row["adamw_state_bytes"]) /
                                    (whole["grad_bytes"] + whole["adamw_state_bytes"]))
        row["loss_rel_diff_by_step"] = [abs(a - b) / abs(b) for a, b in zip(row["losses"], whole["losses"], strict=True)]
        if row["size"] > 1:  # every rank computes the whole loss: they agree with each other and with TP = 1
            name = (f"TP{row['size']}" + ("_vocab_parallel" if row["vocab_parallel"] else "")
                    + ("_sequence_parallel" if row["sequence_parallel"] else ""))
            checks[f"loss_rel_diff_{name}"] = row["loss_rel_diff_by_step"][0]
            checks[f"loss_spread_over_ranks_{name}"] = max(abs(a - b) / abs(b) for losses in row["rank_losses"]
                                                          for a, b in zip(losses, row["losses"], strict=True))

    print(f"\n{'config':>10} {'s/step':>7} {'time/TP1':>9} {'params MiB/rank':>16} {'x':>6} {'expected':>9} "
          f"{'grad+AdamW MiB/rank':>20} {'x':>6} {'act MiB/rank':>13} {'x':>6} {'loss rel':>8}")
    for row in rows:
        print(f"{row['config']:>10} {row['median_s']:7.2f} {row['median_s_vs_tp1']:8.2f}x {mib(row['param_bytes']):>16} "
              f"{row['param_bytes_vs_tp1']:5.3f}x {row['param_bytes_expected_vs_tp1']:8.3f}x "
              f"{mib(row['grad_bytes'] + row['adamw_state_bytes']):>20} {row['grad_adamw_vs_tp1']:5.3f}x "
              f"{mib(row['activation_bytes']):>13} {row['activation_bytes_vs_tp1']:5.3f}x "
              f"{row['loss_rel_diff_by_step'][0]:8.1e}")
    print("collectives a rank, first step (kind, calls, bytes it hands them):")
    for row in rows:
        verdict = "as expected" if row["collectives_as_expected"] else f"EXPECTED {describe(row['collectives_expected'])}"
        print(f"  {row['config']}: {describe(row['collectives'])} ({verdict})")
    print("time/TP1 < 1: faster than the whole model in one process (same total cores); MiB/rank: the largest rank's "
          "(local shards; norms whole, and the tied embedding / LM head unless vocab); expected: the parameter ratio "
          "from the shapes; act: peak of torch CPU allocations in forward+backward; loss rel: first step vs TP=1\n"
          "loss checks: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()) + "; every step: "
          + ", ".join(f"{r['config']} {max(r['loss_rel_diff_by_step']):.1e}" for r in rows if r["size"] > 1))
    if any(v > LOSS_RTOL for v in checks.values()):
        raise SystemExit(f"the split run's loss is not the whole run's ({checks}, allowed {LOSS_RTOL} relative): "
                         f"tensor parallelism computed something else")

    out = results_path(args.output, args.quick, REPO / "benchmarks" / "results" / "tensor_parallel-cpu.json")
    if out is None:
        return
    report = {"device": "cpu", "quick": args.quick, "cores": args.cores, "torch": torch.__version__,
              "spec": spec, "model": model_config(spec), "params": params, "vocab_params": vocab_params,
              "repeats": args.repeats,
              "memory": "params, grads, AdamW state: the rank's local tensors; activation: peak of torch CPU allocations "
                        "in the first forward+backward (profiler memory events) above those live before it; "
                        "param_bytes_expected: the largest rank's, from the whole model's shapes",
              "collectives": "every _c10d_functional op under a TorchDispatchMode on the first step, by phase and kind: "
                             "[calls, bytes of its input tensors]; collectives_expected: the design's count",
              "checks": checks, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
