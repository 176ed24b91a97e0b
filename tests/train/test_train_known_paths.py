"""Known limitations of the training data and resume paths that were lifted: each test is one case, kept small
(in-process, a few documents, a micro model where one is needed)."""

import json

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data

KWARGS = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)


def _documents(count, name="function"):
    return [f"def {name}_{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(count)]


def _token_meta(cache):
    return json.loads(next(cache.glob("tokens-*/meta.json")).read_text())


def _two_batches_of(folder, tokenizer_dir, tmp_path, streaming):
    """The data of ``folder``, 2 documents held out, after checking it yields two full micro-batches; its cache."""
    cache = tmp_path / "cache"
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.1,
                        streaming=streaming, val_documents=2, cache_dir=str(cache))
    data = build_data(config, **KWARGS)
    assert [tuple(b.shape) for b in data.micro_batches(2)] == [(2, 32), (2, 32)]
    return data, cache


@pytest.mark.parametrize("streaming", [False, True])
def test_a_parquet_file_whose_first_row_group_is_empty_is_read_whole(streaming, tokenizer_dir, tmp_path):
    """datasets reads a Parquet file in batches of its first row group's rows: a file that starts with an empty row
    group (a writer flushed before its first rows) but holds rows after it failed the whole set with "BatchSize
    must be greater than 0". Its rows now count and train, streamed or not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(folder / "a.parquet", schema) as writer:
        for texts in ([], _documents(12, "early"), _documents(5, "late")):
            writer.write_table(pa.table({"text": pa.array(texts, pa.string())}))
    assert [pq.read_metadata(folder / "a.parquet").row_group(i).num_rows for i in range(3)] == [0, 12, 5]
    pq.write_table(pa.table({"text": _documents(3, "other")}), folder / "b.parquet")
    data, cache = _two_batches_of(folder, tokenizer_dir, tmp_path, streaming)
    if streaming:
        # every row of both files is streamed: 20 documents, the first 2 held out for validation
        assert len(list(data.stream)) == 18
    else:
        assert _token_meta(cache)["documents"] == [18, 2]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_first_jsonl_file_whose_text_is_all_null_is_skipped(streaming, tokenizer_dir, tmp_path):
    """datasets typed the text column null from a first JSONL file whose text is null in every row, and the next
    file's text failed to cast to it ("Couldn't cast array of type string to null"), naming no file. Its rows are no
    documents, so it is skipped as a leading null Parquet file is; an empty file before it changes nothing."""
    folder = tmp_path / "jsonl"
    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": None, "id": i}) + "\n" for i in range(3)))
    for name, texts in (("c", _documents(12)), ("d", [None, *_documents(8, "later")])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                                     for i, t in enumerate(texts)))
    data, cache = _two_batches_of(folder, tokenizer_dir, tmp_path, streaming)
    if streaming:
        # the later file's null row is read (and dropped as no document by the stream's packing)
        assert len(list(data.stream)) == 21 - 2
    else:
        assert _token_meta(cache)["documents"] == [18, 2]


@pytest.mark.parametrize("fmt", ["text", "preference"])
def test_a_row_that_is_not_utf8_is_named_in_its_own_file(fmt, tokenizer_dir, tmp_path):
    """A Latin-1 row was named by its index across every file of the directory ("row 7"), which no file has: the
    error names its file and its row there, and the index in the set beside them."""
    from retnet.train.data import local_files
    from retnet.train.preference import load_pairs

    folder = tmp_path / "rows"
    folder.mkdir()

    def row(i, text):
        return {"text": text} if fmt == "text" else {"prompt": f"q{i}", "chosen": text, "rejected": f"bad {i}"}

    column = "text" if fmt == "text" else "chosen"
    (folder / "a.jsonl").write_text("".join(json.dumps(row(i, t)) + "\n" for i, t in enumerate(_documents(5))))
    lines = [json.dumps(row(i, t), ensure_ascii=False) for i, t in enumerate(_documents(4, "b"))]
    lines[2] = lines[2].replace("b_2", "caf\u00e9_2")
    (folder / "b.jsonl").write_bytes("\n\n".join(lines).encode("latin-1") + b"\n")  # blank lines are no rows
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, format=fmt,
                        max_documents=100, cache_dir=str(tmp_path / "cache"))
    where = rf"'{column}' of '.*b\.jsonl', row 2 \(row 7 of '.*rows'\): not UTF-8 text"
    with pytest.raises(ConfigError, match=where):
        if fmt == "text":
            build_data(config, **KWARGS)
        else:
            load_pairs(config, local_files(str(folder)), tmp_path / "cache")


def test_checkpoints_set_aside_twice_in_one_second_keep_both(tmp_path):
    """The names of abandoned checkpoints and exports are stamped to the second: a second explicit resume within it
    failed renaming onto the first's ("Directory not empty"), after loading the checkpoint."""
    from retnet.train.checkpoint import retire_export, supersede_after

    root = tmp_path / "checkpoints"
    for round_ in range(2):
        (root / "step_00000004").mkdir(parents=True)
        (root / "step_00000004" / "model.pt").write_text(str(round_))
        (tmp_path / "export").mkdir()
        (tmp_path / "export" / "config.json").write_text(str(round_))
        assert len(supersede_after(root, 2)) == 1
        assert retire_export(tmp_path / "export", "export.abandoned-1").name.startswith("export.abandoned-1")
    assert len(list(root.glob("step_00000004.abandoned-*"))) == 2
    assert sorted(p.read_text() for p in tmp_path.glob("export.abandoned-1*/config.json")) == ["0", "1"]
