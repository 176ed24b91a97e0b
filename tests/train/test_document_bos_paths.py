"""Plain-text documents of a tokenizer whose post-processor puts a BOS before every text (Llama's and Mistral's
``TemplateProcessing`` ``"<s> $A"``: what ``data.tokenizer`` or a converted model brings) start with that BOS, as
``tokenizer(text)``, generate's prompts and ``/v1/completions`` do: in the token cache, in a stream, in
``retnet-eval``. A BOS that is the EOS (GPT-2's ``add_bos_token``) adds nothing (the EOS before a document opens it
already), and the byte-level BPE a run trains (no BOS) encodes documents as before, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retnet.train.config import DataConfig
from retnet.train.data import document_prefix, encode_documents, load_tokenizer

TEXTS = [f"def f{i}(x):\n    return x + {i}  # <s> quoted, and <|endoftext|>\n" * (1 + i % 3) for i in range(24)]
BOS = "<s>"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("bos-bpe")
    train_byte_level_bpe(TEXTS * 4, vocab_size=300).save_pretrained(path)
    return path


def saved_with(bpe_dir: Path, path: Path, single: str | None, *, bos: str | None = BOS, wrap: bool = False,
               left_padding: bool = False) -> Path:
    """The BPE with post-processor template ``single`` (special tokens ``<s>``, ``<x>``, the EOS), saved as a
    transformers tokenizer directory with ``bos`` as its BOS. ``wrap``: after the BPE's ByteLevel post-processor
    (a ``Sequence``, as Llama 3's); ``left_padding``: with a left padding saved in its tokenizer.json."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    tokenizer.add_tokens([BOS, "<x>"], special_tokens=True)
    if bos is not None:
        tokenizer.bos_token = bos
    if single is not None:
        eos = tokenizer.eos_token
        template = processors.TemplateProcessing(single=single, special_tokens=[
            (BOS, tokenizer.convert_tokens_to_ids(BOS)), ("<x>", tokenizer.convert_tokens_to_ids("<x>")),
            (eos, tokenizer.eos_token_id)])
        backend = tokenizer.backend_tokenizer
        backend.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=False), template]) if wrap
                                  else template)
        if left_padding:
            backend.enable_padding(direction="left", pad_id=tokenizer.eos_token_id, pad_token=eos, length=8)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(bpe_dir, tmp_path_factory) -> Path:
    return saved_with(bpe_dir, tmp_path_factory.mktemp("llama-style"), f"{BOS} $A")


def plain_ids(tokenizer, text: str) -> list[int]:
    """``text``'s ids as the tokenizer encodes text alone, its special tokens' text as text (as training does)."""
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False


def test_a_llama_style_tokenizer_opens_every_document_with_its_bos(llama_dir):
    tokenizer = load_tokenizer(llama_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer("hello")["input_ids"][0] == bos  # the server's and generate's prompts start so
    assert document_prefix(tokenizer) == [bos]
    got = encode_documents(tokenizer, TEXTS[:5]).tolist()
    want = [token for text in TEXTS[:5] for token in [bos, *plain_ids(tokenizer, text), eos]]
    assert got == want
    # the text "<s>" in a document is text, not a second BOS
    assert got.count(bos) == 5 and got.count(eos) == 5


@pytest.mark.parametrize("case", ["default", "gpt2_bos_is_eos", "gpt2_bos_is_eos_no_bos_token"])
def test_a_tokenizer_without_another_bos_encodes_documents_as_before(bpe_dir, tmp_path, case):
    """The trained BPE (no BOS) and a GPT-2 ``add_bos_token`` tokenizer (its BOS is the EOS): each document its ids and
    one EOS, exactly the layout of before (the EOS closing a document opens the next one)."""
    if case == "default":
        tokenizer = load_tokenizer(bpe_dir)
    else:
        tokenizer = load_tokenizer(saved_with(bpe_dir, tmp_path / case, "<|endoftext|> $A",
                                              bos="<|endoftext|>" if case == "gpt2_bos_is_eos" else None))
        assert tokenizer("hello")["input_ids"][0] == tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    assert document_prefix(tokenizer) == []
    got = encode_documents(tokenizer, TEXTS[:5])
    assert got.dtype == np.uint16
    assert got.tolist() == [token for text in TEXTS[:5] for token in [*plain_ids(tokenizer, text), eos]]

    from retnet.train.evaluate import encode

    assert [d.tolist() for d in encode(tokenizer, TEXTS[:3])] == [[eos, *plain_ids(tokenizer, t), eos]
                                                                  for t in TEXTS[:3]]


@pytest.mark.parametrize("variant", ["sequence", "left_padding", "bos_and_eos"])
def test_the_prefix_is_what_the_post_processor_puts_before_a_text(bpe_dir, tmp_path, variant):
    """After the ByteLevel post-processor (a Sequence); with a left padding saved (its pads are no prefix); with an
    appended EOS (Llama's add_eos_token: the document still ends with one EOS); two tokens before the text."""
    single = {"sequence": f"{BOS} $A", "left_padding": f"{BOS} $A", "bos_and_eos": f"{BOS} <x> $A <|endoftext|>"}
    tokenizer = load_tokenizer(saved_with(bpe_dir, tmp_path / variant, single[variant], wrap=variant == "sequence",
                                          left_padding=variant == "left_padding"))
    bos, extra, eos = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<x>"), tokenizer.eos_token_id
    prefix = [bos, extra] if variant == "bos_and_eos" else [bos]
    assert document_prefix(tokenizer) == prefix
    assert encode_documents(tokenizer, TEXTS[:2]).tolist() == [
        token for text in TEXTS[:2] for token in [*prefix, *plain_ids(tokenizer, text), eos]]


def test_retnet_eval_scores_a_document_from_its_bos(llama_dir):
    from retnet.train.evaluate import encode

    tokenizer = load_tokenizer(llama_dir)
    documents = encode(tokenizer, TEXTS[:3])
    assert all(d.dtype == np.int32 for d in documents)
    # the BOS is the context-only first token, as a server's prompt starts; the text and the EOS are the targets
    assert [d.tolist() for d in documents] == [[tokenizer.bos_token_id, *plain_ids(tokenizer, t),
                                                tokenizer.eos_token_id] for t in TEXTS[:3]]


def build(config: DataConfig):
    from retnet.train.data import build_data

    return build_data(config, vocab_size=300, seed=0, micro_batch=2, global_batch=2, rank=0, local_rank=0,
                      world_size=1, tokenizer_dir=None, barrier=lambda: None)


def test_cached_and_streamed_blocks_open_documents_with_the_bos(llama_dir, tmp_path):
    from retnet.train.streaming import StreamingData

    tokenizer = load_tokenizer(llama_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    config = DataConfig(dataset=str(docs), tokenizer=str(llama_dir), seq_len=16, val_fraction=0.2,
                        cache_dir=str(tmp_path / "cache"))
    cached = build(config)
    for split in (cached.train, cached.val):
        flat = np.asarray(split).reshape(-1).tolist()
        # every document that a block holds the start of starts with the BOS: each EOS is followed by one
        follows = [flat[i + 1] for i in range(len(flat) - 1) if flat[i] == eos]
        assert follows and set(follows) == {bos}
        assert flat.count(bos) >= len(follows)

    # a stream of the same documents packs the same tokens as the cached path encodes them
    import datasets

    stream = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset()
    streamed = StreamingData(stream, np.zeros((1, 16), dtype=np.int64), tokenizer, text_field="text", seq_len=16,
                             micro_batch=4, rank=0, world_size=1)
    blocks = torch.cat(streamed.micro_batches(3)).flatten().tolist()
    want = [token for text in TEXTS for token in [bos, *plain_ids(tokenizer, text), eos]]
    assert blocks == want[:len(blocks)] == encode_documents(tokenizer, TEXTS)[:len(blocks)].tolist()

    # and its streamed validation split (encode_documents) too
    streaming = build(DataConfig(dataset=str(docs), tokenizer=str(llama_dir), seq_len=16, streaming=True,
                                 val_documents=4, cache_dir=str(tmp_path / "cache")))
    val = np.asarray(streaming.val).reshape(-1).tolist()
    assert val == [token for text in TEXTS[:4] for token in [bos, *plain_ids(tokenizer, text), eos]][:len(val)]


def test_a_token_cache_written_without_the_bos_is_not_reused(bpe_dir, llama_dir, tmp_path, monkeypatch):
    """A cache of before holds a BOS tokenizer's documents without their BOS: its key now names the prefix. The
    default BPE's keys stay as they were (its caches hold the same tokens)."""
    import retnet.train.data as data

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cache = tmp_path / "cache"
    for tokenizer_dir in (llama_dir, bpe_dir):
        config = DataConfig(dataset=str(docs), tokenizer=str(tokenizer_dir), seq_len=16, val_fraction=0.2,
                            cache_dir=str(cache))
        with monkeypatch.context() as patch:  # the pipeline of before: no prefix, none in the key
            patch.setattr(data, "document_prefix", lambda tokenizer: [])
            before = np.asarray(build(config).train)
        now = np.asarray(build(config).train)
        bos = load_tokenizer(tokenizer_dir).bos_token_id
        if tokenizer_dir == llama_dir:
            assert bos not in before.reshape(-1).tolist() and bos in now.reshape(-1).tolist()
        else:
            assert bos is None and np.array_equal(before, now)
    caches = sorted(p.name for p in cache.glob("tokens-*"))
    assert len(caches) == 3  # the BOS tokenizer's old and new, the default's one


def test_training_segments_start_at_the_bos_as_a_served_prompt_does(micro, tokenizer_dir, tmp_path, monkeypatch):
    """Each packed document runs from a fresh state at its BOS (the EOS before it closes the document before),
    as a prompt the server gets starts; the trained BPE's segments start at the EOS, as before."""
    from transformers import AutoTokenizer

    from retnet.train import trainer
    from retnet.train.__main__ import main

    llama = saved_with(tokenizer_dir, tmp_path / "llama", f"{BOS} $A")
    bos = AutoTokenizer.from_pretrained(llama).bos_token_id
    starts = []

    def recording(blocks, start_token_id, *rest):
        inputs = trainer.packed_segments.__wrapped__(blocks, start_token_id, *rest)
        row = inputs["input_ids"][0]
        block_starts = set(range(0, row.numel(), blocks.shape[1]))
        starts.extend(row[i].item() for i in inputs["cu_seqlens"][:-1].tolist() if i not in block_starts)
        return inputs

    recording.__wrapped__ = trainer.packed_segments
    monkeypatch.setattr(trainer, "packed_segments", recording)
    corpus = tmp_path / "short.jsonl"  # documents of a few tokens: several in every 32-token block
    corpus.write_text("".join(json.dumps({"text": f"doc {i}: {TEXTS[i % len(TEXTS)][:40]}"}) + "\n" for i in range(200)))
    assert main(micro(tmp_path / "run", data__dataset=corpus, data__tokenizer=llama, train__steps=2)) == 0
    assert starts and set(starts) == {bos}


def test_a_bos_inside_a_document_starts_no_segment():
    """A tokenizer whose BOS is no special token encodes the text ``<s>`` in a document as the BOS: only a BOS right
    after an EOS (or opening a block) starts a document."""
    from retnet.train.data import packed_segments

    bos, eos = 7, 9
    blocks = torch.tensor([[bos, 1, bos, 2, eos, bos, 3, 4], [5, eos, bos, 6, bos, eos, bos, 8]])
    inputs = packed_segments(blocks, bos, eos_token_id=eos)
    assert inputs["cu_seqlens"].tolist() == [0, 5, 8, 10, 14, 16]


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "cached"])
def test_a_checkpoint_of_documents_without_the_bos_is_not_resumed_on_documents_with_it(
        micro, tokenizer_dir, tmp_path, monkeypatch, capsys, streamed):
    """A BOS tokenizer's run checkpointed before documents opened with its BOS (simulated: no prefix): its data
    position counts other blocks, so resuming it is refused, naming why, before the data is read (streamed, it went
    on silently; cached, its local files' digest refused it after tokenizing them again)."""
    from retnet.train import data, streaming, trainer
    from retnet.train.__main__ import main

    llama = saved_with(tokenizer_dir, tmp_path / "llama", f"{BOS} $A")
    out = tmp_path / "run"
    args = dict(data__tokenizer=llama, data__streaming=streamed, data__val_documents=8, checkpoint__interval=2)
    with monkeypatch.context() as old_version:
        for module in (data, streaming, trainer):
            old_version.setattr(module, "document_prefix", lambda tokenizer: [])
        assert main(micro(out, **args, train__steps=2)) == 0
    capsys.readouterr()
    assert main(micro(out, **args, train__steps=4)) == 2
    err = capsys.readouterr().err
    assert "was trained on documents opened with no BOS" in err and "Start a new run" in err, err[-2000:]
    assert "data: tokenizing" not in err and "data: reading" not in err
    # the same run's own checkpoints resume
    fresh = tmp_path / "fresh"
    assert main(micro(fresh, **args, train__steps=2)) == 0
    assert main(micro(fresh, **args, train__steps=4)) == 0
