"""A torchrun worker of test_context_parallel_grpo_paths.py's 4-rank launch: tests/model/context_parallel_cases.py's
rows split along time (each ``[name, pieces]`` of the plan's ``cases`` on the first ``pieces`` ranks, a gloo group
of their own, its pieces run forward and backward and saved to ``cases_out/rank{R}.pt`` for the test to compare with
the whole row in one process), then the plan's ``retnet-train`` runs as runs_worker.py runs them, in the same
processes: a rank's start (importing torch and transformers) costs far more than the cases, so the cases ride on a
launch the module starts anyway rather than on one of their own.

    torchrun --nproc_per_node=N tests/train/context_parallel_pieces_worker.py PLAN.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "model")]

import runs_worker  # noqa: E402
from context_parallel_cases import build_case  # noqa: E402

from retnet.model.context_parallel import shard_sequences  # noqa: E402
from retnet.train.distributed import init_distributed  # noqa: E402


def run_cases(cases: list[list], out: Path) -> None:
    rank = dist.get_rank()
    # The collectives on a group of their own, as the trainer runs them beside DDP's (every rank creates each).
    groups = {pieces: dist.new_group(list(range(pieces))) for pieces in sorted({pieces for _, pieces in cases})}
    results = {}
    for name, pieces in cases:
        if rank >= pieces:
            continue
        model, input_ids, labels, cu_seqlens, mode = build_case(name, pieces)
        inputs, shard, targets = shard_sequences(input_ids, labels, rank, pieces, cu_seqlens, groups[pieces])
        output = model(**inputs, context_parallel=shard, num_items_in_batch=targets, retention_mode=mode,
                       use_cache=False, output_hidden_states=True)
        output.loss.backward()
        results[f"{name}@{pieces}"] = {
            "loss": output.loss.detach(),
            "hidden": output.hidden_states[-1].detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{rank}.pt")


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    if plan.get("cases"):
        # the training runs' own setup (its wait group for rank 0's long barriers too), which the runs after the
        # cases keep: init_distributed keeps an initialized group
        init_distributed("cpu")
        run_cases(plan["cases"], Path(plan["cases_out"]))
    runs_worker._end(runs_worker.run_plan(plan, int(os.environ.get("RANK", 0))))


if __name__ == "__main__":
    main(sys.argv[1])
