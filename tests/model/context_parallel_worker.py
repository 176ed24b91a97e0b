"""One rank of ``test_context_parallel``'s torchrun group: runs every case's piece forward and backward and
saves what the test compares with the whole row run in one process (``cases`` builds both sides)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_parallel_cases import CASES, PIECES, build_case

from retnet.model.context_parallel import shard_sequences


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    assert size == PIECES, f"run with --nproc_per_node={PIECES}"
    # The collectives on a group of their own, as the trainer runs them beside DDP's.
    group = dist.new_group(list(range(size)))
    results = {}
    for name in CASES:
        model, input_ids, labels, cu_seqlens, mode = build_case(name)
        inputs, shard, targets = shard_sequences(input_ids, labels, rank, size, cu_seqlens, group)
        out = model(**inputs, context_parallel=shard, num_items_in_batch=targets, retention_mode=mode,
                    use_cache=False, output_hidden_states=True)
        out.loss.backward()
        results[name] = {
            "loss": out.loss.detach(),
            "hidden": out.hidden_states[-1].detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
