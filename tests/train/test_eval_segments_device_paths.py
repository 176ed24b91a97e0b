"""``retnet-eval`` on an xPos model with ``--segment-tokens`` past one packed xPos frame, and a ``--device`` this
machine does not have: both scored or refused in one line, not a traceback after the model had loaded."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from retnet.train.evaluate import EXIT_USAGE, main

# ~440 tokens a document: past the packed frame of xpos_scale_base 4 (208 positions at chunk_size 16)
TEXTS = ["def f(x):\n    return x * 2\n" * 40, "class A:\n    pass\n" * 60]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("xpos")
    tokenizer = train_byte_level_bpe(TEXTS, vocab_size=300, min_frequency=1)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          chunk_size=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          use_xpos=True, xpos_scale_base=4.0, initializer_range=0.2)
    torch.manual_seed(0)
    RetNetForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--no-progress"])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_segments_longer_than_an_xpos_frame_score_as_short_ones(export):
    """The packed forward refuses an xPos piece longer than one frame: --segment-tokens 100000 (any value past 28 288
    at the default xpos_scale_base) was an XPosFrameError traceback; the state carries, so the loss is the same."""
    docs = str(export.parent / "docs.jsonl")
    results = {}
    for segment, batch in ((32, 1), (100_000, 1), (100_000, 2)):
        code, out, err = _run(["--model", str(export), "--dataset", docs, "--segment-tokens", str(segment),
                               "--batch-size", str(batch), "--device", "cpu", "--json"])
        assert code == 0, err
        results[segment, batch] = json.loads(out)
    short = results[32, 1]
    assert short["tokens"] > 2 * 208
    for record in results.values():
        assert record["tokens"] == short["tokens"]
        assert record["loss"] == pytest.approx(short["loss"], abs=1e-5)
    assert results[100_000, 1]["segment_tokens"] == 100_000  # the record says what was asked


def test_a_device_this_machine_lacks_is_refused_naming_it(export, monkeypatch):
    """cuda:99 (a GPU index past the machine's count) passed the check, and the model's move there was a
    traceback; it is refused with the option, before the model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine with fewer GPUs
    code, out, err = _run(["--model", str(export), "--dataset", str(export.parent / "docs.jsonl"),
                           "--device", "cuda:99"])
    assert code == EXIT_USAGE and not out
    assert "--device 'cuda:99' is not available here" in err and "Traceback" not in err


def test_the_library_bars_are_hidden_without_datasets(monkeypatch):
    # The GPU image has no `datasets`, and retnet-eval imported it only to hide its bars: the stdlib corpus, which
    # needs no datasets, failed to score there with an ImportError traceback
    import sys

    from retnet.train import evaluate

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with evaluate._library_bars(shown=False):
        pass
