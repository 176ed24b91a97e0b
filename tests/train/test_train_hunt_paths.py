"""User paths of the training launcher (``retnet.train``) that went wrong: each test is one bug's case, kept small
(in-process, a few documents, a micro model)."""

import json

import pytest

from retnet.train.config import ConfigError, DataConfig, load_config
from retnet.train.data import build_data

KWARGS = dict(vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
              tokenizer_dir=None, barrier=lambda: None)


def _documents(count):
    return [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(count)]


def _write_parquet(path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_an_empty_parquet_file_beside_others_is_skipped(streaming, tokenizer_dir, tmp_path):
    """A Parquet file of no rows (an empty partition of a filtered or sharded export: pyarrow, and pandas through it,
    write one row group of 0 rows) made datasets read with a batch size of 0, and the whole set was refused with
    "ArrowInvalid: BatchSize must be greater than 0", naming no file. Empty JSONL files beside others train."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    _write_parquet(folder / "part-0.parquet", [])
    _write_parquet(folder / "part-1.parquet", _documents(20))
    _write_parquet(folder / "part-2.parquet", [])
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.1,
                        streaming=streaming, val_documents=2, cache_dir=str(tmp_path / "cache"))
    data = build_data(config, **KWARGS)
    batches = data.micro_batches(2)
    assert [tuple(b.shape) for b in batches] == [(2, 32), (2, 32)]
    if not streaming:
        # every document of the non-empty file is there: 18 trained, 2 held out
        meta = json.loads(next((tmp_path / "cache").glob("tokens-*/meta.json")).read_text())
        assert meta["documents"] == [18, 2]


def test_parquet_files_that_are_all_empty_are_refused_naming_the_data(tokenizer_dir, tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    _write_parquet(folder / "a.parquet", [])
    _write_parquet(folder / "b.parquet", [])
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data\.dataset '.*parquet': its 2 Parquet files hold no rows"):
        build_data(config, **KWARGS)


@pytest.mark.parametrize(("override", "meant"), [
    ("--model.use_xpos=true", "model.extra.use_xpos"),  # a RetNetConfig field set as a [model] key
    ("--model.rope_theta=5e4", "model.extra.rope_theta"),
    ("--model.extra.use_xpoz=true", "model.extra.use_xpos"),  # a misspelt RetNetConfig field
    ("--model.extra.rope_thetta=5e4", "model.extra.rope_theta"),
])
def test_a_model_field_set_where_it_is_not_read_names_the_key_meant(override, meant):
    """The README promises every unknown key is refused with the key most likely meant. A RetNetConfig field
    written as ``model.KEY`` (not ``model.extra.KEY``) was refused listing only [model]'s own keys, and a
    misspelt ``model.extra.KEY`` only as "not a RetNetConfig field"."""
    with pytest.raises(ConfigError, match=rf"did you mean '{meant}'"):
        load_config("tiny", [override])


def test_a_model_field_in_a_toml_model_table_names_the_key_meant(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('[model]\npreset = "tiny"\nuse_xpos = true\n')
    with pytest.raises(ConfigError, match=r"did you mean 'model\.extra\.use_xpos'"):
        load_config(str(path))


@pytest.mark.parametrize("streaming", [False, True])
def test_an_empty_csv_file_beside_others_is_skipped(streaming, tokenizer_dir, tmp_path):
    """An empty CSV file (0 bytes: a partition with nothing to write) made pandas fail the whole set with
    "EmptyDataError: No columns to parse from file"; one with a header and no rows was read."""
    import csv

    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "a.csv").write_text("")
    with open(folder / "b.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "id"])
        writer.writerows([text, index] for index, text in enumerate(_documents(20)))
    (folder / "c.csv").write_text("text,id\n")
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.1,
                        streaming=streaming, val_documents=2, cache_dir=str(tmp_path / "cache"))
    data = build_data(config, **KWARGS)
    assert [tuple(b.shape) for b in data.micro_batches(2)] == [(2, 32), (2, 32)]
    if not streaming:
        meta = json.loads(next((tmp_path / "cache").glob("tokens-*/meta.json")).read_text())
        assert meta["documents"] == [18, 2]


def test_a_resume_takes_the_same_dataset_path_spelt_otherwise(micro, corpus, tmp_path, capsys, read_metrics):
    """data.dataset was compared as text: the same file written './corpus/docs.jsonl' or 'corpus//docs.jsonl', or a
    directory with the trailing slash tab completion adds, was refused as "trained on other data" (exit 2). Another
    path is still refused (test_resume's test of other data settings)."""
    from retnet.train.__main__ import main

    out = tmp_path / "run"
    assert main(micro(out, train__steps=2)) == 0
    spelt = f"{corpus.parent}/./{corpus.name}"
    assert main(micro(out, train__steps=3, data__dataset=spelt)) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_a_first_parquet_file_whose_text_is_all_null_is_skipped(tokenizer_dir, tmp_path):
    """pandas writes a column of None only as Parquet type null: first in the set, it typed datasets' column null and
    the next file's text failed to cast to it ("Couldn't cast array of type string to null"), naming no file. Its
    rows are no documents (empty ones are dropped), so the file is skipped."""
    import pandas as pd

    folder = tmp_path / "parquet"
    folder.mkdir()
    pd.DataFrame({"text": [None, None], "id": [0, 1]}).to_parquet(folder / "a.parquet")
    pd.DataFrame({"text": _documents(20), "id": range(20)}).to_parquet(folder / "b.parquet")
    assert pa_type(folder / "a.parquet") == "null"
    config = DataConfig(dataset=str(folder), tokenizer=str(tokenizer_dir), seq_len=32, val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    build_data(config, **KWARGS)
    meta = json.loads(next((tmp_path / "cache").glob("tokens-*/meta.json")).read_text())
    assert meta["documents"] == [18, 2]


def test_a_later_parquet_file_whose_text_is_all_null_stays_in_the_set(tmp_path):
    """Only null files ahead of the first typed one are skipped: a later one datasets casts to text, and a stream's
    saved position counts files and their batches, so dropping it would resume a checkpoint written before on other
    blocks, silently."""
    import pandas as pd

    from retnet.train.data import _files_with_rows

    paths = [tmp_path / f"{name}.parquet" for name in "abcd"]
    for path, texts in zip(paths, ([None], ["x"], [None], ["y"]), strict=True):
        pd.DataFrame({"text": texts}).to_parquet(path)
    assert _files_with_rows("corpus", paths, "parquet", "text") == paths[1:]


def pa_type(path) -> str:
    import pyarrow.parquet as pq

    return str(pq.read_schema(path).field("text").type)


def test_a_mixture_source_path_spelt_otherwise_is_the_same_source(tmp_path):
    """The mixture's sources are compared as data.dataset is: as paths, not as text."""
    from retnet.train.config import _mixture_changes

    (tmp_path / "web").mkdir()
    saved = DataConfig(mixture={"web": {"dataset": str(tmp_path / "web"), "weight": 1}}).to_dict()
    spelt = DataConfig(mixture={"web": {"dataset": f"{tmp_path}/./web/", "weight": 1}})
    assert _mixture_changes(saved, spelt) == []
    other = DataConfig(mixture={"web": {"dataset": str(tmp_path / "news"), "weight": 1}})
    assert [change.split(":")[0] for change in _mixture_changes(saved, other)] == ["data.mixture.web.dataset"]
