"""Evaluation and batch tools found wanting by a second bug hunt: ``retnet-run-batch`` stopped by a closed output
pipe, Ctrl-C (in the batch, or in the imports before it, as every other command) or an engine that does not start.
Each test failed before its fix."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.launch import run_into_a_closed_pipe
from tests.serve.conftest import CORPUS, save_micro_model


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    return save_micro_model(tmp_path_factory.mktemp("micro"), train_byte_level_bpe(CORPUS, vocab_size=384,
                                                                                    min_frequency=1))


@pytest.fixture
def requests_file(tmp_path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                        "body": {"prompt": "x", "max_tokens": 4}}) + "\n" for i in range(3)))
    return path


@pytest.fixture
def engines(monkeypatch) -> list:
    """The engine of each app ``retnet-run-batch`` creates, as they are created."""
    import retnet.serve.app as app_module

    created, create_app = [], app_module.create_app

    def recording(*args, **kwargs):
        app = create_app(*args, **kwargs)
        created.append(app.state.engine)
        return app

    monkeypatch.setattr(app_module, "create_app", recording)
    return created


def test_a_closed_output_pipe_stops_the_engine(micro_dir, requests_file, engines, capsys, monkeypatch):
    """``retnet-run-batch -o - | head -1``: the BrokenPipeError left the app's lifespan by an exception, which skips
    its shutdown, so the scheduler thread went on running the model while the interpreter exited: "terminate called
    without an active exception" and SIGABRT (exit status 134), not the one line and status 1 the README gives."""
    from retnet.serve.run_batch import main

    status = run_into_a_closed_pipe(main, ["--model", str(micro_dir), "-i", str(requests_file), "-o", "-"],
                                    monkeypatch)
    assert status == 1
    assert "broken pipe" in capsys.readouterr().err
    (engine,) = engines
    assert engine.thread is not None and not engine.thread.is_alive()


def test_ctrl_c_ends_the_run_in_one_line_with_the_engine_stopped(micro_dir, requests_file, engines, tmp_path, capsys,
                                                                 monkeypatch):
    """Ctrl-C during a batch was a two-part traceback, then the same SIGABRT as a closed pipe (the engine thread left
    running): now one line, exit status 130 (the shell's for SIGINT), the lines written before it kept."""
    import retnet.serve.run_batch as run_batch_module

    async def interrupted(app, entries, out, max_concurrency, progress=True):
        out.write("first\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_batch_module, "run_batch", interrupted)
    output = tmp_path / "results.jsonl"
    try:
        status = run_batch_module.main(["--model", str(micro_dir), "-i", str(requests_file), "-o", str(output)])
    except KeyboardInterrupt:
        status = "KeyboardInterrupt raised"
    assert status == 130
    assert "interrupted" in capsys.readouterr().err
    assert output.read_text() == "first\n"
    (engine,) = engines
    assert engine.thread is not None and not engine.thread.is_alive()


@pytest.mark.parametrize("command", ["retnet-run-batch", "retnet-serve", "python -m retnet.serve.demo", "retnet-train",
                                     "retnet-eval", "retnet-lm-eval"])
def test_ctrl_c_during_the_imports_is_the_same_one_line_and_status_130(command, micro_dir, requests_file, tmp_path,
                                                                       capsys, monkeypatch):
    """The imports of torch and transformers (retnet.register) take seconds before any model loads: a Ctrl-C then was
    a traceback of wherever the import was, not the one line and status 130 of a Ctrl-C in the batch (or, for
    retnet-train, in the training). The demo registered at its import of retnet, before its main."""
    import retnet
    from retnet import harness
    from retnet.serve import demo, run_batch
    from retnet.serve.__main__ import main as serve_main
    from retnet.train import evaluate
    from retnet.train.__main__ import main as train_main

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(retnet, "register", interrupted)
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(micro_dir)]
    main, args = {
        "retnet-run-batch": (run_batch.main, [*model, "-i", str(requests_file), "-o", str(tmp_path / "out.jsonl")]),
        "retnet-serve": (serve_main, model),
        "python -m retnet.serve.demo": (demo.main, [*model, "--exit-after", "--port=0"]),
        "retnet-train": (train_main, ["--config", "tiny", f"--train.output_dir={tmp_path / 'run'}"]),
        "retnet-eval": (evaluate.main, [*model, "--no-progress"]),
        "retnet-lm-eval": (harness.main, ["--model", "hf", "--model_args", "pretrained=org/name", "--tasks", "x"]),
    }[command]
    try:  # (a KeyboardInterrupt let through would end the whole test session)
        status = main(args)
    except SystemExit as exited:
        status = exited.code
    except KeyboardInterrupt:
        status = "KeyboardInterrupt raised"
    assert status == 130
    assert capsys.readouterr().err == f"{command}: interrupted\n"
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "run").exists()


def test_ctrl_c_in_retnet_convert_fla_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Its conversion (a hub download, a large checkpoint's read) takes minutes: a Ctrl-C was a traceback."""
    from retnet.model import convert_fla

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_fla, "convert_fla_checkpoint", interrupted)
    try:  # (a KeyboardInterrupt let through would end the whole test session)
        convert_fla.main([str(tmp_path / "fla"), str(tmp_path / "out")])
        status = "returned"
    except SystemExit as exited:
        status = exited.code
    except KeyboardInterrupt:
        status = "KeyboardInterrupt raised"
    assert status == 130
    assert capsys.readouterr().err == "retnet-convert-fla: interrupted\n"


def test_an_engine_that_does_not_start_is_named_once(micro_dir, requests_file, engines, tmp_path, capsys, monkeypatch):
    """The engine's failure is its bare cause (``failure``); the text requests and /health give (``dead``) is built
    from it in one place. retnet-run-batch printed "the engine did not start: engine failed: ...", and retnet-serve
    and the demo cut that prefix off the text again."""
    from retnet.serve.engine import Engine
    from retnet.serve.run_batch import main

    def fail(self):
        raise RuntimeError("no weights")

    monkeypatch.setattr(Engine, "_load", fail)
    status = main(["--model", str(micro_dir), "-i", str(requests_file), "-o", str(tmp_path / "out.jsonl")])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "retnet-run-batch: the engine did not start: RuntimeError: no weights")
    (engine,) = engines
    assert (engine.failure, engine.dead) == ("RuntimeError: no weights", "engine failed: RuntimeError: no weights")


@pytest.mark.parametrize("fails", ["write", "close"])
def test_an_output_that_fails_with_eio_is_one_line_and_status_1(fails, micro_dir, requests_file, engines, tmp_path,
                                                                capsys, monkeypatch):
    """Any OSError writing ``-o`` (EIO, a full disk), not only a broken pipe, ends the run in one line naming the
    output and the error, exit status 1, the bar closed and the engine stopped: it was a traceback. The file's
    close at the end can fail too (a network file system reports a failed write there)."""
    import errno
    import os

    from tqdm import tqdm

    import retnet.serve.run_batch as module

    class Failing(io.StringIO):
        def write(self, text):
            if fails == "write" and self.getvalue():
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return super().write(text)

        def close(self):
            super().close()
            if fails == "close":
                raise OSError(errno.EIO, os.strerror(errno.EIO))

    def failing_open(self):
        self.file = Failing()
        return self.file

    monkeypatch.setattr(module.OutputFile, "open", failing_open)
    output = tmp_path / "results.jsonl"
    status = module.main(["--model", str(micro_dir), "-i", str(requests_file), "-o", str(output)])
    assert status == 1
    lost = "the lines after it were not written" if fails == "write" else "its last lines may be lost"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"retnet-run-batch: cannot write the output file {str(output)!r}: Input/output error; {lost}"
    assert not [bar for bar in tqdm._instances if bar.desc == "run_batch"]
    (engine,) = engines
    assert engine.thread is not None and not engine.thread.is_alive()
