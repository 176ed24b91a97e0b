"""``retnet-eval`` as its README section describes it: refusals speak of its own options. It scores the whole set
(no validation split held out), so a refused ``--split``/``--name`` must not send the user to training's
``data.val_fraction``/``data.val_documents``, which it has no option for."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from retnet.train.evaluate import EXIT_USAGE, main

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 3


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A micro causal LM and a one-label reward model sharing one tokenizer, saved as training exports them."""
    from retnet.model import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(TEXTS, vocab_size=300, min_frequency=1)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          chunk_size=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    out = {}
    for name, cls, labels in (("lm", RetNetForCausalLM, {}), ("rm", RetNetForSequenceClassification,
                                                              {"num_labels": 1})):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        cls(RetNetConfig(**{**config.to_dict(), **labels})).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    import datasets

    root = tmp_path_factory.mktemp("data")
    rows = [{"text": text} for text in TEXTS]
    (root / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": "def f(x):", "chosen": " return x",
                                                          "rejected": " pass"}) + "\n" for _ in range(2)))
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    return {"docs": root / "docs.jsonl", "pairs": root / "pairs.jsonl", "saved": root / "saved",
            "cache": root / "cache"}


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--no-progress", *([] if "--device" in argv else ["--device", "cpu"])])
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


@pytest.mark.parametrize(("model", "dataset", "option"), [
    ("lm", "stdlib", ["--split", "test"]),
    ("lm", "stdlib", ["--name", "python"]),
    ("lm", "docs", ["--split", "test"]),
    ("lm", "saved", ["--split", "test"]),
    ("rm", "pairs", ["--split", "test"]),
])
def test_a_refused_split_names_no_training_setting(exports, data, model, dataset, option):
    """These refusals said "(its validation documents are held out by data.val_fraction, or data.val_documents when
    streaming)": settings retnet-eval does not have, for a split it does not hold out."""
    source = dataset if dataset == "stdlib" else str(data[dataset])
    code, err = _run(["--model", str(exports[model]), "--dataset", source, *option,
                      "--cache-dir", str(data["cache"])])
    last = err.strip().splitlines()[-1]
    assert code == EXIT_USAGE and last.startswith(f"retnet-eval: error: {option[0]} "), err
    assert "data." not in last and "validation" not in last, last


def test_the_meta_device_is_refused_naming_it(exports, data):
    """``--device meta`` (a device every torch has, holding no data) loaded the model there and ended in
    NotImplementedError's traceback, status 1, when its loss was read."""
    code, err = _run(["--model", str(exports["lm"]), "--dataset", str(data["docs"]), "--device", "meta",
                      "--cache-dir", str(data["cache"])])
    assert code == EXIT_USAGE and "retnet-eval: error: --device 'meta'" in err and "Traceback" not in err, err
