"""A run started in a train.output_dir another live run writes (the ranks of a torchrun killed with SIGKILL train
on) is refused at start, exit status 2, naming the directory: the two pruned each other's checkpoints. The lock
goes with its process, so a killed run's never blocks the relaunch; runs one after another in one process work."""

from __future__ import annotations

import subprocess
import sys

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
