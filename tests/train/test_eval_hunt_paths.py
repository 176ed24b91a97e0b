"""Evaluation and batch tools found wanting by a bug hunt: ``retnet-run-batch``'s urls and output file, and
``retnet-eval`` / ``retnet-lm-eval`` paths. Each test failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import run_into_a_closed_pipe
from tests.serve.conftest import CORPUS, make_settings, save_micro_model


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    return save_micro_model(tmp_path_factory.mktemp("micro"), train_byte_level_bpe(CORPUS, vocab_size=384,
                                                                                    min_frequency=1))


def batch_line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_run_batch_takes_the_score_and_rerank_urls_vllm_takes(micro_dir):
    """vLLM's run_batch takes any url ending in /score or /rerank (its error lists "/score, /rerank"), and
    retnet-serve serves /score, /rerank and /v2/rerank beside the /v1 names: such a line was refused as "not
    served" instead of reaching the route (here a language model's 400 model_not_scorer, as /v1/score gets)."""
    from retnet.serve.app import create_app
    from retnet.serve.run_batch import parse_lines, served_urls

    urls = served_urls(create_app(make_settings(micro_dir)))  # its lifespan not entered: no engine runs
    body = {"model": "micro", "text_1": "a", "text_2": "b"}
    entries = parse_lines([batch_line(f"c{i}", url, body) for i, url in
                           enumerate(("/score", "/rerank", "/v2/rerank", "/v1/score", "/v1/rerank"))], urls)
    assert [entry.error for entry in entries] == [None] * 5
    # the other routes outside /v1 stay out of a batch, as vLLM's run_batch has them not
    refused = parse_lines([batch_line("t", "/tokenize", {"prompt": "a"})], urls)[0].error
    assert refused is not None and refused.code == "unsupported_url"


def test_run_batch_keeps_an_earlier_results_file_when_it_stops_before_writing(micro_dir, tmp_path, capsys):
    """-o was opened with "w" before the model loaded: a run refused after that (here its --chat-template) exited
    2 having emptied the results file an earlier run wrote."""
    from retnet.serve.run_batch import main

    requests = tmp_path / "requests.jsonl"
    requests.write_text(batch_line("a", "/v1/completions", {"prompt": "x", "max_tokens": 1}) + "\n")
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": "results"}\n')
    fresh = tmp_path / "fresh.jsonl"
    link = tmp_path / "link.jsonl"  # a dangling link: the results go to its target (the check removed the link)
    link.symlink_to(tmp_path / "target.jsonl")
    for output in (results, fresh, link):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(micro_dir), "-i", str(requests), "-o", str(output),
                  "--chat-template", str(tmp_path / "missing.jinja")])
        assert exit_info.value.code == 2
        assert "--chat-template" in capsys.readouterr().err
    assert results.read_text() == '{"earlier": "results"}\n'
    assert not fresh.exists()  # the writability check leaves no empty file behind
    assert link.is_symlink() and not (tmp_path / "target.jsonl").exists()
    # a path that cannot be written is still refused before the model loads
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(micro_dir), "-i", str(requests), "-o", str(tmp_path / "no" / "such" / "dir.jsonl")])
    assert exit_info.value.code == 2 and "cannot write the output file" in capsys.readouterr().err


def test_lm_eval_refuses_a_training_runs_output_dir_naming_its_export(tmp_path, micro_dir):
    """``pretrained=`` a run's train.output_dir (its config.json the run's configuration, the model in export/):
    retnet-eval names the export, but retnet-lm-eval ended in transformers' traceback "Unrecognized model in ...
    Should have a `model_type` key in its config.json"."""
    import shutil

    from retnet.harness import check_pretrained

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {"output_dir": str(run)}}))
    with pytest.raises(SystemExit) as refusal:
        check_pretrained(["--model", "hf", "--model_args", f"pretrained={run},dtype=float32", "--tasks", "t"])
    assert "train.output_dir, not a model (its export" in str(refusal.value) and "not written yet" in str(refusal.value)
    shutil.copytree(micro_dir, run / "export")
    with pytest.raises(SystemExit) as refusal:
        check_pretrained(["--model", "hf", "--model_args", f"pretrained={run}", "--tasks", "t"])
    assert f"did you mean {str(run / 'export')!r}, the run's export" in str(refusal.value)
    check_pretrained(["--model", "hf", "--model_args", f"pretrained={run / 'export'}", "--tasks", "t"])  # a model


def test_run_batch_error_line_names_an_anthropic_errors_kind_as_its_code():
    """A failed /v1/messages line's body is Anthropic's ``{"type": "error", "error": {"type", "message"}}``, which has
    no ``code``: the output line's ``error.code`` was null, so a failure could not be told by its kind."""
    from retnet.serve.run_batch import BatchLine, output_line

    entry = BatchLine(line=3, custom_id="m", url="/v1/messages", body={})
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: required"}}
    assert output_line(entry, 400, body)["error"] == {"code": "invalid_request_error",
                                                      "message": "max_tokens: required", "param": None, "line": 3}
    openai = {"error": {"message": "m", "type": "BadRequestError", "param": "n", "code": None}}
    assert output_line(entry, 400, openai)["error"]["code"] is None  # an OpenAI body's own code, null or not


def test_run_batch_into_a_closed_pipe_says_so_in_one_line(micro_dir, tmp_path, capsys, monkeypatch):
    """``retnet-run-batch -o - | head -1``: the reader going away ended the run in a BrokenPipeError traceback; and
    every line's request was logged at INFO by httpx (the app is reached through it in the process), one log line a
    line of the file, breaking the progress bar."""
    import logging

    from retnet.serve.run_batch import main

    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(batch_line(f"c{i}", "/v1/completions", {"prompt": "x", "max_tokens": 1}) + "\n"
                                for i in range(3)))
    httpx_logger = logging.getLogger("httpx")
    monkeypatch.setattr(httpx_logger, "level", httpx_logger.level)  # (restored after the test)
    status = run_into_a_closed_pipe(main, ["--model", str(micro_dir), "-i", str(requests), "-o", "-"], monkeypatch)
    assert status == 1
    assert "the output was closed by its reader (broken pipe)" in capsys.readouterr().err
    assert httpx_logger.level == logging.WARNING
