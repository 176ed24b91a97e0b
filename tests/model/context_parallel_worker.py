"""One rank of a context-parallel torchrun group (``test_context_parallel``): runs every case's piece forward and
backward and saves what the test compares with the whole row run in one process (``context_parallel_cases``
builds both sides). The cases are the ``[name, pieces]`` pairs the test lists in ``OUT/cases.json``, each on the
first ``pieces`` ranks (saved as ``name@pieces``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_parallel_cases import build_case

from retnet.model.context_parallel import shard_sequences


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    listed = json.loads((Path(out_dir) / "cases.json").read_text())
    runs = [(name, pieces, f"{name}@{pieces}") for name, pieces in listed]
    assert max(pieces for _, pieces, _ in runs) <= size, "more pieces than ranks"
    # The collectives on a group of their own, as the trainer runs them beside DDP's (every rank creates each).
    groups = {pieces: dist.new_group(list(range(pieces))) for pieces in sorted({pieces for _, pieces, _ in runs})}
    results = {}
    for name, pieces, key in runs:
        if rank >= pieces:
            continue
        model, input_ids, labels, cu_seqlens, mode = build_case(name, pieces)
        inputs, shard, targets = shard_sequences(input_ids, labels, rank, pieces, cu_seqlens, groups[pieces])
        out = model(**inputs, context_parallel=shard, num_items_in_batch=targets, retention_mode=mode,
                    use_cache=False, output_hidden_states=True)
        out.loss.backward()
        results[key] = {
            "loss": out.loss.detach(),
            "hidden": out.hidden_states[-1].detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
