"""A SIGTERM that reaches a run after its signal stop has saved (Slurm's to a rank beside the one torchrun passes on)
is only logged, as the README says: the trainer's close() gave the default handler back, and the finished run
ended with 143. One process of its own (its exit status is the test's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

RUN = """
import os, signal, sys
from retnet.train.trainer import Trainer
from retnet.train.__main__ import main

step, close = Trainer.train_step, Trainer.close

def train_step(self):
    if self.step == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: save after this step, then stop
    return step(self)

def close_then_signal(self, **kwargs):
    close(self, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # the second, after the stop has saved

Trainer.train_step, Trainer.close = train_step, close_then_signal
sys.argv = ["retnet-train", *sys.argv[1:]]
sys.exit(main())
"""


def test_a_sigterm_after_a_signal_stop_is_only_logged(micro, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", RUN, *micro(out, train__steps=4, checkpoint__interval=0)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "received SIGTERM again" in done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 2  # stopped after the step the first one came in
    assert done.returncode != -signal.SIGTERM
