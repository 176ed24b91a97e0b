"""``retnet-eval``: whole-document loss with the recurrent cache carried across segments, the command line,
and its refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retnet.train.evaluate import EXIT_USAGE, encode, load_model, main, score_documents

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real Python of uneven lengths (a few characters to a few thousand), so documents end mid-segment."""
    from retnet.train.data import stdlib_files

    cuts = [3000, 37, 1200, 5, 2500, 801, 64, 1999]
    return [file.read_text(errors="replace")[:cut] for file, cut in zip(stdlib_files()[5:], cuts)]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, texts) -> Path:
    """A micro RetNet and its tokenizer, saved as training exports them (save_pretrained, both in one dir)."""
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("export")
    tokenizer = train_byte_level_bpe(texts, vocab_size=384, min_frequency=1)
    config = RetNetConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, chunk_size=16,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        # a random model at the default init predicts almost uniformly: every state would give the same loss
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    RetNetForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer(export_dir):
    return load_model(str(export_dir), device="cpu")


@pytest.fixture
def jsonl(tmp_path, texts) -> Path:
    path = tmp_path / "docs.jsonl"
    # an empty row is no document, as in training
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*texts[:4], "", *texts[4:]]))
    return path


def full_forward_loss(model, documents: list[list[int]]) -> tuple[float, int]:
    """(summed loss, targets): each document in one forward, no cache, the model's own loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in documents:
            row = torch.tensor([ids])
            total += model(input_ids=row, labels=row, use_cache=False).loss.item() * (len(ids) - 1)
            count += len(ids) - 1
    return total, count


def direct_loss(export_dir: Path, texts: list[str]) -> tuple[float, int]:
    """The expected mean loss, built without the evaluator's code: EOS, the document, EOS, in one forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import retnet  # noqa: F401 - registers RetNet with the Auto classes

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    eos = tokenizer.eos_token_id
    docs = [[eos, *tokenizer(t, add_special_tokens=False).input_ids, eos] for t in texts if t]
    total, count = full_forward_loss(model, docs)
    return total / count, count


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's refusals
        return exit_.code


# ----------------------------------------------------------------------------------------------------------
# Segments carry the state: the same loss as one forward over the whole document
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("segment", "batch"), [(1, 3), (7, 1), (64, 2), (100, 3), (4096, 8)])
def test_segmented_loss_equals_full_forward(model_and_tokenizer, texts, segment, batch):
    model, tokenizer = model_and_tokenizer
    documents = encode(tokenizer, texts)
    lengths = [len(d) - 1 for d in documents]
    # long documents (the full forward takes the chunkwise form) that end mid-segment
    assert max(lengths) > 256 and (segment == 1 or any(n % segment for n in lengths))
    if segment < 32:  # a forward per few tokens: shorter documents keep it fast (one still past 256 at 7)
        documents = [documents[i] for i in ((1, 3, 6) if segment == 1 else (1, 2, 3))]
    expected, count = full_forward_loss(model, documents)
    total, targets = score_documents(model, documents, segment_tokens=segment, batch_size=batch)
    assert targets == count
    # fp32 throughout; measured differences ~1e-7, the rounding between the parallel and chunkwise forms
    assert total / targets == pytest.approx(expected / count, rel=1e-6, abs=1e-6)


def test_segments_without_the_carried_state_give_another_loss(model_and_tokenizer, texts):
    """The test above can tell: each segment started from a zero state gives another loss."""
    model, tokenizer = model_and_tokenizer
    documents = [d for d in encode(tokenizer, texts) if len(d) > 200]
    segment = 50
    # overlapping by one token, so the pieces predict exactly the documents' targets, each piece from scratch
    pieces = [d[i:i + segment + 1] for d in documents for i in range(0, len(d) - 1, segment)]
    cut, cut_targets = score_documents(model, pieces, segment_tokens=4096)
    carried, targets = score_documents(model, documents, segment_tokens=segment)
    assert cut_targets == targets
    assert abs(cut / targets - carried / targets) > 1e-3


def test_a_segments_logits_are_freed_before_the_next_segment_runs(model_and_tokenizer, texts):
    """The logits of a segment (``[batch·segment, vocab]``, the largest tensor of a step) are gone when the next
    segment's forward starts: held over, the peak memory is two segments' logits, not one."""
    import weakref

    model, tokenizer = model_and_tokenizer
    documents = [d for d in encode(tokenizer, texts) if len(d) > 200]
    previous: list[weakref.ref] = []
    alive_at_forward: list[bool] = []

    def before(module, args, kwargs):
        alive_at_forward.append(bool(previous) and previous[-1]() is not None)

    def after(module, args, kwargs, output):
        previous.append(weakref.ref(output.logits))

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        score_documents(model, documents, segment_tokens=50, batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(alive_at_forward) > 3
    assert not any(alive_at_forward)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def test_cli_subprocess_json_matches_direct_computation(export_dir, jsonl, texts, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        [sys.executable, "-m", "retnet.train.evaluate", "--model", str(export_dir), "--dataset", str(jsonl),
         "--segment-tokens", "97", "--batch-size", "3", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
         "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    loss, count = direct_loss(export_dir, texts)
    assert record["documents"] == len(texts)  # the empty row is not one
    assert record["tokens"] == count
    assert record["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert record["tokens_per_second"] > 0 and record["seconds"] > 0
    assert record["segment_tokens"] == 97 and record["batch_size"] == 3 and record["device"] == "cpu"
    assert "tok/s" in done.stderr  # the progress bar


def test_cli_text_directory_with_max_documents(export_dir, texts, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts):
        (corpus / f"doc{i}.txt").write_text(text)  # one file, one document
    (corpus / ".hidden.txt").write_text("skipped, as training skips hidden files")
    status = main(["--model", str(export_dir), "--dataset", str(corpus), "--max-documents", "3",
                   "--segment-tokens", "128", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
                   "--no-progress"])
    assert status == 0
    out = capsys.readouterr().out.strip()
    loss, count = direct_loss(export_dir, texts[:3])  # files are read in sorted order: doc0, doc1, doc2
    assert out.startswith(f"3 documents, {count} tokens: loss {loss:.4f}, perplexity ")
    assert out.endswith(" tokens/s)")


def test_cli_stdlib_default(export_dir, tmp_path, capsys):
    status = main(["--model", str(export_dir), "--max-documents", "2", "--device", "cpu", "--json",
                   "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert status == 0
    record = json.loads(capsys.readouterr().out)
    assert record["dataset"] == "stdlib" and 1 <= record["documents"] <= 2 and record["tokens"] > 0


def test_console_script_declared():
    import importlib

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["retnet-eval"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


# ----------------------------------------------------------------------------------------------------------
# Refusals: exit status 2, the option named
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "named"), [
    (["--segment-tokens", "0"], "--segment-tokens"),
    (["--segment-tokens", "-3"], "--segment-tokens"),
    (["--segment-tokens", "many"], "--segment-tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-documents", "-1"], "--max-documents"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "gpu-please"], "--device"),
])
def test_bad_options_exit_2(export_dir, jsonl, args, named, capsys):
    status = run_main(["--model", str(export_dir), "--dataset", str(jsonl), "--no-progress", *args])
    assert status == EXIT_USAGE
    assert named in capsys.readouterr().err


def test_missing_or_wrong_model_dir_exit_2(tmp_path, jsonl, capsys):
    assert run_main(["--model", str(tmp_path / "nowhere"), "--dataset", str(jsonl)]) == EXIT_USAGE
    assert "--model: no such model directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_main(["--model", str(tmp_path / "empty"), "--dataset", str(jsonl)]) == EXIT_USAGE
    assert "holds no config.json" in capsys.readouterr().err
    assert run_main(["--dataset", str(jsonl)]) == EXIT_USAGE  # --model is required
    assert "--model" in capsys.readouterr().err


def test_bad_datasets_exit_2(export_dir, tmp_path, capsys):
    common = ["--model", str(export_dir), "--no-progress", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert run_main([*common, "--dataset", str(empty)]) == EXIT_USAGE
    assert "--dataset" in (err := capsys.readouterr().err) and "holds no documents" in err

    assert run_main([*common, "--dataset", str(tmp_path / "missing.jsonl")]) == EXIT_USAGE
    assert "--dataset: no such file or directory" in capsys.readouterr().err

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"content": "some text"}) + "\n")
    assert run_main([*common, "--dataset", str(other)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--text-field 'text' is not a column" in err and "data.text_field" not in err


def _strict_json(line: str) -> dict:
    """A JSON record as a strict parser (jq, JSON.parse) reads it: NaN and Infinity are no JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_cli_json_names_every_setting_that_selects_the_documents(export_dir, texts, tmp_path, capsys):
    """Two splits of one dataset gave records that differed only in their numbers: the split, name, text field
    and document limit were left out. The dtype is named as the weights hold it, not by the alias given."""
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts[:4]}),
                          "test": datasets.Dataset.from_dict({"body": texts[4:]})}).save_to_disk(str(saved))
    records = {}
    for split in ("train", "test"):
        status = main(["--model", str(export_dir), "--dataset", str(saved), "--split", split, "--text-field", "body",
                       "--max-documents", "3", "--dtype", "bf16", "--device", "cpu", "--json", "--no-progress",
                       "--cache-dir", str(tmp_path / "cache")])
        assert status == 0
        records[split] = _strict_json(capsys.readouterr().out)
    for split, record in records.items():
        assert {k: record[k] for k in ("dataset", "name", "split", "text_field", "max_documents", "dtype")} == \
            {"dataset": str(saved), "name": None, "split": split, "text_field": "body", "max_documents": 3,
             "dtype": "bfloat16"}
        assert record["documents"] == 3


def test_cli_json_is_strict_json_when_the_loss_overflows(texts, tmp_path, capsys):
    """A model whose loss overflows the perplexity (or is NaN) printed ``Infinity``/``NaN``, which strict JSON
    parsers refuse: such values are null."""
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(texts, vocab_size=300, min_frequency=1)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          chunk_size=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = RetNetForCausalLM(config)
    with torch.no_grad():  # confidently wrong: logits in the thousands, a loss far above exp's range
        model.get_output_embeddings().weight.normal_(0, 1000.0)
    model.save_pretrained(tmp_path / "export")
    tokenizer.save_pretrained(tmp_path / "export")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    status = main(["--model", str(tmp_path / "export"), "--dataset", str(docs), "--device", "cpu", "--json",
                   "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert status == 0
    record = _strict_json(capsys.readouterr().out)
    assert record["loss"] > 700 and record["perplexity"] is None


def test_a_tokenizer_with_another_eos_than_the_model_is_refused(texts, tmp_path, capsys):
    """An export whose tokenizer is not the one the model was trained with (its EOS another id) scored every
    document from the wrong opening token, silently."""
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(texts, vocab_size=300, min_frequency=1)
    config = RetNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          chunk_size=16, pad_token_id=None, eos_token_id=tokenizer.eos_token_id + 7)
    RetNetForCausalLM(config).save_pretrained(tmp_path / "export")
    tokenizer.save_pretrained(tmp_path / "export")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": texts[0]}) + "\n")
    assert run_main(["--model", str(tmp_path / "export"), "--dataset", str(docs), "--device", "cpu",
                     "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--model" in err and f"EOS id {tokenizer.eos_token_id + 7}" in err
    # a list of EOS ids (generate's form) that holds the tokenizer's is the same tokenizer
    config.eos_token_id = [tokenizer.eos_token_id + 7, tokenizer.eos_token_id]
    RetNetForCausalLM(config).save_pretrained(tmp_path / "export")
    assert run_main(["--model", str(tmp_path / "export"), "--dataset", str(docs), "--device", "cpu",
                     "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0


def test_cli_a_split_of_local_files_is_refused_by_option(export_dir, jsonl, tmp_path, capsys):
    status = main(["--model", str(export_dir), "--dataset", str(jsonl), "--split", "test", "--no-progress",
                   "--cache-dir", str(tmp_path / "cache")])
    assert status == 2
    err = capsys.readouterr().err
    assert "--split 'test'" in err and "Traceback" not in err
