"""Streamed chat data whose training rows hold no target: a whole pass over the stream without one is refused when
the run reaches its end (each step's loss was 0: nothing learnt), as a cached training split without targets is at
the start; a pass with one is not, across a resume from mid-epoch too."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from retnet.train.config import ConfigError, DataConfig
from retnet.train.data import build_data

from .test_chat_sft import write_jsonl

VAL = 3  # data.val_documents
SEQ = 32  # data.seq_len: a conversation fits in one (its part spilled into the next block is no target)
BUILD = dict(vocab_size=300, seed=0, micro_batch=2, global_batch=2, rank=0, local_rank=0, world_size=1,
             tokenizer_dir=None, barrier=lambda: None)


def answered(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"It is {2 * i}."}]}


def unanswered(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} times {i}? Say it."}]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.chat import render_default

    path = tmp_path_factory.mktemp("tokenizer")
    texts = [render_default(row["messages"]) for i in range(40) for row in (answered(i), unanswered(i))]
    train_byte_level_bpe(texts, vocab_size=300).save_pretrained(path)
    return path


def streamed(rows: list[dict], tokenizer_dir, tmp_path, **build):
    config = DataConfig(dataset=str(write_jsonl(tmp_path / "chats.jsonl", rows)), format="chat", streaming=True,
                        val_documents=VAL, seq_len=SEQ, tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "c"))
    return lambda: build_data(config, **{**BUILD, **build})


def test_a_stream_without_training_targets_is_refused_at_the_end_of_its_pass(tokenizer_dir, tmp_path):
    rows = [answered(i) for i in range(VAL)] + [unanswered(i) for i in range(20)]
    data = streamed(rows, tokenizer_dir, tmp_path)()
    with pytest.raises(ConfigError, match=r"^data\.dataset '.*chats\.jsonl' streams no target tokens: a whole pass "
                                          r"over the stream after its first data\.val_documents \(3\) rows held no "
                                          r"block with a target .*data\.assistant_only_loss=false$"):
        for _ in range(100):  # ~10 steps a pass
            data.micro_batches(1)
            assert data.step_targets == 0
    # every token is a target without assistant_only_loss: the same rows train
    config = DataConfig(dataset=str(tmp_path / "chats.jsonl"), format="chat", streaming=True, val_documents=VAL,
                        seq_len=SEQ, tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "c"),
                        assistant_only_loss=False)
    data = build_data(config, **BUILD)
    assert all(data.micro_batches(1) and data.step_targets > 0 for _ in range(30))


def test_a_rank_is_named_and_a_pass_with_a_target_goes_on_across_a_resume(tokenizer_dir, tmp_path, caplog):
    # the training rows' one answer is the stream's first training row: a pass holds it once, early
    rows = [answered(i) for i in range(VAL)] + [answered(100)] + [unanswered(i) for i in range(20)]
    build = streamed(rows, tokenizer_dir, tmp_path)
    data = build()
    for _ in range(3):
        data.micro_batches(1)
    buffer = io.BytesIO()
    torch.save(data.state_dict(), buffer)  # past the answer, before the pass ends
    buffer.seek(0)
    resumed = build()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for reader in (data, resumed):
        targets = sum(reader.micro_batches(1) and reader.step_targets for _ in range(60))  # several passes
        assert targets > 0
    # two ranks split the rows: rank 1 reads every other one, never the answer, while rank 0's teaches (the loss is
    # over the global batch's targets): warned, not stopped
    data = streamed(rows, tokenizer_dir, tmp_path, rank=1, world_size=2, global_batch=4)()
    with caplog.at_level(logging.WARNING, logger="retnet.train.data"):
        for _ in range(100):
            data.micro_batches(1)
    assert "streamed no target tokens to rank 1 of 2 in a whole pass" in caplog.text


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streamed"])
def test_a_validation_split_without_targets_names_the_data_and_the_setting_that_sizes_it(streaming, tokenizer_dir,
                                                                                         tmp_path):
    from retnet.train.data import split_documents

    count, fraction = 40, 0.1
    _, held_out = split_documents(list(range(count)), fraction)  # the rows the cached path holds out
    unanswered_rows = set(held_out) if not streaming else set(range(VAL))
    rows = [unanswered(i) if i in unanswered_rows else answered(i) for i in range(count)]
    config = DataConfig(dataset=str(write_jsonl(tmp_path / "chats.jsonl", rows)), format="chat", streaming=streaming,
                        val_documents=VAL, val_fraction=fraction, seq_len=SEQ, tokenizer=str(tokenizer_dir),
                        cache_dir=str(tmp_path / "c"))
    setting = r"data\.val_documents" if streaming else r"data\.val_fraction"
    with pytest.raises(ConfigError, match=rf"^data\.dataset '.*chats\.jsonl': the validation split's blocks hold no "
                                          rf"target tokens .*; raise {setting}, use more conversations with assistant "
                                          rf"messages, or data\.assistant_only_loss=false$"):
        build_data(config, **BUILD)
