"""Data: the embedded corpus, local files, packing and the per-rank sharding of the global batch."""

import dataclasses
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import (
    PackedData,
    build_data,
    local_files,
    packed_segments,
    split_documents,
    stdlib_files,
)


def test_stdlib_corpus_is_deterministic_and_local():
    files = stdlib_files()
    assert len(files) > 200 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        local_files(str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.xyz").write_text("x")
    with pytest.raises(ConfigError, match=r"\.xyz"):
        local_files(str(tmp_path / "a.xyz"))
    assert local_files("someone/some-dataset") is None  # a hub name


def test_split_holds_out_documents():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 10 and set(train) | set(val) == set(docs) and not set(train) & set(val)
    assert split_documents(docs, 0.1) == (train, val)


def _packed(rank, world, micro, global_batch):
    blocks = np.arange(40 * 4, dtype=np.uint16).reshape(40, 4)
    return PackedData(blocks, blocks[:8], None, seed=3, micro_batch=micro, global_batch=global_batch, rank=rank,
                      world_size=world)


def test_global_batch_is_the_same_set_for_any_world_size():
    single = _packed(0, 1, 2, 8)
    ranks = [_packed(r, 2, 2, 8) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (40 blocks)
        whole = torch.cat(single.micro_batches(4))
        shards = torch.cat([torch.cat(r.micro_batches(2)) for r in ranks])
        assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, shards.tolist()))
    assert single.state_dict() == {"kind": "packed", "consumed": 56}


def test_position_resumes_exactly():
    a, b = _packed(0, 1, 2, 4), _packed(0, 1, 2, 4)
    for _ in range(5):
        a.micro_batches(2)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.micro_batches(2), b.micro_batches(2)))


def test_build_from_jsonl_caches_tokens(corpus, tokenizer_dir, tmp_path):
    config = DataConfig(dataset=str(corpus), tokenizer=str(tokenizer_dir), seq_len=32, cache_dir=str(tmp_path))
    kwargs = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
                  tokenizer_dir=None, barrier=lambda: None)
    data = build_data(config, **kwargs)
    assert data.train.shape[1] == 32 and len(data.val) > 0
    eos = data.tokenizer.eos_token_id
    assert (np.asarray(data.train) == eos).sum() > 50  # documents separated by EOS
    caches = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tokens-"))
    again = build_data(config, **kwargs)  # read back from the cache, same key
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tokens-")) == caches
    assert np.array_equal(np.asarray(again.train), np.asarray(data.train))
    other = build_data(DataConfig(dataset=str(corpus), tokenizer=str(tokenizer_dir), seq_len=16,
                                  cache_dir=str(tmp_path)), **kwargs)
    assert other.train.shape[1] == 16 and len(list(tmp_path.glob("tokens-*"))) == 2


def test_save_to_disk_directory_gives_the_same_blocks_as_its_jsonl(corpus, tokenizer_dir, tmp_path):
    """A ``DatasetDict.save_to_disk`` directory (split picked by data.split) trains on exactly the blocks the
    same documents give as JSONL, streamed too; a missing split names the ones there are."""
    import json

    import datasets

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": texts[:3]})}).save_to_disk(str(saved))
    kwargs = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
                  tokenizer_dir=None, barrier=lambda: None)
    common = dict(tokenizer=str(tokenizer_dir), seq_len=32, cache_dir=str(tmp_path / "cache"))
    from_jsonl = build_data(DataConfig(dataset=str(corpus), **common), **kwargs)
    from_disk = build_data(DataConfig(dataset=str(saved), **common), **kwargs)
    assert np.array_equal(np.asarray(from_disk.train), np.asarray(from_jsonl.train))
    assert np.array_equal(np.asarray(from_disk.val), np.asarray(from_jsonl.val))

    streamed = build_data(DataConfig(dataset=str(saved), streaming=True, val_documents=5, **common), **kwargs)
    assert streamed.micro_batches(2)[0].shape == (2, 32)
    with pytest.raises(ConfigError, match=r"data\.split 'validation'.*'test', 'train'"):
        build_data(DataConfig(dataset=str(saved), split="validation", **common), **kwargs)


def test_streaming_validation_shorter_than_a_block_is_refused(tokenizer_dir, tmp_path):
    """Otherwise the first evaluation fails with an IndexError on the empty validation array."""
    import json

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["tiny", *["def f(x):\n    return x\n" * 30] * 5]))
    config = DataConfig(dataset=str(docs), tokenizer=str(tokenizer_dir), seq_len=32, streaming=True, val_documents=1,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.val_documents"):
        build_data(config, vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
                   tokenizer_dir=None, barrier=lambda: None)


def test_streaming_ranks_hold_out_the_validation_documents(tokenizer_dir, tmp_path):
    """Two ranks streaming two files: the first data.val_documents documents are the
    validation split for every world size, so no rank trains on them and no rank drops other documents."""
    import json

    docs = [f"document {i}: " + "def f(x):\n    return x\n" * 5 for i in range(40)]
    for part in range(2):
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                            for t in docs[20 * part:20 * (part + 1)]))
    config = DataConfig(dataset=str(tmp_path / "*.jsonl"), tokenizer=str(tokenizer_dir), seq_len=32, streaming=True,
                        val_documents=6, cache_dir=str(tmp_path / "cache"))
    trained = []
    for rank in range(2):
        data = build_data(config, vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=rank, local_rank=rank,
                          world_size=2, tokenizer_dir=None, barrier=lambda: None)
        trained += [example["text"] for example in data.stream]
    assert sorted(trained) == sorted(docs[6:])


def test_packed_segments_isolate_documents():
    """The packed loss equals the loss of every document run on its own, and differs from letting the
    state run across EOS (so the test would notice a leak)."""
    from retnet.model import RetNetConfig, RetNetForCausalLM

    torch.manual_seed(0)
    eos, length = 0, 23
    model = RetNetForCausalLM(RetNetConfig.from_preset("tiny", vocab_size=50, eos_token_id=eos)).eval()
    blocks = torch.randint(1, 50, (3, length))
    blocks[0, [5, 6, 17]] = eos  # two documents end in block 0 (one of them empty), one in block 2
    blocks[2, 0] = eos
    inputs = packed_segments(blocks.clone(), eos)
    assert inputs["cu_seqlens"].tolist() == [0, 5, 6, 17, 23, 46, 69]

    total, count = 0.0, 0
    for start, end in zip(inputs["cu_seqlens"][:-1].tolist(), inputs["cu_seqlens"][1:].tolist(), strict=True):
        row, col = divmod(start, length)
        segment = blocks[row, col:col + end - start]
        logits = model(input_ids=segment[None]).logits[0].double()
        # a segment's last position predicts the next token of the same block (the EOS that opens the next
        # document), never the first token of the next block
        targets = blocks[row, col + 1:col + end - start + 1]
        logits = logits[: len(targets)]
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    with torch.no_grad():
        packed = model(**inputs).loss.item()
        leaky = model(input_ids=blocks, labels=blocks).loss.item()
    assert count == 3 * (length - 1)
    assert packed == pytest.approx(total / count, rel=1e-5)
    assert abs(leaky - packed) > 1e-4


def test_a_resumed_run_finds_the_token_cache_of_its_trained_tokenizer(corpus, tmp_path):
    """A run without data.tokenizer trains a BPE and saves it in its output_dir; its resume loads that copy.
    The token cache is keyed by the tokenizer itself, so the resume reads the first run's cache instead of
    tokenizing the whole dataset again into a second copy."""
    config = DataConfig(dataset=str(corpus), seq_len=32, cache_dir=str(tmp_path / "cache"),
                        tokenizer_train_chars=20_000)
    kwargs = dict(vocab_size=300, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
                  barrier=lambda: None)
    first = build_data(config, tokenizer_dir=None, **kwargs)
    first.tokenizer.save_pretrained(tmp_path / "run" / "tokenizer")  # what the trainer keeps for its resumes
    caches = sorted(p.name for p in (tmp_path / "cache").glob("tokens-*"))
    assert len(caches) == 1
    resumed = build_data(config, tokenizer_dir=tmp_path / "run" / "tokenizer", **kwargs)
    assert sorted(p.name for p in (tmp_path / "cache").glob("tokens-*")) == caches
    assert np.array_equal(np.asarray(resumed.train), np.asarray(first.train))


def _tokenizer_with_an_id_gap(source, target):
    """A copy of the BPE at ``source`` whose last merge has id 900: 512 tokens, ids up to 900."""
    import json
    import shutil

    shutil.copytree(source, target)
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 900
    (target / "tokenizer.json").write_text(json.dumps(spec))
    return target


def test_vocab_bound_covers_ids_beyond_the_tokenizer_length(tokenizer_dir, tmp_path):
    from retnet.train.data import encode_documents, load_tokenizer, vocab_bound

    normal = load_tokenizer(tokenizer_dir)
    assert vocab_bound(normal) == len(normal) == 512
    gappy = load_tokenizer(_tokenizer_with_an_id_gap(tokenizer_dir, tmp_path / "tok"))
    assert len(gappy) == 512 and vocab_bound(gappy) == 901
    ids = encode_documents(gappy, ["for example, a simple sample"])
    assert ids.max() == 900


# ----------------------------------------------------------------------------------------------------------
# Inputs a user may hand over: names, odd files, odd values
# ----------------------------------------------------------------------------------------------------------
_BUILD = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)
_DOCS = [f"document {i}: " + "def f(x):\n    return x + 1\n" * 4 for i in range(30)]


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_hub_names_with_a_dot_are_not_paths(tmp_path):
    """Hub names may hold dots (``teknium/OpenHermes-2.5``); one taken for a missing file could never load."""
    assert local_files("teknium/OpenHermes-2.5") is None
    with pytest.raises(FileNotFoundError, match=r"v1\.2"):
        local_files(str(tmp_path / "corpus" / "v1.2"))


def test_upper_case_suffixes_are_data_files(tokenizer_dir, tmp_path):
    for i, text in enumerate(_DOCS[:3]):
        (tmp_path / "dir").mkdir(exist_ok=True)
        (tmp_path / "dir" / f"{i}.TXT").write_text(text)
    assert [p.name for p in local_files(str(tmp_path / "dir"))] == ["0.TXT", "1.TXT", "2.TXT"]
    path = _jsonl(tmp_path / "DOCS.JSONL", [{"text": t} for t in _DOCS])
    data = build_data(DataConfig(dataset=str(path), tokenizer=str(tokenizer_dir), seq_len=16, val_fraction=0.2,
                                 cache_dir=str(tmp_path / "cache")), **_BUILD)
    assert len(data.train) > 0


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("case", ["all files empty", "first file lacks the field"])
def test_files_datasets_cannot_read_are_a_config_error_naming_them(case, streaming, tokenizer_dir, tmp_path):
    """datasets infers one schema from the first rows it reads: an empty set fails with a bare StopIteration,
    a first file without the text with a CastError that names neither file nor setting."""
    first, second = {
        "all files empty": ([], []),
        "first file lacks the field": ([{"id": 1}], [{"text": t, "id": 2} for t in _DOCS]),
    }[case]
    _jsonl(tmp_path / "a.jsonl", first)
    _jsonl(tmp_path / "b.jsonl", second)
    config = DataConfig(dataset=str(tmp_path / "*.jsonl"), tokenizer=str(tokenizer_dir), seq_len=16,
                        streaming=streaming, val_documents=3, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.(dataset|text_field) .*\*\.jsonl"):
        build_data(config, **_BUILD)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("value", [12345, ["a list of", "strings"]])
def test_text_values_that_are_not_strings_are_refused_by_name(value, streaming, tokenizer_dir, tmp_path):
    """A number or a list in JSON would otherwise reach the tokenizer: TypeError 'TextEncodeInput'. (CSV cells
    are text: test_csv_text_cells_are_documents_as_written.)"""
    path = _jsonl(tmp_path / "docs.jsonl", [{"body": value}] * 20)
    config = DataConfig(dataset=str(path), text_field="body", tokenizer=str(tokenizer_dir), seq_len=16,
                        streaming=streaming, val_documents=3, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=rf"data\.text_field 'body'.*{type(value).__name__}"):
        data = build_data(config, **_BUILD)
        data.micro_batches(1)


def test_text_files_that_are_not_utf8_are_read_like_the_stdlib_corpus(tokenizer_dir, tmp_path):
    """Invalid UTF-8 is replaced (U+FFFD), as the stdlib corpus reads it, instead of stopping with
    ``DatasetGenerationError: An error occurred while generating the dataset``."""
    from retnet.train.data import load_documents

    for i, text in enumerate(_DOCS[:5]):
        (tmp_path / f"{i}.txt").write_text(text)
    (tmp_path / "latin1.txt").write_bytes("café crème ".encode("latin-1") * 10)
    config = DataConfig(dataset=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    docs = load_documents(config, local_files(config.dataset), tmp_path / "cache")
    assert "caf\ufffd cr\ufffdme " * 10 in docs and len(docs) == 6


def test_special_token_text_inside_a_document_is_not_a_document_boundary(tokenizer_dir, tmp_path):
    """A document quoting ``<|endoftext|>`` (GPT-2 code, posts about tokenizers) keeps it as text: only the EOS
    appended after each document ends one, so the state is not reset mid-document and no EOS is learnt there."""
    import datasets

    from retnet.train.data import encode_documents, load_tokenizer
    from retnet.train.streaming import StreamingData

    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id
    docs = ["x = '<|endoftext|>'  # GPT-2's separator", "<|endoftext|>", "print(1)"]
    ids = encode_documents(tokenizer, docs)
    assert (ids == eos).sum() == len(docs) and ids[-1] == eos
    assert tokenizer.decode(ids[: list(ids).index(eos)]) == docs[0]

    stream = datasets.Dataset.from_dict({"text": docs * 20}).to_iterable_dataset()
    val = np.zeros((1, 16), dtype=np.int64)
    streamed = StreamingData(stream, val, tokenizer, text_field="text", seq_len=16, micro_batch=4, rank=0,
                             world_size=1)
    blocks = torch.cat(streamed.micro_batches(3)).flatten()
    assert torch.equal(blocks, torch.from_numpy(np.tile(ids, 20)[: blocks.numel()].astype(np.int64)))


def test_empty_stdlib_files_are_no_documents(tmp_path, monkeypatch):
    """The stdlib has empty files (``__init__.py``); as documents they would be lone EOS tokens, which the
    other sources drop."""
    import retnet.train.data as data

    files = []
    for i, text in enumerate(["", "import os\n", "", "x = 1\n"]):
        files.append(tmp_path / f"m{i}.py")
        files[-1].write_text(text)
    monkeypatch.setattr(data, "stdlib_files", lambda: files)
    assert data.load_documents(DataConfig(dataset="stdlib"), files, tmp_path) == ["import os\n", "x = 1\n"]


def test_cache_writers_with_the_same_pid_do_not_share_a_temp_directory(tmp_path, monkeypatch):
    """Local rank 0 of every node writes the shared cache; in containers their pids are often equal. One
    writer must not delete the other's half-written directory (or publish it)."""
    import os

    from retnet.train.data import _atomic_dir

    monkeypatch.setattr(os, "getpid", lambda: 7)
    final = tmp_path / "tokens-0123"

    def other_node(tmp):
        (tmp / "meta.json").write_text("other")

    def this_node(tmp):
        (tmp / "train.bin").write_bytes(b"\0" * 8)
        _atomic_dir(final, other_node)  # the other node finishes first
        (tmp / "meta.json").write_text("this")

    _atomic_dir(final, this_node)
    assert (final / "meta.json").read_text() == "other"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_a_failed_cache_write_leaves_no_temp_directory(tmp_path):
    from retnet.train.data import _atomic_dir

    def fail(tmp):
        (tmp / "train.bin").write_bytes(b"\0" * 8)
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        _atomic_dir(tmp_path / "tokens-0123", fail)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_saved_dataset_is_a_config_error_naming_it(tokenizer_dir, tmp_path):
    """datasets' load_from_disk fails on an empty Dataset with a bare ``IndexError: list index out of range``."""
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})
                               ).save_to_disk(str(saved))
    config = DataConfig(dataset=str(saved), tokenizer=str(tokenizer_dir), seq_len=16, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"data\.dataset .*saved"):
        build_data(config, **_BUILD)


def test_a_single_text_file_says_how_to_train_on_it(tokenizer_dir, tmp_path):
    """One .txt file (tinyshakespeare's input.txt) is one document, too few for a validation split."""
    (tmp_path / "input.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    config = DataConfig(dataset=str(tmp_path / "input.txt"), tokenizer=str(tokenizer_dir), seq_len=16,
                        cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"1 document.*\.txt file is one document: split"):
        build_data(config, **_BUILD)


def test_truncation_and_padding_saved_with_a_tokenizer_do_not_cut_documents(tokenizer_dir, tmp_path):
    """A tokenizer.json may carry truncation and padding (saved after ``enable_truncation``/``enable_padding``);
    the backend applies them to every encode, so each document became its first 8 tokens plus pad tokens."""
    import json
    import shutil

    from retnet.train.data import encode_documents, load_tokenizer

    docs = ["def f(x):\n    return x + 1\n" * 10, "x"]
    plain = encode_documents(load_tokenizer(tokenizer_dir), docs)
    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                       "pad_type_id": 0, "pad_token": "<|pad|>"}
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    assert np.array_equal(encode_documents(load_tokenizer(tmp_path / "tok"), docs), plain)
    assert len(plain) > 20


def test_a_directory_skips_hidden_files_and_directories(tmp_path):
    """Notebook checkpoints, VCS and CI directories hold copies or unrelated files: read, they duplicate
    documents (``.ipynb_checkpoints/a-checkpoint.txt``) or mix file kinds (``.github/README.md`` beside .txt)."""
    root = tmp_path / ".corpora" / "docs"  # a hidden directory above the one named is not skipped
    for name in ("a.txt", "sub/b.txt", ".ipynb_checkpoints/a-checkpoint.txt", "sub/.ipynb_checkpoints/b.txt",
                 ".git/notes.txt", ".github/README.md", ".hidden.txt", "sub/.draft.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    assert [p.relative_to(root).as_posix() for p in local_files(str(root))] == ["a.txt", "sub/b.txt"]

    only_hidden = tmp_path / "only-hidden"
    (only_hidden / ".git").mkdir(parents=True)
    (only_hidden / ".git" / "x.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no"):
        local_files(str(only_hidden))


def _parquet_repo_builder(path, name=None, **kwargs):
    """The hub's answer for a repository of Parquet files: which builder reads it (no CSV options then)."""
    assert path == "someone/corpus" and not kwargs.keys() - {"cache_dir"}
    return SimpleNamespace(name="parquet")


def test_an_updated_hub_dataset_is_tokenized_again(tokenizer_dir, tmp_path, monkeypatch):
    """A hub name stays the same when its data changes; the cache key must follow the loaded data."""
    import datasets

    old = [t.replace("document", "old document") for t in _DOCS]
    current = {"text": old}
    loads = []

    def load_dataset(path, name=None, **kwargs):  # the hub, offline: whatever revision it holds now
        assert path == "someone/corpus"
        loads.append(path)
        return datasets.Dataset.from_dict(current)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", _parquet_repo_builder)
    config = DataConfig(dataset="someone/corpus", tokenizer=str(tokenizer_dir), seq_len=16, val_fraction=0.2,
                        cache_dir=str(tmp_path))
    first = build_data(config, **_BUILD)
    again = build_data(config, **_BUILD)
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    assert len(list(tmp_path.glob("tokens-*"))) == 1
    current["text"] = [t.replace("document", "new") for t in _DOCS]
    updated = build_data(config, **_BUILD)
    assert len(list(tmp_path.glob("tokens-*"))) == 2
    decoded = updated.tokenizer.decode(np.asarray(updated.train).reshape(-1).tolist())
    assert "new" in decoded and "old" not in decoded
    assert len(loads) == 3  # once per build: the documents are not read a second time


def test_abandoned_cache_temp_directories_are_removed(tokenizer_dir, tmp_path):
    """A writer killed mid-tokenize leaves its temp directory; one as recent as another node's live writer
    must stay."""
    import os
    import time

    cache = tmp_path / "cache"
    abandoned, live = cache / ".tmp-tokens-0123-7-deadbeef", cache / ".tmp-tokens-0123-8-cafef00d"
    for tmp in (abandoned, live):
        tmp.mkdir(parents=True)
        (tmp / "train.bin").write_bytes(b"\0" * 8)
    old = time.time() - 25 * 3600
    for path in (abandoned / "train.bin", abandoned):
        os.utime(path, (old, old))
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _DOCS])
    build_data(DataConfig(dataset=str(path), tokenizer=str(tokenizer_dir), seq_len=16, val_fraction=0.2,
                          cache_dir=str(cache)), **_BUILD)
    assert not abandoned.exists() and (live / "train.bin").exists()


@pytest.mark.parametrize("value", [12345, ["a list of", "strings"], {"a": "dict"}])
def test_streamed_text_values_after_the_validation_rows_are_refused_by_name(value, tokenizer_dir, tmp_path):
    """The held-out filter looks each training text up in a set: a list would fail there as 'unhashable'."""
    path = _jsonl(tmp_path / "docs.jsonl", [{"body": t} for t in _DOCS[:3]] + [{"body": value}] * 5)
    config = DataConfig(dataset=str(path), text_field="body", tokenizer=str(tokenizer_dir), seq_len=16,
                        streaming=True, val_documents=3, cache_dir=str(tmp_path / "cache"))
    # at build, where the stream is checked for a training document, or else at the first batch
    with pytest.raises(ConfigError, match=rf"data\.text_field 'body' of '{path}'.*{type(value).__name__}"):
        build_data(config, **_BUILD).micro_batches(1)


def test_an_updated_streamed_hub_dataset_trains_its_tokenizer_again(tmp_path, monkeypatch):
    """A streamed hub set caches the BPE trained on it: the key must follow the revision streamed (a hub
    dataset's data files are resolved at a commit), as the token cache of a non-streamed one does."""
    import datasets

    revisions = {}
    for name, word in (("rev1", "old"), ("rev2", "new")):
        revisions[name] = _jsonl(tmp_path / f"{name}.jsonl", [{"text": t.replace("document", word)} for t in _DOCS])
    current = {"file": revisions["rev1"]}
    real_builder, real_load = datasets.load_dataset_builder, datasets.load_dataset

    def load_dataset_builder(path, name=None, **kwargs):  # the hub, offline: its files at the current commit
        assert path == "someone/corpus"
        return real_builder("json", data_files=str(current["file"]), cache_dir=kwargs.get("cache_dir"))

    def load_dataset(path, name=None, **kwargs):
        assert path == "someone/corpus" and kwargs.get("streaming")
        return real_load("json", data_files=str(current["file"]), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cache = tmp_path / "cache"
    config = DataConfig(dataset="someone/corpus", streaming=True, seq_len=16, val_documents=3, cache_dir=str(cache))
    build = {**_BUILD, "vocab_size": 300}
    first = build_data(config, **build)
    build_data(config, **build)
    assert len(list(cache.glob("tokenizer-*"))) == 1
    current["file"] = revisions["rev2"]
    updated = build_data(config, **build)
    assert len(list(cache.glob("tokenizer-*"))) == 2
    assert "new" in updated.tokenizer.get_vocab() and "new" not in first.tokenizer.get_vocab()


def test_a_resume_reads_the_hub_data_its_checkpoint_was_trained_on(tokenizer_dir, tmp_path, monkeypatch):
    """Given the fingerprint of the hub data its checkpoint was trained on, a resume finds the token cache
    without loading the set (offline, no HF cache); where that cache is gone and the hub holds other data, it
    is refused, not trained on from the checkpoint's position."""
    import datasets

    current = {"text": list(_DOCS)}

    def load_dataset(path, name=None, **kwargs):
        assert path == "someone/corpus"
        if current is None:
            raise ConnectionError("offline and not in the HF cache")
        return datasets.Dataset.from_dict(current)

    def load_dataset_builder(path, name=None, **kwargs):
        if current is None:
            raise ConnectionError("offline and not in the HF cache")
        return _parquet_repo_builder(path, name, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    config = DataConfig(dataset="someone/corpus", tokenizer=str(tokenizer_dir), seq_len=16, val_fraction=0.2,
                        cache_dir=str(tmp_path))
    first = build_data(config, **_BUILD)
    assert first.hub_fingerprint
    current = None
    resumed = build_data(config, **_BUILD, hub_fingerprint=first.hub_fingerprint)
    assert np.array_equal(np.asarray(resumed.train), np.asarray(first.train))
    assert resumed.hub_fingerprint == first.hub_fingerprint
    for cache in tmp_path.glob("tokens-*"):
        shutil.rmtree(cache)
    current = {"text": [t.replace("document", "new") for t in _DOCS]}
    with pytest.raises(ConfigError, match=r"data\.dataset 'someone/corpus' now holds other data than the checkpoint"):
        build_data(config, **_BUILD, hub_fingerprint=first.hub_fingerprint)
    current = {"text": list(_DOCS)}  # the same data again: its cache is rebuilt
    again = build_data(config, **_BUILD, hub_fingerprint=first.hub_fingerprint)
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))


def test_a_saved_dataset_streams_the_same_rank_split_on_any_machine(tokenizer_dir, tmp_path, monkeypatch):
    """Each rank's stream must not depend on the machine's CPU count: nodes with other counts would read
    overlapping parts, and a resume on another machine would skip blocks of other documents."""
    import os

    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": _DOCS}).save_to_disk(str(saved))
    config = DataConfig(dataset=str(saved), tokenizer=str(tokenizer_dir), seq_len=16, streaming=True,
                        val_documents=3, cache_dir=str(tmp_path / "cache"))
    streams = []
    for cpus in (2, 3):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        streams.append([[e["text"] for e in build_data(config, **{**_BUILD, "rank": rank, "world_size": 2}).stream]
                        for rank in range(2)])
    assert streams[0] == streams[1]
    assert sorted(streams[0][0] + streams[0][1]) == sorted(_DOCS[3:])


def test_streamed_ranks_share_the_first_max_documents(tokenizer_dir, tmp_path):
    """data.max_documents of a stream is its first N documents for any world size. datasets splits a take(N)
    between the ranks' whole shards: each rank took N / 2 of its own file, so two ranks trained on other
    documents than one, and a rank whose share was all validation documents had none to train on."""
    import json

    docs = [f"document {i}: " + "def f(x):\n    return x\n" * 5 for i in range(40)]
    for part in range(2):
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                            for t in docs[20 * part:20 * (part + 1)]))
    for val_documents in (6, 15):
        config = DataConfig(dataset=str(tmp_path / "*.jsonl"), tokenizer=str(tokenizer_dir), seq_len=32,
                            streaming=True, val_documents=val_documents, max_documents=30,
                            cache_dir=str(tmp_path / "cache"))
        trained = []
        for rank in range(2):
            data = build_data(config, **{**_BUILD, "rank": rank, "local_rank": rank, "world_size": 2})
            trained += [example["text"] for example in data.stream]
            assert data.micro_batches(1)[0].shape == (2, 32)
        assert sorted(trained) == sorted(docs[val_documents:30])


def test_a_tokenizer_path_that_holds_no_tokenizer_is_refused_by_name(tokenizer_dir, tmp_path):
    """data.tokenizer is a directory: its tokenizer.json given instead went to the hub as a model name (network
    retries, then an unrelated 'no EOS token'), and a directory without a tokenizer was a bare traceback."""
    from retnet.train.data import load_tokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    other = _jsonl(tmp_path / "docs.jsonl", [{"text": "x"}])
    for path, problem in ((tokenizer_dir / "tokenizer.json", "not a directory"), (other, "not a directory"),
                          (empty, "could not be loaded")):
        with pytest.raises(ConfigError, match=rf"data\.tokenizer '{path}'.*{problem}"):
            load_tokenizer(path)
    assert load_tokenizer(tokenizer_dir).eos_token_id is not None


class _CountingEncoder:
    """A document encoder that counts the documents it encodes (``encode``: one call per streamed document)."""

    def __init__(self, inner, counter: list[int]):
        self._inner, self._counter = inner, counter

    def encode(self, *args, **kwargs):
        self._counter[0] += 1
        return self._inner.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _count_encodes(monkeypatch) -> list[int]:
    from retnet.train import data as data_module
    from retnet.train import streaming as streaming_module

    counter, real = [0], data_module.document_encoder
    for module in (data_module, streaming_module):  # the cached path's and the streamed path's
        monkeypatch.setattr(module, "document_encoder", lambda tokenizer: _CountingEncoder(real(tokenizer), counter))
    return counter


# Of many lengths (a block ends inside a document, or holds several), two empty: skipped, but counted in the stream
_VARIED = [("" if i in (4, 11) else f"doc {i}: " + "x = [1, 2]\n" * (1 + i % 7)) for i in range(40)]


def _streamed(tmp_path, tokenizer_dir, files: int, world_size: int):
    import json

    for part in range(files):
        rows = _VARIED[part::files]
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    config = DataConfig(dataset=str(tmp_path / "*.jsonl"), tokenizer=str(tokenizer_dir), seq_len=16, streaming=True,
                        val_documents=3, cache_dir=str(tmp_path / "cache"))
    return lambda rank: build_data(config, **{**_BUILD, "rank": rank, "local_rank": rank, "world_size": world_size})


def _checkpointed(state: dict) -> dict:
    """``state`` as a resume reads it back: through torch.save and torch.load, as trainer.pt."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("files,world_size", [(1, 1), (1, 2), (2, 2)],
                         ids=["one-rank", "two-ranks-one-file", "two-ranks-a-file-each"])
def test_a_streamed_resume_tokenizes_no_document_read_before(files, world_size, tokenizer_dir, tmp_path,
                                                            monkeypatch):
    """A streamed resume continues from its checkpoint's place in the stream: the same blocks as a run never
    stopped, across epochs, and only the documents after that place are tokenized (regenerating the
    consumed blocks to find the place took hours after billions of tokens)."""
    counter = _count_encodes(monkeypatch)
    build = _streamed(tmp_path, tokenizer_dir, files, world_size)
    total = 200  # several epochs of each rank's stream
    for rank in range(world_size):
        whole = build(rank)
        encoded = []  # documents tokenized before each block was returned
        blocks = []
        for _ in range(total):
            blocks.append(whole._next_block())
            encoded.append(counter[0])
        assert whole.state_dict()["epoch"] >= 2
        for cut in (1, 9, 70, 150, 199):
            first = build(rank)
            for _ in range(cut):
                first._next_block()
            state = _checkpointed(first.state_dict())
            resumed = build(rank)
            resumed.load_state_dict(state)
            counter[0] = 0
            rest = [resumed._next_block() for _ in range(total - cut)]
            assert all(np.array_equal(a, b) for a, b in zip(rest, blocks[cut:], strict=True)), (rank, cut)
            assert counter[0] == encoded[-1] - encoded[cut - 1], (rank, cut)
            assert resumed.state_dict()["position"] == total


@pytest.mark.parametrize("written_by", ["blocks-only", "another-datasets"])
def test_streamed_checkpoints_without_a_usable_stream_state_resume_the_same_blocks(written_by, tokenizer_dir,
                                                                                   tmp_path, monkeypatch):
    """A checkpoint written before the stream's place was saved (only the number of blocks read) regenerates
    those blocks, as it was written to be resumed; one whose ``datasets`` state is of another version (a format
    of its own) skips the documents it read by counting them: read again, but not tokenized."""
    counter = _count_encodes(monkeypatch)
    build = _streamed(tmp_path, tokenizer_dir, 1, 1)
    whole = build(0)
    blocks, encoded = [], []
    for _ in range(60):
        blocks.append(whole._next_block())
        encoded.append(counter[0])
    first = build(0)
    for _ in range(25):
        first._next_block()
    state = _checkpointed(first.state_dict())
    if written_by == "blocks-only":
        state = {"kind": "streaming", "position": 25}
    else:
        state["datasets_version"] = "0.0.1"
    resumed = build(0)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["position"] == 25  # saved again before a block is read: the same place
    counter[0] = 0
    rest = [resumed._next_block() for _ in range(35)]
    assert all(np.array_equal(a, b) for a, b in zip(rest, blocks[25:], strict=True))
    replayed = encoded[24] if written_by == "blocks-only" else 0
    assert counter[0] == replayed + encoded[-1] - encoded[24]
    assert {k: v for k, v in resumed.state_dict().items() if k != "buffer"} == \
        {k: v for k, v in whole.state_dict().items() if k != "buffer"}
    assert np.array_equal(resumed.state_dict()["buffer"], whole.state_dict()["buffer"])


def test_a_stream_without_training_documents_is_refused_naming_the_setting(tokenizer_dir, tmp_path):
    """data.val_documents holding out the whole stream was found only at the first step, as a ConfigError
    naming the IterableDataset's repr; now at build, naming data.dataset and data.val_documents. A rank whose
    part of the stream is empty names itself."""
    import json

    docs = tmp_path / "docs.jsonl"
    texts = [f"document {i}: " + "def f(x):\n    return x\n" * 20 for i in range(6)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*texts, ""]))
    kwargs = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
                  tokenizer_dir=None, barrier=lambda: None)
    config = DataConfig(dataset=str(docs), tokenizer=str(tokenizer_dir), seq_len=32, streaming=True,
                        val_documents=6, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.dataset '.*docs\.jsonl'.*data\.val_documents \(6\)") as error:
        build_data(config, **kwargs)
    assert "IterableDataset" not in str(error.value)

    config = DataConfig(dataset=str(docs), tokenizer=str(tokenizer_dir), seq_len=32, streaming=True,
                        val_documents=5, cache_dir=str(tmp_path / "cache"))
    ranks = [build_data(config, **{**kwargs, "rank": rank, "world_size": 2}) for rank in range(2)]
    counts = []
    for data in ranks:
        try:
            data.micro_batches(1)
            counts.append(True)
        except ConfigError as error:
            assert re.search(rf"docs\.jsonl'.*rank {data.rank} of 2", str(error)), error
            assert "IterableDataset" not in str(error)
            counts.append(False)
    assert counts.count(False) == 1  # one training document: one rank has none


def test_the_token_cache_ignores_the_validation_setting_of_the_other_mode(tokenizer_dir, corpus, tmp_path,
                                                                          monkeypatch):
    """data.val_documents selects nothing without data.streaming (and a resume may change it): the same
    documents, split by data.val_fraction, must find their token cache, not be read and tokenized again."""
    from retnet.train import data as data_module

    kwargs = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
                  tokenizer_dir=None, barrier=lambda: None)
    common = dict(dataset=str(corpus), tokenizer=str(tokenizer_dir), seq_len=32, cache_dir=str(tmp_path))
    first = build_data(DataConfig(**common, val_documents=200), **kwargs)

    def no_reading(*args, **kw):
        raise AssertionError("the token cache was not reused")

    monkeypatch.setattr(data_module, "load_documents", no_reading)
    again = build_data(DataConfig(**common, val_documents=5), **kwargs)
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    assert len(list(tmp_path.glob("tokens-*"))) == 1


def test_streamed_packing_is_linear_in_a_long_documents_length(tokenizer_dir, tmp_path):
    """Each block was deleted from the front of the buffer holding the rest of its document, moving all of it:
    a document of n tokens cost n²/seq_len moves (minutes for a book-length one at a short seq_len). The blocks
    and the saved buffer are unchanged."""
    import json

    class Moves(list):
        moved = 0

        def __delitem__(self, index):
            if isinstance(index, slice):
                Moves.moved += len(self) - len(range(*index.indices(len(self))))
            super().__delitem__(index)

    long = "def f(x):\n    return x\n" * 4000
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["held out " * 40, long, "short " * 30, long]))
    config = DataConfig(dataset=str(docs), tokenizer=str(tokenizer_dir), seq_len=16, streaming=True,
                        val_documents=1, cache_dir=str(tmp_path / "cache"))
    data = build_data(config, vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0,
                      world_size=1, tokenizer_dir=None, barrier=lambda: None)
    tokens = [len(data._encoder.encode(t).ids) + 1 for t in (long, "short " * 30, long)]
    expected = np.concatenate([[*data._encoder.encode(t).ids, data.tokenizer.eos_token_id]
                               for t in (long, "short " * 30, long)])
    data._buffer = Moves()
    blocks = [data._next_block() for _ in range(sum(tokens) // 16 - 1)]
    assert np.array_equal(np.concatenate(blocks), expected[: len(blocks) * 16])
    assert np.array_equal(data.state_dict()["buffer"], expected[len(blocks) * 16: sum(tokens[:3])])
    assert Moves.moved <= 2 * sum(tokens), (Moves.moved, sum(tokens))


def test_the_cache_keys_of_runs_that_left_the_other_modes_setting_alone_are_kept():
    """Ignoring the other mode's validation setting must not move the caches of runs that kept its default: a
    hub run's resume reads its cache without loading the set, which may be gone."""
    from retnet.train.data import CACHE_VERSION, _hash, data_fingerprint

    for config in (DataConfig(dataset="someone/set", val_fraction=0.1),
                   DataConfig(dataset="someone/set", streaming=True, val_documents=50)):
        settings = {k: getattr(config, k) for k in ("dataset", "name", "split", "text_field", "streaming",
                                                    "max_documents", "val_fraction", "val_documents")}
        assert data_fingerprint(config, None, "abc") == _hash(CACHE_VERSION, settings, "abc")


def test_too_few_documents_name_the_dataset_and_the_max_documents_that_left_them(corpus, tokenizer_dir, tmp_path):
    """data.max_documents=1 on a corpus of 150 rows was blamed on the data ('data.dataset has 1 document(s) ...
    a .txt file is one document'), naming neither the dataset nor the limit."""
    config = DataConfig(dataset=str(corpus), tokenizer=str(tokenizer_dir), seq_len=16, max_documents=1,
                        cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=rf"data\.dataset '{corpus}' with data\.max_documents 1 gives 1 non-empty"):
        build_data(config, **_BUILD)
    (tmp_path / "input.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    config = DataConfig(dataset=str(tmp_path / "input.txt"), tokenizer=str(tokenizer_dir), seq_len=16,
                        cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=rf"data\.dataset '{tmp_path / 'input.txt'}' has 1 document"):
        build_data(config, **_BUILD)


def test_a_directory_of_mixed_file_kinds_names_the_odd_files_and_a_glob_that_selects_one(tmp_path):
    """'mixes file kinds ['json', 'text']' left the user to search a directory of many files for the README.md;
    the refusal names files of each kind, and a glob of the commonest kind that then loads."""
    import json

    for i in range(3):
        (tmp_path / "data" / "part").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "part" / f"{i}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n")
    (tmp_path / "data" / "README.md").write_text("# my corpus\n")
    with pytest.raises(ConfigError) as error:
        local_files(str(tmp_path / "data"))
    message = str(error.value)
    assert "README.md" in message and "json: 3 file(s)" in message and "text: 1 file(s)" in message
    glob = re.search(r"the glob '([^']+)'", message).group(1)
    assert glob == str(tmp_path / "data" / "**" / "*.jsonl")
    assert len(local_files(glob)) == 3


@pytest.mark.parametrize("setting, value", [("split", "validation"), ("name", "wikitext-2")])
def test_a_hub_selection_on_local_files_is_refused_not_ignored(setting, value, micro, tmp_path, capsys):
    """data.split and data.name select from a hub dataset (split also from a save_to_disk DatasetDict); local
    files were read whole whatever they said: a run asked to train on a validation split trained on all."""
    from retnet.train.__main__ import EXIT_CONFIG, main

    out = tmp_path / "run"
    assert main(micro(out, **{f"data__{setting}": value})) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"data.{setting} {value!r}" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()


# CSV cells of the text column that pandas would read as numbers or as NA: each is a document as written, but the
# empty one, which is no document (as an empty row of any source).
_CSV_NUMERIC = ["007", "1e5", "12", "", "NaN", "NA", "null", "-0.50"]


def _csv_files(tmp_path):
    """docs.csv of ordinary documents, nums.csv whose text column holds only _CSV_NUMERIC (pandas' inference
    makes it float there: "007" 7.0, "" and "NaN" NaN); both with other columns that keep pandas' types."""
    import csv

    for name, texts in (("docs.csv", _DOCS), ("nums.csv", _CSV_NUMERIC)):
        with open(tmp_path / name, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "text", "score"])
            writer.writerows([i, text, "" if i % 3 else i / 2] for i, text in enumerate(texts))
    return str(tmp_path / "*.csv")


@pytest.mark.parametrize("streaming", [False, True])
def test_csv_text_cells_are_documents_as_written(streaming, tokenizer_dir, tmp_path, monkeypatch):
    """pandas inferred the text column's type: "007" became 7, "1e5" 100000.0, and a column of such cells was
    refused as float; "NaN", "NA", "null" and empty cells became NaN. The text column is now read as written,
    through the training pipeline, while the other columns keep the types pandas infers."""
    from retnet.train import data as data_module
    from retnet.train import streaming as streaming_module

    pattern = _csv_files(tmp_path)
    config = DataConfig(dataset=pattern, tokenizer=str(tokenizer_dir), seq_len=16, val_fraction=0.2,
                        streaming=streaming, val_documents=3, cache_dir=str(tmp_path / "cache"))
    encoded: list[str] = []
    encode = data_module.encode_documents
    for module in (data_module, streaming_module):  # the cached path's and the streamed path's
        monkeypatch.setattr(module, "encode_documents", lambda tok, texts: encode(tok, encoded.extend(texts) or texts))
    data = build_data(config, **_BUILD)
    if streaming:  # the first 3 documents are the validation split, the rest is streamed as read
        assert encoded == _DOCS[:3]
        assert [example["text"] for example in data.stream] == [*_DOCS[3:], *_CSV_NUMERIC]
    else:  # every non-empty document, split into training and validation documents
        assert sorted(encoded) == sorted([*_DOCS, *(t for t in _CSV_NUMERIC if t)])

    loaded = data_module._hf_dataset(config, local_files(pattern), tmp_path / "cache", streaming=False)
    assert {name: str(feature.dtype) for name, feature in loaded.features.items()} == {
        "id": "int64", "text": "large_string", "score": "float64"}
    assert loaded["score"][:4] == [0.0, None, None, 1.5]  # its empty cells are still missing numbers


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_repository_of_csv_files_gives_its_text_column_as_written(streaming, tmp_path):
    """A hub dataset of CSV files goes through datasets' csv builder as local CSV files do: its text column
    read as written. A directory of CSV files loaded by name stands for the hub repository: datasets picks its
    builder from its files exactly so (offline)."""
    from retnet.train import data as data_module

    repo = tmp_path / "repo"
    repo.mkdir()
    _csv_files(repo)
    read = []
    for text_field in ("text", "body"):
        config = DataConfig(dataset=str(repo), text_field=text_field, streaming=streaming, val_documents=3)
        try:
            if streaming:
                stream, fingerprint = data_module._hub_stream(config, tmp_path / "cache")
                with data_module._reading(config.dataset, text_field):
                    read.append([example[text_field] for example in stream])
                assert fingerprint
            else:
                read.append(data_module._hf_dataset(config, None, tmp_path / "cache", streaming=False)[text_field])
        except ConfigError as error:
            read.append(str(error))
    assert sorted(read[0]) == sorted([*_DOCS, *_CSV_NUMERIC])  # "007", "NaN", "" ...: as written, not numbers
    assert read[1] == f"data.text_field 'body' is not a column of the CSV files of {str(repo)!r}"


def test_csv_token_caches_are_keyed_by_how_csv_is_read(tokenizer_dir, tmp_path, monkeypatch):
    """A token cache written when CSV cells were read otherwise holds other documents under the same files and
    settings: a change of CSV_READING moves the key of CSV data, and of no other source."""
    from retnet.train import data as data_module

    pattern = _csv_files(tmp_path)
    csv_config = DataConfig(dataset=pattern, tokenizer=str(tokenizer_dir), seq_len=16, cache_dir=str(tmp_path / "c"))
    jsonl = DataConfig(dataset=str(_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _DOCS])))
    keys = []
    for reading in (data_module.CSV_READING, data_module.CSV_READING + 1):
        monkeypatch.setattr(data_module, "CSV_READING", reading)
        keys.append((data_module.data_fingerprint(csv_config, local_files(pattern)),
                     data_module.data_fingerprint(jsonl, local_files(jsonl.dataset))))
        build_data(csv_config, **_BUILD)
    assert keys[0][0] != keys[1][0] and keys[0][1] == keys[1][1]
    assert len(list((tmp_path / "c").glob("tokens-*"))) == 2  # the second reading did not reuse the first's


def test_a_tokenizer_named_by_hub_id_loads_from_its_snapshot(tokenizer_dir, hub_cache):
    from retnet.train.data import load_tokenizer

    hub_cache("acme/tokenizer", tokenizer_dir)
    assert (load_tokenizer("acme/tokenizer").backend_tokenizer.to_str()
            == load_tokenizer(tokenizer_dir).backend_tokenizer.to_str())
    with pytest.raises(ConfigError, match=r"data\.tokenizer 'acme/missing': no such directory, and the hub could "
                                          r"not provide it"):
        load_tokenizer("acme/missing")
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        load_tokenizer(tokenizer_dir / "missing")


@pytest.mark.parametrize("mixture", [False, True])
def test_a_cache_dir_that_cannot_be_a_directory_is_refused_naming_it(mixture, tokenizer_dir, corpus, tmp_path):
    """``data.cache_dir`` naming a file was a FileExistsError traceback from deep in the data pipeline."""
    taken = tmp_path / "cache"
    taken.write_text("not a directory")
    where = {"mixture": {"docs": {"dataset": str(corpus), "weight": 1}}} if mixture else {"dataset": str(corpus)}
    config = DataConfig(**where, tokenizer=str(tokenizer_dir), seq_len=32, cache_dir=str(taken))
    with pytest.raises(ConfigError, match=rf"data\.cache_dir '{re.escape(str(taken))}' .*not a directory"):
        build_data(config, vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0,
                   world_size=1, tokenizer_dir=None, barrier=lambda: None)
    with pytest.raises(ConfigError, match=r"data\.cache_dir '.*/cache/below' cannot be created"):
        build_data(dataclasses.replace(config, cache_dir=str(taken / "below")), vocab_size=512, seed=0,
                   micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1, tokenizer_dir=None,
                   barrier=lambda: None)
