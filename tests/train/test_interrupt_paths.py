"""A second Ctrl-C stops a run at once without saving: one line naming the last checkpoint, exit status 130 (it was
the traceback of wherever the step was)."""

from __future__ import annotations

import os
import signal

from retnet.train.checkpoint import list_checkpoints


def test_a_second_ctrl_c_stops_in_one_line_naming_the_last_checkpoint(micro, tmp_path, run_here, monkeypatch):
    from retnet.train.trainer import Trainer

    step = Trainer.train_step

    def train_step(self):
        loss = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first: a save after this step is asked for
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "run"
    done = run_here(micro(out, train__steps=6, checkpoint__interval=2))
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    (checkpoint,) = list_checkpoints(out / "checkpoints")  # step 2's; nothing saved at the interrupt
    assert checkpoint.name.endswith("2")
    assert done.stderr.splitlines()[-1] == ("retnet-train: interrupted: stopped without saving; the last checkpoint "
                                            f"is {checkpoint}")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer's handlers were put back
