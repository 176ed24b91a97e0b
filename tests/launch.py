"""Helpers shared by the tests that start real processes: a free port, a torchrun launch of a worker script."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port free now: until its user binds it, the OS may hand it to any process that asks for one (the other
    xdist worker's, a gloo connection). torchrun binds its port only after importing torch, seconds later on a
    loaded machine: its launches here take ``TORCHRUN_STANDALONE`` instead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The start of a subprocess's script that imports retnet's subpackages without retnet/__init__.py, which imports
# transformers (~9.5 s of CPU) to register the Auto classes: for a process that uses none of the model classes.
WITHOUT_RETNET_INIT = """import importlib.util, sys, types
package = types.ModuleType("retnet")
package.__path__ = list(importlib.util.find_spec("retnet").submodule_search_locations)
sys.modules["retnet"] = package
"""

# torchrun's own rendezvous store on a port the OS gives it when it binds (the ranks' MASTER_PORT is that store's)
TORCHRUN_STANDALONE = ("--standalone", "--nnodes=1")


# Command-line runs one after another in ONE interpreter (torch and transformers imported once, not once a run:
# ~10 CPU-s each), each as its command runs it: ["-m", MODULE] through runpy as ``python -m`` does, or [SCRIPT], a
# script's own file. Each run's stdout and stderr go to its logs directory's files (file descriptors 1 and 2 moved
# there, so a handler bound to sys.stderr writes there too), its exit status to ``logs/status``. argv[1]: a JSON
# list of [command, [args...], logs directory]; :func:`logged_run` reads a run back.
RUN_EACH = """import json, os, runpy, sys, traceback
for command, args, logs in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.path.join(logs, "stdout"), "w") as out, open(os.path.join(logs, "stderr"), "w") as err:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            if command[0] == "-m":
                sys.argv = ["-m", *args]
                runpy.run_module(command[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [command[0], *args]
                runpy.run_path(command[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    os.close(saved[0]); os.close(saved[1])
    with open(os.path.join(logs, "status"), "w") as status:
        status.write(str(code))
"""


def logged_run(args, logs: Path) -> subprocess.CompletedProcess | None:
    """The :data:`RUN_EACH` run logged in ``logs``, as ``subprocess.run`` returns a process; None when its process
    ended before the run did (the process's own output says why)."""
    if not (logs / "status").exists():
        return None
    stdout, stderr, status = ((logs / name).read_text() for name in ("stdout", "stderr", "status"))
    return subprocess.CompletedProcess(args, int(status), stdout, stderr)


def launch_worker(script: Path, out: Path, ranks: int, timeout: float = 600) -> None:
    """``torchrun --nproc_per_node=RANKS SCRIPT OUT`` (gloo, one thread a rank), run to its end; the worker
    writes its results under ``out``. A failed launch fails the test with the ranks' last output."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", *TORCHRUN_STANDALONE,
               str(script), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


def selected_tests(request, parameters: bool = False) -> set[str]:
    """The names of the requesting module's tests this session runs (with their parameters' ids when
    ``parameters``): a module fixture that starts processes for several tests starts only what the selected
    ones use. A test in a class is named ``CLASS::TEST`` (two classes may have a test of the same name)."""
    return {(f"{item.cls.__name__}::" if item.cls else "") + (item.name if parameters else item.originalname)
            for item in request.session.items if getattr(item, "module", None) is request.module}


def start_logged(command: list[str], logs: Path, **popen) -> subprocess.Popen:
    """``command`` started, its stdout and stderr written to ``logs/stdout`` and ``logs/stderr`` (a pipe that nobody
    reads while the test waits for something else would stop it once full); ``finished`` waits for it."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, **popen)
    process.logs = logs
    return process


def finished(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """A ``start_logged`` process run to its end, as ``subprocess.run`` returns it (killed past ``timeout``)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        raise
    stdout, stderr = ((process.logs / name).read_text() for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def stop(process: subprocess.Popen) -> None:
    """Kill ``process`` unless it has ended (a module's processes that its selected tests did not wait for)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def run_into_a_closed_pipe(main, argv: list[str], monkeypatch) -> int:
    """``main(argv)`` writing its standard output into a pipe whose reader has gone (``| head -1``); its status."""
    reader, writer = os.pipe()
    os.close(reader)
    pipe = open(writer, "w", encoding="utf-8")  # noqa: SIM115  (closed below)
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        return main(argv)
    finally:
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        pipe.close()


@contextlib.contextmanager
def fake_two_rank_group(rank: int):
    """Rank ``rank`` of a fake two-rank process group in this process, with a tiny 2-layer model to run in it: the
    traced graphs of a distributed path, not its values, are what such a test looks at. Dynamo's caches are reset
    on the way out so the next test compiles afresh."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from retnet.model import RetNetConfig, RetNetForCausalLM

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        config = RetNetConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                              chunk_size=4, pad_token_id=0, eos_token_id=1)
        yield RetNetForCausalLM(config).train()
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
