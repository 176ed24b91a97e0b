"""SIGTERM to a ``retnet-train`` process: the run saves at the step it came in and the process exits 0 (the run's
own command, not a traceback or 143); a SIGTERM that reaches a run after its signal stop has saved (Slurm's to a
rank beside the one torchrun passes on) is only logged, as the README says: the trainer's close() gave the default
handler back, and the finished run ended with 143. Both in one process of their own (its exit status is the tests'):
each start of one imports torch and transformers again (~6 s of CPU)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from retnet.train.checkpoint import list_checkpoints, verify_checkpoint
from tests.serve.warm_servers import start_python

from .conftest import micro_args, wait_while_running

# argv[1]: the two runs' arguments (JSON). The first run signals itself twice; the second runs until the test's
# SIGTERM. Each through main() without arguments, as the command calls it (what decides the handler it leaves).
RUNS = """
import json, os, signal, sys
from retnet.train.trainer import Trainer
from retnet.train.__main__ import main

first, second = json.loads(sys.argv[1])
step, close = Trainer.train_step, Trainer.close

def train_step(self):
    if self.step == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: save after this step, then stop
    return step(self)

def close_then_signal(self, **kwargs):
    close(self, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # the second, after the stop has saved

Trainer.train_step, Trainer.close = train_step, close_then_signal
sys.argv = ["retnet-train", *first]
status = main()
Trainer.train_step, Trainer.close = step, close
print(f"{MARK} {status}", file=sys.stderr, flush=True)
sys.argv = ["retnet-train", *second]
sys.exit(main())
"""
MARK = "first run ended with status"


def _train_records(output_dir: Path) -> int:
    """The training records of metrics.jsonl a running trainer has written whole (its last line may be half
    written)."""
    path = output_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return sum(json.loads(line)["kind"] == "train" for line in text[:text.rfind("\n") + 1].splitlines())


@pytest.fixture(scope="module")
def signalled(corpus, tokenizer_dir, cache_dir, tmp_path_factory):
    """The finished process: ``(its exit status, the first run's stderr and output directory, the second's)``."""
    root = tmp_path_factory.mktemp("signalled")
    first, second = root / "stopped-twice", root / "terminated"
    runs = [micro_args(corpus, tokenizer_dir, cache_dir, first, train__steps=4, checkpoint__interval=0),
            micro_args(corpus, tokenizer_dir, cache_dir, second, train__steps=100000, checkpoint__export=True)]
    # (forked from the suite's warm interpreter, tests/serve/warm_servers.py: its stdout and stderr in one log)
    process = start_python(["-c", RUNS.replace("{MARK}", MARK), json.dumps(runs)],
                           {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TOKENIZERS_PARALLELISM": "false",
                            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, root / "logs", merged=True)
    try:
        wait_while_running(lambda: _train_records(second) >= 3, process)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    before, _, after = (root / "logs" / "stdout").read_text().partition(MARK)
    return returncode, before, first, after, second


def test_a_sigterm_after_a_signal_stop_is_only_logged(signalled):
    returncode, err, out, rest, _ = signalled
    assert rest, (returncode, err[-3000:])  # the process outlived the second SIGTERM
    assert rest.split()[0] == "0", rest[:200]  # the first run's status
    assert "received SIGTERM again" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 2  # stopped after the step the first one came in
    assert returncode == 0 and returncode != -signal.SIGTERM, rest[-3000:]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(signalled, read_metrics):
    returncode, _, _, err, out = signalled
    assert returncode == 0, err[-3000:]
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1
    step = verify_checkpoint(ckpts[0])["step"]
    assert 3 <= step < 100000 and read_metrics(out)[-1]["step"] == step
    assert not (out / "export").exists()  # an interrupted run is resumed, not exported
    assert "SIGTERM" in err
