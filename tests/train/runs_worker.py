"""A torchrun worker: several ``retnet-train`` runs one after another in the same rank processes.

    torchrun --nproc_per_node=N tests/train/runs_worker.py PLAN.json

A rank process spends ~10 s of CPU importing torch and transformers before its first step, which dwarfs a micro
run's training: a test with several launches of one world size (train, then resume; one split, then another)
pays it once here. Each run goes through ``retnet.train.__main__.main`` as torchrun's ``-m retnet.train`` would;
the process group the first run starts stays up for the next (``init_distributed`` keeps an initialized one), as
``main`` would otherwise end the process there (``_exit_without_teardown``). Each run's stdout and stderr, at the
file-descriptor level (gloo's and torch's C++ warnings too), go to ``OUT/run_I/rank_R.stdout|.stderr``, its exit
status to ``rank_R.status``. A run that fails on a rank (raises, or exits non-zero) ends that rank's process with
status 1, so that torchrun stops the others, as it stops a launch of one run: ranks that went on to the next run
would wait for the failed one in its first collective, and later runs depend on the earlier ones' output.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path


class RunEnded(BaseException):
    """``main``'s end of a distributed run, with its exit status, instead of the process's end."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _end_run(status: int):
    raise RunEnded(status)


@contextlib.contextmanager
def _output_to(directory: Path, rank: int):
    """This process's fds 1 and 2 (and Python's streams over them) written to the run's files meanwhile."""
    directory.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(directory / f"rank_{rank}.stdout", "w") as out, open(directory / f"rank_{rank}.stderr", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(plan_path: str) -> int:
    from retnet.train import __main__ as train_main

    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ.get("RANK", 0))
    train_main._exit_without_teardown = _end_run
    fresh_filters = list(warnings.filters)
    status = 0  # (a plan of no runs: the DoRA worker's model cases alone)
    for index, args in enumerate(plan["runs"]):
        # a fresh process's warnings: each run shows the ones a Python warning shows once a process
        warnings.resetwarnings()
        warnings.filters[:] = fresh_filters
        directory = Path(plan["out"]) / f"run_{index}"
        status = None
        with _output_to(directory, rank):
            try:
                status = train_main.main(args)
            except RunEnded as ended:
                status = ended.status
            except BaseException:  # the run's failure is its test's to report
                traceback.print_exc()
        (directory / f"rank_{rank}.status").write_text("raised" if status is None else str(status))
        if status != 0:
            break
    train_main.logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status == 0 else 1)  # as main's own end of a distributed run: no teardown of the gloo group


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
