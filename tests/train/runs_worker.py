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

    torchrun --nproc_per_node=N tests/train/runs_worker.py --pool DIR HOST_PID

keeps the ranks up for the test process's whole session (tests/train/conftest.py's ``RunsPool``): they take one job
after another, ``DIR/job_J.json`` (a plan, and the test process's environment where it differs from the launch's,
a ``PYTHONPATH`` entry on ``sys.path`` too, for the job's length), each rank writing ``DIR/job_J.rank_R.done`` when
it has run the job's runs; they end when ``DIR/stop`` appears, ``DIR`` goes or the test process is gone.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import sys
import time
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


def run_plan(plan: dict, rank: int) -> int:
    """The plan's runs in this process, one after another (the first failure ends them): the last one's status."""
    from retnet.train import __main__ as train_main

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
    warnings.filters[:] = fresh_filters
    return 1 if status is None else status


def _end(status: int):
    from retnet.train import __main__ as train_main

    train_main.logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status == 0 else 1)  # as main's own end of a distributed run: no teardown of the gloo group


def main(plan_path: str) -> None:
    _end(run_plan(json.loads(Path(plan_path).read_text()), int(os.environ.get("RANK", 0))))


@contextlib.contextmanager
def _job_environment(changes: dict[str, str | None]):
    """The test process's environment where it differs from the launch's, for one job: a new ``PYTHONPATH``
    entry (a test's reward functions' module) on ``sys.path`` as well, and the modules imported from it forgotten
    after the job (another test's module of that name may follow)."""
    saved = {key: os.environ.get(key) for key in changes}
    added = [entry for entry in (changes.get("PYTHONPATH") or "").split(os.pathsep)
             if entry and entry not in sys.path]
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sys.path[:0] = added
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for entry in added:
            sys.path.remove(entry)
            for name, module in list(sys.modules.items()):
                if (getattr(module, "__file__", None) or "").startswith(entry + os.sep):
                    del sys.modules[name]


def serve(pool: Path, host_pid: int) -> None:
    rank = int(os.environ.get("RANK", 0))
    # torchrun starts each rank in a session of its own: killing the launch's process group leaves them, so the
    # test process kills them by these
    (pool / f"rank_{rank}.pid").write_text(str(os.getpid()))
    for index in itertools.count():
        job = pool / f"job_{index}.json"
        idle_since = time.monotonic()
        while not job.exists():
            if (pool / "stop").exists() or not pool.exists():  # (removed: the test process gave the launch up)
                _end(0)
            try:
                os.kill(host_pid, 0)
            except ProcessLookupError:  # the test process is gone (killed): nothing will stop the launch
                _end(1)
            # a test's runs come one right after another; between tests a pooled rank may wait minutes, polling
            # slower then (every 0.05 s cost each idle rank ~1% of a core)
            time.sleep(0.05 if time.monotonic() - idle_since < 5 else 0.3)
        spec = json.loads(job.read_text())
        with _job_environment(spec["environment"]):
            status = run_plan(spec, rank)
        done = pool / f"job_{index}.rank_{rank}.done"
        done.with_suffix(".tmp").write_text(str(status))
        done.with_suffix(".tmp").replace(done)  # whole when the test process sees it
        if status != 0:
            _end(status)


if __name__ == "__main__":
    if sys.argv[1] == "--pool":
        serve(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main(sys.argv[1])
