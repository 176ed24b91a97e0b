"""``retnet-eval``: whole-document loss with the recurrent cache carried across segments, the command line,
and its refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.evaluate import EXIT_USAGE, encode, evaluate, load_model, main, score_documents
from tests.launch import RUN_EACH, logged_run

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


def full_forward_loss(model, documents) -> tuple[float, int]:
    """(summed loss, targets): each document in one forward, no cache, the model's own loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in documents:
            row = torch.as_tensor(ids, dtype=torch.long)[None]
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
def test_documents_are_compact_arrays_of_eos_the_encoding_and_eos(model_and_tokenizer, texts):
    _, tokenizer = model_and_tokenizer
    from retnet.train.data import document_encoder

    documents = encode(tokenizer, texts, batch=3)  # batches that end mid-list
    eos = tokenizer.eos_token_id
    assert len(documents) == len(texts)
    for text, ids in zip(texts, documents, strict=True):
        assert ids.dtype == np.int32  # not a list of Python ints: 4 bytes a token, not ~36
        assert ids.tolist() == [eos, *document_encoder(tokenizer).encode(text, add_special_tokens=False).ids, eos]


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


def _random_documents(model, tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Documents of exactly ``lengths`` targets: EOS, random ids, EOS."""
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    return [[eos, *torch.randint(0, model.config.vocab_size, (n - 1,), generator=generator).tolist(), eos]
            for n in lengths]


@pytest.mark.parametrize(("segment", "batch", "longest"), [(7, 2, 40), (33, 3, 150), (50, 4, 260), (97, 5, 260),
                                                      (1000, 3, 260)])
def test_refilled_rows_give_the_loss_of_one_document_at_a_time(model_and_tokenizer, texts, segment, batch, longest):
    """A row whose document ended takes the next one from the queue, from a fresh state: the sums are those of
    batch_size=1 (odd lengths and segments, many more documents than rows, some ending mid-segment)."""
    model, tokenizer = model_and_tokenizer
    lengths = torch.randint(1, longest, (19,), generator=torch.Generator().manual_seed(segment)).tolist()
    documents = _random_documents(model, tokenizer, lengths, seed=batch)
    if segment > 30:  # real text too, one document past 256 tokens (the chunkwise form); few forwards at 7
        documents += encode(tokenizer, texts[1:4])
    alone, count = score_documents(model, documents, segment_tokens=segment, batch_size=1)
    together, targets = score_documents(model, documents, segment_tokens=segment, batch_size=batch)
    assert targets == count == sum(len(d) - 1 for d in documents)
    # fp32; the same segments in other packed rows round otherwise (measured ~1e-7)
    assert together / targets == pytest.approx(alone / count, rel=1e-6, abs=1e-6)


def test_a_row_whose_document_ended_takes_the_next_one(model_and_tokenizer, monkeypatch):
    """A long document and five short ones, two rows: the short ones follow each other in the second row
    while the long one runs (10 forwards, not the 12 of refilling only once the whole batch ended), and each
    starts from a fresh state: with the ended document's state and position left in its row, the loss differs."""
    from retnet.train import evaluate as evaluate_module

    model, tokenizer = model_and_tokenizer
    documents = _random_documents(model, tokenizer, [100, 10, 9, 10, 10, 7])
    rows_per_forward: list[int] = []

    def count_rows(module, args, kwargs):
        rows_per_forward.append(len(kwargs["cu_seqlens"]) - 1)

    hook = model.register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        total, targets = score_documents(model, documents, segment_tokens=10, batch_size=2)
    finally:
        hook.remove()
    assert rows_per_forward == [2] * 5 + [1] * 5
    alone, count = score_documents(model, documents, segment_tokens=10, batch_size=1)
    assert targets == count and total == pytest.approx(alone, rel=1e-6)

    monkeypatch.setattr(evaluate_module, "_restart_rows", lambda cache, rows: None)
    leaked, _ = score_documents(model, documents, segment_tokens=10, batch_size=2)
    assert abs(leaked - alone) / count > 1e-3


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
# `python -m retnet.train.evaluate ARGS` of several tests, one after another in one interpreter (importing torch
# and transformers, ~10 CPU-s, dwarfs a micro model's evaluation). Each run as the interpreter runs a module
# (runpy, the module as a fresh __main__, sys.argv[0] its file), its stdout and stderr files of its own; its exit
# status as the interpreter's: SystemExit's code, or 1 after an uncaught exception's traceback.
def reward_model_of(export_dir: Path, path: Path) -> Path:
    """A random one-label sequence classifier of ``export_dir``'s config, with its tokenizer: a reward model."""
    import shutil

    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(export_dir)
    config.num_labels, config.architectures = 1, None
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    for file in export_dir.iterdir():
        if file.name.startswith("tokenizer") or file.name.startswith("special_tokens"):
            shutil.copy(file, path / file.name)
    return path


@pytest.fixture(scope="module")
def python_m_evaluate(export_dir, texts, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The module's ``python -m retnet.train.evaluate`` runs in one process (``RUN_EACH``), each as
    ``subprocess.run`` returns a process: ``bad_pairs``, a reward model over a pair whose chosen and rejected
    completions are the same (first: the interpreter as fresh as a process of its own), then ``json``, the micro
    model's loss over the documents."""
    root = tmp_path_factory.mktemp("python-m")
    pairs = root / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": " same", "rejected": " same"}) + "\n")
    documents = root / "docs.jsonl"  # as the jsonl fixture writes it: an empty row is no document
    documents.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*texts[:4], "", *texts[4:]]))
    argvs = {
        "bad_pairs": ["--model", str(reward_model_of(export_dir, root / "rm")), "--dataset", str(pairs),
                      "--no-progress", "--device", "cpu"],
        "json": ["--model", str(export_dir), "--dataset", str(documents), "--segment-tokens", "97", "--batch-size",
                 "3", "--device", "cpu", "--cache-dir", str(root / "cache"), "--json"],
    }
    runs = [[["-m", "retnet.train.evaluate"], argv, str(root / name)] for name, argv in argvs.items()]
    for _, _, logs in runs:
        Path(logs).mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.run([sys.executable, "-c", RUN_EACH, json.dumps(runs)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    # a run its process did not finish: the process's own output says why
    return {name: logged_run(argv, root / name) or subprocess.CompletedProcess(argv, -1, process.stdout,
                                                                                process.stderr)
            for name, argv in argvs.items()}


def test_cli_subprocess_json_matches_direct_computation(python_m_evaluate, export_dir, texts):
    done = python_m_evaluate["json"]
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


def test_python_m_evaluate_reports_a_reward_models_bad_pairs_as_an_error(python_m_evaluate):
    # Under `python -m retnet.train.evaluate` the module is __main__, and evaluate_reward raised the EvalError of
    # a second copy of it, which main's `except EvalError` did not catch: a traceback and status 1. Not in this
    # process: here the modules other tests imported would hold yet another copy's class (python_m_evaluate).
    done = python_m_evaluate["bad_pairs"]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "chosen and rejected completions are the same" in done.stderr and "Traceback" not in done.stderr


def test_csv_text_cells_are_read_as_written(export_dir, tmp_path, capsys):
    """A CSV text column whose cells look like numbers or NA ("007", "1e5", "NaN", "NA") is scored as written,
    as training reads it: pandas' inference made them 7, 100000.0 and NaN, or refused the column as float. An
    empty cell is no document."""
    import csv

    from retnet.train.evaluate import read_documents

    cells = ["007", "1e5", "NaN", "", "NA", "def f(x):\n    return x, 'a, b'\n"]
    path = tmp_path / "docs.csv"
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([["id", "text"], *([i, cell] for i, cell in enumerate(cells))])
    expected = [cell for cell in cells if cell]
    assert read_documents(str(path), cache_dir=tmp_path / "cache") == expected
    assert main(["--model", str(export_dir), "--dataset", str(path), "--device", "cpu", "--json", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    record = json.loads(capsys.readouterr().out)
    _, count = direct_loss(export_dir, expected)
    assert record["documents"] == len(expected) and record["tokens"] == count


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
    # (retnet.extras' retnet_eval: this module's main, once this module's import is past, see there)
    called = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[main.__module__], "main", lambda argv=None: called.append(argv) or 0)
        assert getattr(importlib.import_module(module), name)(["--no-progress"]) == 0
    assert called == [["--no-progress"]]


# ----------------------------------------------------------------------------------------------------------
# Refusals: exit status 2, the option named
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "named"), [
    (["--segment-tokens", "0"], "--segment-tokens"),
    (["--segment-tokens", "-3"], "--segment-tokens"),
    (["--segment-tokens", "many"], "--segment-tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", str(2**63)], "--batch-size"),  # (past what itertools.islice takes: a traceback)
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
    assert "no such directory" in capsys.readouterr().err
    assert run_main(["--model", "acme/not-cached", "--dataset", str(jsonl)]) == EXIT_USAGE  # the suite is offline
    assert "'acme/not-cached': no such directory, and the hub could not provide it" in capsys.readouterr().err
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


# ----------------------------------------------------------------------------------------------------------
# Loss by position in the document (--position-edges)
# ----------------------------------------------------------------------------------------------------------
def test_losses_by_position_equal_a_full_forwards_per_token_losses(model_and_tokenizer, texts):
    """Segments that cut documents and rows refilled by the next document: each bucket's loss is the mean of
    the full forward's per-token losses at those positions, and the buckets add up to the whole."""
    model, tokenizer = model_and_tokenizer
    documents = encode(tokenizer, texts)
    edges = [16, 100, 333]
    sums, counts = [0.0] * 4, [0] * 4
    with torch.no_grad():
        for ids in documents:
            row = torch.as_tensor(ids, dtype=torch.long)[None]
            losses = torch.nn.functional.cross_entropy(model(input_ids=row[:, :-1]).logits[0].float(), row[0, 1:],
                                                       reduction="none")
            for position, loss in enumerate(losses.tolist()):
                bucket = sum(position >= e for e in edges)
                sums[bucket] += loss
                counts[bucket] += 1
    result = evaluate(model, documents, segment_tokens=41, batch_size=3, position_edges=edges)
    assert [(r["start"], r["end"]) for r in result.by_position] == [(0, 16), (16, 100), (100, 333), (333, None)]
    assert [r["tokens"] for r in result.by_position] == counts and all(counts)
    for row, total, count in zip(result.by_position, sums, counts):
        assert row["loss"] == pytest.approx(total / count, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    weighted = sum(r["loss"] * r["tokens"] for r in result.by_position) / result.tokens
    assert weighted == pytest.approx(result.loss, rel=1e-9)
    assert evaluate(model, documents, segment_tokens=41, batch_size=3).by_position is None


def test_cli_position_edges(export_dir, jsonl, tmp_path, capsys):
    common = ["--model", str(export_dir), "--dataset", str(jsonl), "--no-progress", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache")]
    assert run_main([*common, "--position-edges", "8,64", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["start"], r["end"]) for r in record["by_position"]] == [(0, 8), (8, 64), (64, None)]
    assert sum(r["tokens"] for r in record["by_position"]) == record["tokens"]
    assert run_main([*common, "--position-edges", "8,64"]) == 0
    assert "positions          [64, ∞)" in capsys.readouterr().out
    for bad in ("64,8", "0,8", "8,8", "eight", ""):
        assert run_main([*common, "--position-edges", bad]) == EXIT_USAGE
        assert "--position-edges" in capsys.readouterr().err


def test_cli_a_hub_id_evaluates_its_cached_snapshot(export_dir, jsonl, tmp_path, hub_cache, capsys):
    hub_cache("acme/retnet-micro", export_dir)
    records = []
    for model in (str(export_dir), "acme/retnet-micro"):
        assert run_main(["--model", model, "--dataset", str(jsonl), "--no-progress", "--device", "cpu",
                         "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
        records.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert records[1]["loss"] == records[0]["loss"] and records[1]["tokens"] == records[0]["tokens"] > 0


def test_a_peft_adapter_directory_is_refused_pointing_to_the_merged_export(tmp_path, jsonl, capsys):
    # what a LoRA run writes to export/adapter: peft's adapter alone, which retnet-eval cannot score without its base
    adapter = tmp_path / "export" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/b"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert run_main(["--model", str(adapter), "--dataset", str(jsonl)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is a peft adapter (adapter_config.json)" in err and repr(str(tmp_path / "export")) in err


def test_cli_output_closed_by_its_reader_is_one_line(export_dir, jsonl, tmp_path, capsys, monkeypatch):
    """``retnet-eval ... | head -1``: the lines left in stdout's buffer were flushed by Python at exit, into the closed
    pipe: "Exception ignored ... BrokenPipeError" and status 120 (a traceback with PYTHONUNBUFFERED set)."""
    from tests.launch import run_into_a_closed_pipe

    status = run_into_a_closed_pipe(main, ["--model", str(export_dir), "--dataset", str(jsonl), "--no-progress",
                                           "--device", "cpu", "--max-documents", "2", "--position-edges", "8",
                                           "--cache-dir", str(tmp_path / "cache")], monkeypatch)
    assert status == 1
    assert "the output was closed by its reader (broken pipe)" in capsys.readouterr().err


def test_cli_with_stdout_closed_is_its_usual_one_line(tmp_path, capsys, monkeypatch):
    """``retnet-eval ... >&-``: Python's stdout is None, which the flush before exit took for a stream (an
    AttributeError traceback, status 1, in place of the usage error and its status 2)."""
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["--model", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "no such directory" in capsys.readouterr().err
