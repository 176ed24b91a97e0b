"""Chat / prompt-completion data paths checked against independent computations: standard prompt-completion rows
of a tokenizer whose post-processor appends EOS (as Llama/Mistral tokenizers do with ``add_eos_token``), and streams
that name no columns before they are read (a generator's, a hub set's without features): their rows' layout (TRL's
prompt-completion, ShareGPT's conversations) must be read from the rows, in a run and in a mixture's BPE sample."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from retnet.train.chat import BOUNDARY, TARGET, ChatEncoder, Completion, template_identity


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("hunt-bpe")
    train_byte_level_bpe(["Q: What is 2 plus 3?\nA: 2 plus 3 is 5."] * 40, vocab_size=300).save_pretrained(path)
    return path


def with_post_processor(bpe_dir: Path, append_eos: bool):
    """The BPE with a BOS, and a post-processor that adds it (and, with ``append_eos``, EOS after the text)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    tokenizer.add_tokens(["<s>"], special_tokens=True)
    tokenizer.bos_token = "<s>"
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    single = "<s> $A <|endoftext|>" if append_eos else "<s> $A"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=single, special_tokens=[("<s>", bos), ("<|endoftext|>", eos)])
    return tokenizer


@pytest.mark.parametrize("completion", [" 5", " 5<|endoftext|>"])
def test_a_standard_row_of_a_tokenizer_that_appends_eos_ends_with_one_trained_eos(bpe_dir, completion):
    tokenizer = with_post_processor(bpe_dir, append_eos=True)
    prompt = "Q: What is 2 plus 3?\nA:"
    ids, flags = ChatEncoder(tokenizer).encode([Completion(prompt, completion)])
    # what the tokenizer itself makes of the row's text: BOS, the text, one EOS
    expected = tokenizer(prompt + " 5")["input_ids"]
    assert expected[-1] == tokenizer.eos_token_id and expected.count(tokenizer.eos_token_id) == 1
    assert ids.tolist() == expected
    completion_ids = tokenizer(" 5", add_special_tokens=False)["input_ids"]
    assert ((flags & TARGET) != 0).astype(int).tolist() == [0] * (len(ids) - len(completion_ids) - 1) + [1] * (
        len(completion_ids) + 1)
    assert np.flatnonzero(flags & BOUNDARY).tolist() == [len(ids) - 1]


def test_a_tokenizer_that_appends_eos_keys_its_own_token_cache(bpe_dir):
    # its caches of before were written with the EOS twice, the first no target
    assert template_identity(with_post_processor(bpe_dir, True)) != template_identity(
        with_post_processor(bpe_dir, False))
    # A BOS that is the EOS, prepended only (GPT-2's add_bos_token), appends nothing: an empty encoding is that BOS
    # alone, which a probe on "" took for an appended EOS (and rebuilt the caches for no change).
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from retnet.train.chat import appends_eos

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.eos_token} $A", special_tokens=[(tokenizer.eos_token, tokenizer.eos_token_id)])
    assert not appends_eos(tokenizer)
    assert template_identity(tokenizer) == template_identity(AutoTokenizer.from_pretrained(bpe_dir))


# ----------------------------------------------------------------------------------------------------------
# A stream that does not know its columns (a generator's, a hub set's without features)
# ----------------------------------------------------------------------------------------------------------
def qa(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {i} plus 3?"}, {"role": "assistant", "content": f"{i + 3}."}]


@pytest.mark.parametrize("layout", ["standard", "conversational", "sharegpt"])
def test_a_stream_without_column_names_is_read_in_its_rows_layout(bpe_dir, tmp_path, layout):
    import datasets

    from retnet.train.config import DataConfig
    from retnet.train.streaming import build_streaming

    def row(i: int) -> dict:
        if layout == "standard":
            return {"prompt": f"Q: What is {i} plus 3?\nA:", "completion": f" {i + 3}."}
        if layout == "conversational":
            return {"prompt": qa(i)[:1], "completion": qa(i)[1:]}
        return {"conversations": [{"from": "human", "value": qa(i)[0]["content"]},
                                  {"from": "gpt", "value": qa(i)[1]["content"]}]}

    rows = [row(i) for i in range(16)]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    assert stream.column_names is None
    config = DataConfig(dataset="gen", format="chat", streaming=True, val_documents=4, seq_len=48,
                        tokenizer=str(bpe_dir), cache_dir=str(tmp_path / "cache"))
    data = build_streaming(config, stream, tmp_path / "cache", "gen", bpe_dir, vocab_size=300, micro_batch=1,
                           rank=0, local_rank=0, world_size=1, barrier=lambda: None)
    # as the same rows stream from a JSONL file, whose stream knows its columns
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    known = datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True,
                                  cache_dir=str(tmp_path / "hf"))
    assert known.column_names is not None
    expected = build_streaming(dataclasses.replace(config, dataset=str(path)), known, tmp_path / "cache", "file",
                               bpe_dir, vocab_size=300, micro_batch=1, rank=0, local_rank=0, world_size=1,
                               barrier=lambda: None)
    for _ in range(6):
        got, want = data._next_block(), expected._next_block()
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_a_streamed_mixture_source_without_column_names_samples_its_rows_for_the_bpe(tmp_path, monkeypatch):
    import datasets

    from retnet.train import mixture
    from retnet.train.chat import render_default
    from retnet.train.config import DataConfig

    rows = [{"prompt": f"Q: What is {i} plus 3?\nA:", "completion": f" {i + 3}."} for i in range(4)]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    monkeypatch.setattr(mixture, "_hub_stream", lambda cfg, cache_dir, **_: (stream, "fingerprint"))
    config = DataConfig(dataset="someone/pairs", format="chat", streaming=True, val_documents=1,
                        cache_dir=str(tmp_path / "cache"))
    _, documents = mixture._source_reader(config, tmp_path / "cache", 0, lambda: None, None)
    assert list(documents()) == [render_default(Completion(r["prompt"], r["completion"])) for r in rows[1:]]


# ----------------------------------------------------------------------------------------------------------
# Packed conversations longer than a block, against a reference built one conversation at a time
# ----------------------------------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_packed_targets_are_each_conversations_own_within_the_block_it_starts_in(bpe_dir):
    import random

    import torch
    from transformers import AutoTokenizer

    from retnet.train.data import chat_blocks, packed_segments

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token, tokenizer.chat_template = "<|im_end|>", CHATML  # an end of turn that is the EOS
    rng, words = random.Random(0), ["What", "is", "2", "plus", "3", "5", "Q", "A"]
    conversations = []
    for _ in range(40):
        messages = [{"role": "system", "content": "A"}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 8)))},
                         {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))}]
            if rng.random() < 0.3:
                messages.append({"role": "tool", "content": "5"})
        conversations.append(messages)
    encoder, length = ChatEncoder(tokenizer), 24
    blocks, flags = chat_blocks(encoder, list(enumerate(conversations)), length)
    ids, targets, owner, starts = [], [], [], []
    for number, messages in enumerate(conversations):
        one, marks = encoder.encode([messages])
        starts.append(len(ids))
        ids += one.tolist()
        targets += ((marks & TARGET) != 0).tolist()
        owner += [number] * len(one)
    size = blocks.size
    assert blocks.flatten().tolist() == ids[:size]
    # a target is one of its conversation's, which started in the token's block: never a part that spilled over
    expected = [targets[p] and starts[owner[p]] >= p - p % length for p in range(size)]
    assert ((flags.flatten() & TARGET) != 0).tolist() == expected
    inputs = packed_segments(torch.from_numpy(blocks.astype(np.int64)), tokenizer.eos_token_id,
                             torch.from_numpy(flags))
    segment = np.repeat(np.arange(len(inputs["cu_seqlens"]) - 1), np.diff(inputs["cu_seqlens"].numpy()))
    counted = torch.nonzero(inputs["labels"].flatten() != -100).flatten().tolist()
    assert counted
    for q in counted:  # predicted from a token of its own conversation, in its own segment (or it opens one)
        assert q % length and owner[q - 1] == owner[q]
        assert segment[q - 1] == segment[q] or flags.flatten()[q] & BOUNDARY
