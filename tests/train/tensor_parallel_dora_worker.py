"""A torchrun worker of tests/train/test_tensor_parallel_dora_paths.py: its model-level cases, then its
``retnet-train`` runs, in the same 2 rank processes (one launch, not two: a rank's start is ~10 s of CPU importing
torch and transformers).

    torchrun --nproc_per_node=2 tests/train/tensor_parallel_dora_worker.py PLAN.json

PLAN holds ``runs`` and ``out`` as tests/train/runs_worker.py's does, and ``model_cases``: when true, each rank's
results of the model-level cases go to ``OUT/model/rank{r}.pt`` (the test module's ``worker``) first. The process
group is the trainer's own (``init_distributed``), made before the cases and kept for the runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(plan_path: str) -> int:
    from retnet.train.distributed import init_distributed
    from tests.train import runs_worker
    from tests.train.test_tensor_parallel_dora_paths import worker

    plan = json.loads(Path(plan_path).read_text())
    if plan["model_cases"]:
        init_distributed("cpu")  # as the first run would: the group (and its barrier's) kept for the runs
        out = Path(plan["out"]) / "model"
        out.mkdir(parents=True, exist_ok=True)
        worker(str(out))
    return runs_worker.main(plan_path)  # ends the process (os._exit), its group not torn down


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
