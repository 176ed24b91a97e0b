"""A run started in a train.output_dir another live run writes (the ranks of a torchrun killed with SIGKILL train
on) is refused at start, exit status 2, naming the directory: the two pruned each other's checkpoints. The lock
goes with its process, so a killed run's never blocks the relaunch; runs one after another in one process work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from retnet.train.checkpoint import list_checkpoints

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, b"pid 4242 on elsewhere", 0)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_run_in_an_output_dir_a_live_run_holds_is_refused(micro, tmp_path, run_here):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = run_here(micro(out, train__steps=2, checkpoint__interval=1))
    finally:
        holder.stdin.close()
        holder.wait()
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "train.output_dir" in refused.stderr and "pid 4242 on elsewhere" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert list_checkpoints(out / "checkpoints") == []
    # the holder gone (as a killed run's lock goes with it), the same command runs, then resumes in this process
    assert run_here(micro(out, train__steps=2, checkpoint__interval=1)).returncode == 0
    assert run_here(micro(out, train__steps=3, checkpoint__interval=1)).returncode == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step_00000003"


def test_a_trainer_that_fails_to_start_leaves_its_output_dir_unlocked(micro, tmp_path, monkeypatch):
    # A program of its own building the Trainer lives on after the refusal: the lock went with it only at exit.
    import fcntl
    import os

    from retnet.train.__main__ import _parser
    from retnet.train.config import load_config
    from retnet.train.trainer import Trainer

    out = tmp_path / "run"

    def refuse(self, *args, **kwargs):
        raise RuntimeError("refused after the lock")

    monkeypatch.setattr(Trainer, "_init_from_dir", refuse)
    args, overrides = _parser().parse_known_args(micro(out, train__steps=2))
    with pytest.raises(RuntimeError, match="refused after the lock"):
        Trainer(load_config(args.config, overrides))
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (flock: a held lock refuses another open, this process's too)
    finally:
        os.close(fd)
