"""Evaluation and batch tools found wanting by a second bug hunt: ``retnet-run-batch`` stopped by a closed output
pipe or Ctrl-C. Each test failed before its fix."""

from __future__ import annotations

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
