"""Streamed chat data (``data.format = "chat"`` with ``data.streaming``): the same blocks and flags as the token
cache's chat path, a conversation split across blocks, exact resume from a checkpoint's place in the stream, the
validation split, a BPE trained on the stream, refusals, and the trainer consuming the batches."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from retnet.train.chat import BOUNDARY, TARGET, ChatEncoder, render_default, target_count
from retnet.train.config import ConfigError, DataConfig, build_config
from retnet.train.data import (
    build_data,
    chat_blocks,
    data_fingerprint,
    load_tokenizer,
    packed_segments,
    tokenizer_fingerprint,
)
from retnet.train.streaming import StreamingChatData, StreamingData

from .conftest import micro_args
from .test_chat_sft import conversation, expected_runs, target_runs, write_jsonl

VAL = 5  # data.val_documents
# data.seq_len: about one conversation's tokens, so many cross a block boundary; and the training conversations'
# lengths (26, 36, 26, 36 ...) add up to 62 and 124, so the blocks 2 and 4 end on a closing EOS.
SEQ = 31
EMPTY = (8, 13)  # rows without a conversation: skipped, but counted in the stream's row indices
BUILD = dict(vocab_size=320, seed=0, micro_batch=2, global_batch=4, rank=0, local_rank=0, world_size=1,
             tokenizer_dir=None, barrier=lambda: None)


def unique(i: int) -> list[dict[str, str]]:
    """``conversation(i)``, its last answer tagged with ``i``: conversation() repeats every 35 rows or so, and a
    repeat of a validation conversation is held out of the stream too, which would shift the comparisons."""
    messages = conversation(i)
    return [*messages[:-1], {**messages[-1], "content": f"{messages[-1]['content']} (#{i})"}]


def rows(count: int = 48) -> list[dict]:
    return [{"messages": None if i in EMPTY else unique(i)} for i in range(count)]


def training_rows(count: int = 48) -> list[tuple[int, list[dict[str, str]]]]:
    """(row, conversation) of the stream after its validation rows, in stream order."""
    return [(i, unique(i)) for i in range(VAL, count) if i not in EMPTY]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("chat-tokenizer")
    train_byte_level_bpe([render_default(unique(i)) for i in range(240)], vocab_size=320).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", rows())


def streamed(dataset: Path, tokenizer_dir: Path | None, cache: Path, **overrides):
    """``build()`` -> a fresh reader of ``dataset`` streamed as chat data."""
    settings = dict(dataset=str(dataset), format="chat", streaming=True, val_documents=VAL, seq_len=SEQ,
                    tokenizer=str(tokenizer_dir) if tokenizer_dir else None, cache_dir=str(cache))
    config = DataConfig(**{**settings, **overrides})
    return lambda **build: build_data(config, **{**BUILD, **build})


def checkpointed(state: dict) -> dict:
    """``state`` as a resume reads it: through torch.save and torch.load, as trainer.pt."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def read(data, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [data._next_block() for _ in range(count)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------
# Blocks and flags
# ----------------------------------------------------------------------------------------------------------
def test_streamed_blocks_and_flags_are_the_cached_paths(chats, tokenizer_dir, tokenizer, tmp_path):
    """The stream's first epoch, cut into blocks one at a time, is what the token cache's function makes of the
    same conversations in the same order (the whole array cut at once); its validation blocks are those of the
    first data.val_documents rows."""
    data = streamed(chats, tokenizer_dir, tmp_path)()
    assert isinstance(data, StreamingChatData) and data.masked
    blocks, flags = chat_blocks(ChatEncoder(tokenizer), training_rows(), SEQ)
    got = read(data, len(blocks))
    assert same(got, list(zip(blocks, flags)))
    assert all(block.dtype == np.int64 and flag.dtype == np.uint8 for block, flag in got)
    val = [(i, unique(i)) for i in range(VAL)]
    val_blocks, val_flags = chat_blocks(ChatEncoder(tokenizer), val, SEQ)
    assert np.array_equal(data.val, val_blocks) and np.array_equal(data.val_flags, val_flags)
    # a conversation crossing a block boundary and blocks starting on a conversation: both cases were compared
    continued = [not flags[i - 1, -1] & BOUNDARY for i in range(1, len(flags))]
    assert any(continued) and not all(continued)


def test_a_conversation_split_across_blocks_is_no_target_past_its_first_block(chats, tokenizer_dir, tokenizer,
                                                                              tmp_path):
    """Checked on the streamed blocks themselves: where a block continues a conversation from the block before,
    nothing up to and including its closing EOS is a target (though its encoding had targets there); what
    follows in the block is as encoded. A conversation longer than a block has no target in a middle block."""
    data = streamed(chats, tokenizer_dir, tmp_path)()
    _, raw = ChatEncoder(tokenizer).encode([c for _, c in training_rows()])
    got = read(data, len(raw) // SEQ)
    spills_with_targets = 0
    for index, (_, flags) in enumerate(got):
        encoded = raw[index * SEQ:(index + 1) * SEQ]
        if index == 0 or got[index - 1][1][-1] & BOUNDARY:
            assert np.array_equal(flags, encoded)
            continue
        ends = np.flatnonzero(flags & BOUNDARY)
        end = ends[0] if len(ends) else SEQ - 1
        assert not np.any(flags[: end + 1] & TARGET), index
        assert np.array_equal(flags[end + 1:], encoded[end + 1:]), index
        assert np.array_equal(flags & BOUNDARY, encoded & BOUNDARY)
        spills_with_targets += bool(np.any(encoded[: end + 1] & TARGET))
    assert spills_with_targets > 3

    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(map(str, range(40)))}]
    dataset = write_jsonl(tmp_path / "long.jsonl", [{"messages": unique(i)} for i in range(VAL)]
                          + [{"messages": long}, {"messages": unique(99)}])
    first, middle, _ = read(streamed(dataset, tokenizer_dir, tmp_path)(), 3)
    assert np.any(first[1] & TARGET) and not np.any(first[1] & BOUNDARY)
    assert not np.any(middle[1] & TARGET)  # wholly inside the long conversation, after its first block


def test_without_assistant_only_loss_every_token_is_a_target_but_the_spilled_ones(chats, tokenizer_dir, tokenizer,
                                                                                 tmp_path):
    data = streamed(chats, tokenizer_dir, tmp_path, assistant_only_loss=False)()
    blocks, flags = chat_blocks(ChatEncoder(tokenizer, assistant_only_loss=False), training_rows(), SEQ)
    got = read(data, len(blocks))
    assert same(got, list(zip(blocks, flags)))
    starts = [0] + [i for i in range(1, len(got)) if got[i - 1][1][-1] & BOUNDARY]  # blocks that spill nothing
    assert len(starts) > 1 and all(np.all(got[i][1] & TARGET) for i in starts)
    assert np.all(data.val_flags[0] & TARGET)
    masked = read(streamed(chats, tokenizer_dir, tmp_path)(), len(blocks))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(masked, got))  # the same tokens, fewer targets
    assert sum(np.count_nonzero(f & TARGET) for _, f in masked) < sum(np.count_nonzero(f & TARGET) for _, f in got)


def test_the_targets_decode_to_the_assistant_messages(tokenizer_dir, tokenizer, tmp_path):
    """With blocks longer than any conversation and the stream's first conversation starting the first block,
    the first block's targets are its whole conversations' answers plus the template's end markers and EOS."""
    dataset = write_jsonl(tmp_path / "set.jsonl", [{"messages": unique(i)} for i in range(12)])
    data = streamed(dataset, tokenizer_dir, tmp_path, seq_len=128)()
    ((tokens, flags),) = read(data, 1)
    whole = int(np.flatnonzero(flags & BOUNDARY)[-1]) + 1  # up to the last conversation closed in the block
    closed = int(np.count_nonzero(flags & BOUNDARY))
    assert closed >= 3
    assert target_runs(tokenizer, tokens[:whole], flags[:whole]) == expected_runs(
        [unique(i) for i in range(VAL, VAL + closed)], "<|endoftext|>", "")


# ----------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------
def test_a_resume_continues_with_the_same_blocks_and_flags(chats, tokenizer_dir, tmp_path):
    """Cut at blocks whose buffer holds the rest of a conversation (its flags in the state), at one that ends
    on a closing EOS, and across epochs; also from a checkpoint of another datasets version (documents skipped
    by reading them) and from one holding only the block count (regenerated)."""
    build = streamed(chats, tokenizer_dir, tmp_path)
    whole = build()
    total = 120  # more than two epochs of the stream
    reference = read(whole, total)
    assert whole.state_dict()["epoch"] >= 2
    on_boundary = next(i + 1 for i, (_, f) in enumerate(reference[:40]) if f[-1] & BOUNDARY)
    cuts = sorted({1, 7, on_boundary, 59, 100})
    checked = {"buffered": 0, "continued": 0, "closed": 0}
    for cut in cuts:
        first = build()
        read(first, cut)
        state = checkpointed(first.state_dict())
        assert len(state["flags"]) == len(state["buffer"])
        checked["buffered"] += len(state["flags"]) > 0
        checked["continued" if state["continued"] else "closed"] += 1
        for written_by in ("this", "another-datasets", "blocks-only"):
            saved = dict(state, datasets_version="0.0.1") if written_by == "another-datasets" else state
            if written_by == "blocks-only":
                saved = {"kind": "streaming", "position": cut}
            resumed = build()
            resumed.load_state_dict(saved)
            assert same(read(resumed, total - cut), reference[cut:]), (cut, written_by)
    assert all(checked.values()), checked
    with pytest.raises(ValueError, match="without the flags of its"):
        build().load_state_dict({k: v for k, v in state.items() if k != "flags"})


def test_text_streams_keep_their_state_and_fingerprint(tmp_path):
    """Text runs: no flags in their stream state, and their data fingerprint (every cache key) as before."""
    from retnet.train.data import CACHE_VERSION, _hash

    assert not StreamingData.masked and StreamingData.val_flags is None
    config = DataConfig(dataset="someone/set", streaming=True, val_documents=50)
    settings = {k: getattr(config, k) for k in ("dataset", "name", "split", "text_field", "streaming",
                                                "max_documents", "val_fraction", "val_documents")}
    assert data_fingerprint(config, None, "abc") == _hash(CACHE_VERSION, settings, "abc")
    chat = DataConfig(dataset="someone/set", streaming=True, val_documents=50, format="chat")
    assert data_fingerprint(chat, None, "abc") != data_fingerprint(config, None, "abc")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, refusals
# ----------------------------------------------------------------------------------------------------------
def test_a_bpe_trained_on_the_stream_learns_the_rendered_training_conversations(chats, tmp_path):
    """Without data.tokenizer the BPE is trained on the stream's training conversations (the validation rows
    held out) rendered with the default template, as the cached path trains it on its training split."""
    from retnet.train.data import train_tokenizer

    data = streamed(chats, None, tmp_path)()
    texts = [render_default(c) for _, c in training_rows()]
    assert tokenizer_fingerprint(data.tokenizer) == tokenizer_fingerprint(train_tokenizer(texts, 320, 5_000_000))
    assert len(data.tokenizer.encode("<|assistant|>\n", add_special_tokens=False)) == 4  # learnt from the tags
    tokens, flags = read(data, 1)[0]
    assert np.any(flags & TARGET) and tokens.max() < 320


def test_a_bad_row_is_refused_naming_the_field_and_its_row_in_the_stream(tokenizer_dir, tmp_path):
    """Its index counts the validation rows and the empty rows before it, as load_conversations counts rows;
    also when met after a resume, and in the validation split (at build)."""
    bad = rows()
    bad[30] = {"messages": [{"role": "user", "content": 7}]}
    dataset = write_jsonl(tmp_path / "bad.jsonl", bad)
    build = streamed(dataset, tokenizer_dir, tmp_path)
    problem = rf"data\.messages_field 'messages' of '{dataset}', row 30: message 0 has content 7"
    with pytest.raises(ConfigError, match=problem):
        read(build(), 200)
    first = build()
    read(first, 3)
    resumed = build()
    resumed.load_state_dict(checkpointed(first.state_dict()))
    with pytest.raises(ConfigError, match=problem):
        read(resumed, 200)
    bad[2] = {"messages": "hello"}
    with pytest.raises(ConfigError, match=r"of '.*bad\.jsonl', row 2: holds str 'hello'"):
        streamed(write_jsonl(dataset, bad), tokenizer_dir, tmp_path)()


def test_a_later_file_datasets_cannot_read_as_the_first_is_refused_naming_the_dataset(tokenizer_dir, tmp_path):
    """datasets types a stream's columns from its first file and fails on a later one that does not fit (here a
    message with another key) only when the run reaches it: refused as the token cache's load refuses it (a
    ConfigError naming the dataset and the field), not datasets' bare TypeError in the middle of the run."""
    folder = tmp_path / "files"
    folder.mkdir()
    later = rows()[24:]
    later[5]["messages"][0]["name"] = "Ann"
    write_jsonl(folder / "a.jsonl", rows()[:24])
    write_jsonl(folder / "b.jsonl", later)
    data = streamed(folder, tokenizer_dir, tmp_path)()
    problem = (rf"data\.dataset '{folder}': datasets could not read it \((?s:.*)\); local files need "
               r"data\.messages_field 'messages' in every file, as conversations")
    with pytest.raises(ConfigError, match=problem):
        read(data, 200)


def test_validation_rows_without_targets_are_refused(tokenizer_dir, tmp_path):
    unanswered = [{"messages": [{"role": "user", "content": f"Hello {i}?"}]} for i in range(VAL)]
    dataset = write_jsonl(tmp_path / "set.jsonl", [*unanswered, *rows()[VAL:]])
    with pytest.raises(ConfigError, match="the validation split's blocks hold no target tokens"):
        streamed(dataset, tokenizer_dir, tmp_path)()
    assert isinstance(streamed(dataset, tokenizer_dir, tmp_path, assistant_only_loss=False)(), StreamingChatData)


def test_the_config_accepts_streamed_chat_and_refuses_what_holds_no_conversations(tokenizer_dir, tmp_path):
    assert build_config({"data": {"format": "chat", "dataset": "a.jsonl", "streaming": True}}).data.streaming
    with pytest.raises(ConfigError, match=r"data.dataset must hold conversations.*got 'stdlib'"):
        build_config({"data": {"format": "chat", "streaming": True}})
    with pytest.raises(ConfigError, match=r"data\.val_documents must be > 0 with data\.streaming"):
        build_config({"data": {"format": "chat", "dataset": "a.jsonl", "streaming": True, "val_documents": 0}})
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("plain text")
    (tmp_path / "set.csv").write_text("messages\nhello\n")
    for dataset, kind in ((text, "text"), (tmp_path / "set.csv", "csv")):
        with pytest.raises(ConfigError, match=rf"is {kind} files, which hold no conversations"):
            streamed(dataset, tokenizer_dir, tmp_path)()


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------
def test_the_step_target_count_is_summed_over_the_ranks(chats, tokenizer_dir, tmp_path, monkeypatch):
    """A rank streams its own blocks: its count is its micro-batches' targets, and the trainer adds the other
    ranks' (an all-reduce, here one that doubles it as a second rank of equal count would)."""
    from retnet.train import trainer as trainer_module

    data = streamed(chats, tokenizer_dir, tmp_path)()
    batches = data.micro_batches(2)
    assert data.step_targets == sum(target_count(b.flags.numpy()) for b in batches) > 0
    assert [tuple(b.tokens.shape) for b in batches] == [(2, SEQ)] * 2 and batches[0].flags.dtype == torch.uint8
    inputs = packed_segments(batches[0].tokens, data.tokenizer.eos_token_id, batches[0].flags)
    assert int((inputs["labels"] != -100).sum()) == target_count(batches[0].flags.numpy())
    monkeypatch.setattr(trainer_module, "is_distributed", lambda: True)
    monkeypatch.setattr(trainer_module.dist, "all_reduce", lambda tensor: tensor.mul_(2))
    trainer = SimpleNamespace(data=data, device=torch.device("cpu"), cp_size=1, group_rank=0)
    assert trainer_module.Trainer._step_targets(trainer) == 2 * data.step_targets
    cached = SimpleNamespace(step_targets=7, step_targets_per_rank=False)  # PackedData's: global already
    assert trainer_module.Trainer._step_targets(SimpleNamespace(data=cached, device=None, cp_size=1)) == 7


def test_a_streamed_chat_run_trains_and_checkpoints_its_place(chats, tokenizer_dir, tmp_path, read_metrics):
    from retnet.train.__main__ import main

    out = tmp_path / "run"
    args = micro_args(chats, tokenizer_dir, tmp_path / "cache", out, data__format="chat", data__streaming=True,
                      data__val_documents=VAL, data__seq_len=64, optim__lr=1e-2, train__steps=4,
                      train__eval_interval=4)
    assert main(args) == 0
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(read_metrics(out, "val")[-1]["val_loss"])
    trainer = torch.load(out / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=False)
    state = trainer["ranks"][0]["data"]
    assert state["kind"] == "streaming" and state["position"] == 16 and len(state["flags"]) == len(state["buffer"])
    assert json.loads(json.dumps(trainer["config"]["data"]))["streaming"] is True
