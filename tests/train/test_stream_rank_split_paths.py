"""Streamed local files are split between the ranks by example: datasets' default split hands out whole files when
their number is a multiple of the world size, and a rank given a small file trained on its few documents pass after
pass while another read a part of a large one. A checkpoint written with that split resumes with it."""

from __future__ import annotations

import json

import pytest

import retnet.train.streaming as streaming
from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data
from retnet.train.streaming import StreamingData


def _files(tmp_path) -> list[str]:
    """A large file of 40 documents and a small one of 4: two files, as many as two ranks."""
    docs = [f"document {i}: " + "def f(x):\n    return x\n" * 3 for i in range(44)]
    (tmp_path / "a_large.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:40]))
    (tmp_path / "b_small.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[40:]))
    return docs


def _build(tmp_path, tokenizer_dir, rank: int):
    config = DataConfig(dataset=str(tmp_path / "*.jsonl"), tokenizer=str(tokenizer_dir), seq_len=32, streaming=True,
                        val_documents=2, cache_dir=str(tmp_path / "cache"))
    return build_data(config, vocab_size=512, seed=0, micro_batch=2, global_batch=4, rank=rank, local_rank=rank,
                      world_size=2, tokenizer_dir=None, barrier=lambda: None)


def test_ranks_streaming_files_of_unequal_sizes_get_equal_parts(tokenizer_dir, tmp_path):
    docs = _files(tmp_path)
    parts = [[example["text"] for example in _build(tmp_path, tokenizer_dir, rank).stream] for rank in range(2)]
    # by files, rank 0 had 38 documents and rank 1 the small file's 4, read ten times as often
    assert [len(part) for part in parts] == [21, 21]
    assert sorted(parts[0] + parts[1]) == sorted(docs[2:])


def test_a_checkpoint_of_the_split_by_files_resumes_with_it(tokenizer_dir, tmp_path, monkeypatch):
    """A state without the split (written before it was saved) was of whole files per rank: the resume reads the
    same documents, as the run never stopped would have."""
    _files(tmp_path)
    original = StreamingData.__init__

    def by_files(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "by_examples": False})

    for rank in range(2):
        with monkeypatch.context() as patch:
            patch.setattr(StreamingData, "__init__", by_files)
            whole = _build(tmp_path, tokenizer_dir, rank)
            expected = [whole.micro_batches(1)[0] for _ in range(12)]
            stopped = _build(tmp_path, tokenizer_dir, rank)
            for _ in range(5):
                stopped.micro_batches(1)
            state = stopped.state_dict()
        del state["split"]
        resumed = _build(tmp_path, tokenizer_dir, rank)
        resumed.load_state_dict(state)
        assert all((resumed.micro_batches(1)[0] == block).all() for block in expected[5:])
        assert resumed.state_dict()["split"] == "auto"


def test_a_split_by_examples_on_a_datasets_without_it_is_one_config_error(tokenizer_dir, tmp_path, monkeypatch,
                                                                           caplog):
    """Resumed where datasets cannot split by example (an older one): a ConfigError, which retnet-train prints as
    one line (a ValueError was a traceback on every rank); a new run there warns that files go whole."""
    _files(tmp_path)
    data = _build(tmp_path, tokenizer_dir, 0)
    data.micro_batches(1)
    state = data.state_dict()
    assert state["split"] == "examples"
    monkeypatch.setattr(streaming, "_splits_by_examples", lambda: False)
    with caplog.at_level("WARNING", logger="retnet.train.data"):
        resumed = _build(tmp_path, tokenizer_dir, 0)
    assert "takes no strategy" in caplog.text
    with pytest.raises(ConfigError, match="split its local files between the ranks by example"):
        resumed.load_state_dict(state)
