"""The torchrun launch the distributed CPU benchmarks share (``context_parallel.py``, ``tensor_parallel.py``).

A benchmark script is both the launcher and the worker: :func:`torchrun` starts ``python -m torch.distributed.run``
on the script itself with ``--worker --out=DIR`` and the script's own arguments, ``size`` ranks on one node, each
with ``OMP_NUM_THREADS`` = ``threads``; every rank writes its result with :func:`write_rank_result`, and the
launcher returns them in rank order. Each configuration being its own launch, one's memory never shows in
another's. Imported after the script has put the repository root on ``sys.path`` (see either benchmark).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def threads_per_rank(cores: int, size: int) -> int:
    """The OpenMP threads each of ``size`` ranks gets so that a launch uses ``cores`` in all (at least 1)."""
    return max(1, cores // size)


def torchrun(script: str | Path, size: int, threads: int, args: list[str], *, what: str,
             timeout: float = 1800) -> list[dict]:
    """One torchrun launch of ``size`` ranks running ``script --worker --out=DIR *args``; returns the ranks'
    results (what each wrote with :func:`write_rank_result`), rank 0 first. ``what`` names the configuration in
    the error raised (``SystemExit``, with the end of torchrun's stderr) when the launch fails."""
    out = Path(tempfile.mkdtemp(prefix=f"retnet-{Path(script).stem}-bench-"))
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={size}", "--standalone",
                   "--nnodes=1", str(Path(script).resolve()), "--worker", f"--out={out}", *args]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"{what}: torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(size)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_rank_result(out: str | Path, rank: int, result: dict) -> None:
    """A worker's result, where :func:`torchrun` reads it back."""
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
