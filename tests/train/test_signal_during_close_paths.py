"""A signal that lands after a signal stop has saved, while the trainer closes (before, in or after the handlers
change hands), is only logged: neither the default SIGTERM's 143 nor a KeyboardInterrupt that cut close() short
(the output_dir lock kept, the W&B run left unfinished). The pieces are called directly: the run's handler as the
signal module would call it, and close() with a signal landing in the middle of it."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from retnet.train import trainer as trainer_module
from retnet.train.trainer import Trainer, _log_sigterm


class _Run:
    """W&B's run: finish() is where the signal lands (the last thing close() does before the handlers)."""

    def __init__(self, during_finish):
        self.finished, self.during_finish = [], during_finish

    def finish(self, exit_code=None):
        self.during_finish()
        self.finished.append(exit_code)


def _bare_trainer(output_dir: Path) -> Trainer:
    """A Trainer holding only what its signal handler and close() read: no model, no data."""
    trainer = Trainer.__new__(Trainer)
    trainer.output_dir = output_dir
    trainer.signal_received = trainer._completed = False
    trainer._closing_interrupts = 0
    trainer._writer = trainer._progress = trainer._metrics = trainer._wandb = None
    trainer._previous_handlers = {}
    return trainer


@pytest.fixture
def handlers():
    """The process's SIGTERM and SIGINT handlers, given back whatever the test left."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield before
    for sig, handler in before.items():
        signal.signal(sig, handler)


def _deliver(sig: int) -> None:
    """What the interpreter does with ``sig``: call the handler installed now (a default one: SIG_DFL's kill)."""
    handler = signal.getsignal(sig)
    if not callable(handler):
        raise AssertionError(f"{signal.Signals(sig).name} would find {handler!r}: the process would be killed")
    try:
        handler(sig, None)
    except KeyboardInterrupt:  # (as such it would end pytest itself)
        raise AssertionError(f"{signal.Signals(sig).name} raised KeyboardInterrupt") from None


def _stopped_and_saved(tmp_path: Path) -> Trainer:
    """A run whose first SIGTERM asked for the stop, and whose train() has returned (its save done)."""
    trainer = _bare_trainer(tmp_path)
    trainer._install_signal_handlers()
    _deliver(signal.SIGTERM)  # the first: save after this step, then stop
    assert trainer.signal_received
    trainer._completed = True  # train() returned
    return trainer


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_between_the_stop_and_close_is_only_logged(sig, tmp_path, handlers, caplog):
    """train() has returned: the run's own handler, still in place until close(), no longer stops anything (a
    second SIGINT raised KeyboardInterrupt: "stopped without saving" after the save, or a close cut short)."""
    trainer = _stopped_and_saved(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retnet.train.trainer"):
        _deliver(sig)
    name = signal.Signals(sig).name
    assert f"received {name}: the run has stopped and saved; closing (Ctrl-C again to leave it)" in caplog.text
    assert "saving a checkpoint" not in caplog.text
    trainer.close(log_sigterm=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_close_after_a_signal_stop_lets_it_finish(sig, tmp_path, handlers, monkeypatch, caplog):
    """A signal in the middle of close() (here in W&B's finish) is logged and close() goes on: the run finishes as
    finished, the output_dir lock is released, the SIGTERM handler left is the log-only one, SIGINT's the one
    before the run."""
    trainer = _stopped_and_saved(tmp_path)
    seen, released = [], []
    real_unlock = trainer_module.unlock_output_dir

    def unlock(directory):
        seen.append(signal.getsignal(signal.SIGTERM))  # what a SIGTERM as close() starts would find
        released.append(directory)
        real_unlock(directory)

    monkeypatch.setattr(trainer_module, "unlock_output_dir", unlock)
    trainer._wandb = run = _Run(lambda: _deliver(sig))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retnet.train.trainer"):
        trainer.close(log_sigterm=True)  # old: KeyboardInterrupt out of finish() (SIGINT given back first)
    assert run.finished == [0] and trainer._wandb is None and released == [tmp_path]
    assert seen == [_log_sigterm]
    # (SIGTERM finds the log-only handler close() installs first; SIGINT still the run's)
    assert ("received SIGTERM again: the run has stopped and saved; exiting" if sig == signal.SIGTERM
            else "received SIGINT: the run has stopped and saved; closing") in caplog.text
    assert signal.getsignal(signal.SIGTERM) is _log_sigterm
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]
    assert trainer._previous_handlers == {}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retnet.train.trainer"):
        _deliver(signal.SIGTERM)  # after close(): the log-only handler
    assert "received SIGTERM again" in caplog.text


def test_close_without_a_signal_stop_gives_every_handler_back(tmp_path, handlers, caplog):
    """A run that finished (no signal): a signal as it closes is logged as such, and close() gives back the handlers
    of before the run, SIGTERM's too."""
    trainer = _bare_trainer(tmp_path)
    trainer._install_signal_handlers()
    trainer._completed = True
    trainer._wandb = run = _Run(lambda: _deliver(signal.SIGINT))
    with caplog.at_level(logging.WARNING, logger="retnet.train.trainer"):
        trainer.close()
    assert run.finished == [0] and "received SIGINT: the run has finished and saved; closing" in caplog.text
    assert not trainer.signal_received
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_a_second_sigint_during_the_stop_still_stops_at_once(tmp_path, handlers):
    """Before train() returns (the save under way) a second Ctrl-C is still the way out without saving."""
    trainer = _bare_trainer(tmp_path)
    trainer._install_signal_handlers()
    _deliver(signal.SIGINT)
    with pytest.raises(AssertionError, match="raised KeyboardInterrupt"):
        _deliver(signal.SIGINT)
    trainer.close()


def test_a_second_ctrl_c_leaves_a_closing_that_hangs(tmp_path, handlers, caplog):
    """The first Ctrl-C after train() returned is only logged; a second one leaves close() (a W&B upload that
    hangs could not be left at all), the handlers given back all the same."""
    trainer = _bare_trainer(tmp_path)
    trainer._install_signal_handlers()
    trainer._completed = True

    def twice():
        _deliver(signal.SIGINT)
        _deliver(signal.SIGINT)

    trainer._wandb = _Run(twice)
    with pytest.raises(AssertionError, match="raised KeyboardInterrupt"):
        trainer.close()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
