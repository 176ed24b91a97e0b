"""A streamed text set whose ``data.text_field`` is none of its columns: CSV and plain-text files name no columns
before they are read, and the field was looked up in the first row as a bare KeyError (a traceback, not the
ConfigError a cached read of the same files gives)."""

from __future__ import annotations

import csv

import pytest

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def _write(directory, kind: str):
    directory.mkdir()
    lines = [" ".join(WORDS[(i + j) % 8] for j in range(24)) for i in range(24)]
    if kind == "csv":
        with open(directory / "a.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "id"])
            writer.writerows([line, i] for i, line in enumerate(lines))
    else:
        for i, line in enumerate(lines):
            (directory / f"doc{i}.{kind}").write_text(line)
    return directory


def _build(cfg, tokenizer_dir=None):
    return build_data(cfg, vocab_size=300, seed=0, micro_batch=1, global_batch=1, rank=0, local_rank=0, world_size=1,
                      tokenizer_dir=tokenizer_dir, barrier=lambda: None)


@pytest.mark.parametrize("kind", ["csv", "txt"])
def test_a_streamed_text_field_that_is_no_column_is_refused_naming_it(kind, tokenizer_dir, tmp_path):
    data = _write(tmp_path / "d", kind)
    settings = dict(dataset=str(data), seq_len=16, cache_dir=str(tmp_path / "cache"), streaming=True,
                    val_documents=2)
    with pytest.raises(ConfigError, match=r"data\.text_field 'content' is not a column .*'text'"):
        _build(DataConfig(text_field="content", tokenizer=str(tokenizer_dir), **settings))
    # the field that is there still streams
    assert _build(DataConfig(tokenizer=str(tokenizer_dir), **settings)).micro_batches(1)[0].shape == (1, 16)


def test_a_streamed_mixture_source_whose_text_field_is_no_column_is_refused_before_its_bpe(tmp_path):
    data = _write(tmp_path / "d", "csv")
    cfg = DataConfig(mixture={"web": {"dataset": str(data), "weight": 1, "text_field": "content"}}, seq_len=16,
                     cache_dir=str(tmp_path / "cache"), streaming=True, val_documents=2)
    with pytest.raises(ConfigError, match=r"data\.mixture\.web .*data\.text_field 'content' is not a column"):
        _build(cfg)
    assert not list((tmp_path / "cache").glob("tokenizer-mixture-*"))  # no BPE trained on nothing of it
