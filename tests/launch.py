"""Helpers shared by the tests that start real processes: a free port, a torchrun launch of a worker script."""

from __future__ import annotations

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
