"""A standard (text) prompt of DPO, KTO, a reward model and GRPO starts with the special tokens the tokenizer's
post-processor adds (a Llama-style BOS), as ``/v1/completions`` encodes a prompt, SFT a standard prompt-completion
row and pretraining a document: a model trained with its BOS first is not tuned, scored or sampled from without it.
A conversation's rendering gets none (its template writes its own, as for a chat request); a tokenizer that adds
nothing (the byte-level BPE a run trains) encodes as before, under the same cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retnet.train.config import DataConfig
from retnet.train.data import load_tokenizer

from .test_document_bos_paths import BOS, saved_with


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    from retnet.tokenization import train_byte_level_bpe

    root = tmp_path_factory.mktemp("prompt-bos")
    train_byte_level_bpe([f"def f{i}(x):\n    return x + {i}\n" for i in range(24)] * 4,
                         vocab_size=300).save_pretrained(root / "bpe")
    return {"bpe": load_tokenizer(root / "bpe"),
            "llama": load_tokenizer(saved_with(root / "bpe", root / "llama", f"{BOS} $A")),
            # Llama's add_eos_token: the EOS it appends is no part of a prompt a completion follows
            "closing": load_tokenizer(saved_with(root / "bpe", root / "closing", f"{BOS} $A <|endoftext|>"))}


def config(fmt: str = "preference") -> DataConfig:
    return DataConfig(format=fmt, dataset="rows.jsonl", seq_len=64)


@pytest.mark.parametrize("name", ["llama", "closing"])
def test_a_standard_pairs_prompt_starts_as_the_servers_prompt(tokenizers, name):
    from retnet.train.preference import PairEncoder, check_pair

    tokenizer = tokenizers[name]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    plain = lambda text: tokenizer.encode(text, add_special_tokens=False)
    encoder = PairEncoder(tokenizer, config())
    pairs = encoder.encode([(0, check_pair("rows.jsonl", 0, ("def f1(x):", " return 1", " return 2")))])
    prompt, chosen, rejected = (part.tolist() for part in pairs.parts(0))
    assert prompt == [bos, *plain("def f1(x):")]  # /v1/completions' prompt, less the EOS "closing" appends
    assert chosen == [*plain(" return 1"), eos] and rejected == [*plain(" return 2"), eos]
    # a prompt-less row (a reward model's): each whole text opens with it, as TRL's RewardTrainer encodes it
    whole = encoder.encode([(0, check_pair("rows.jsonl", 0, (None, "x = 1", "y = 2"), implicit=True))])
    assert [part.tolist() for part in whole.parts(0)] == [[], [bos, *plain("x = 1"), eos], [bos, *plain("y = 2"), eos]]
    # a conversation: the template's text alone (the default template writes no BOS), as a chat request's
    messages = check_pair("rows.jsonl", 0, ([{"role": "user", "content": "hi"}],
                                            [{"role": "assistant", "content": "a"}],
                                            [{"role": "assistant", "content": "b"}]))
    conversation = encoder.encode([(0, messages)]).parts(0)[0].tolist()
    assert conversation == plain(encoder.texts(0, messages)[0]) and bos not in conversation


def test_kto_and_grpo_prompts_start_with_it_too(tokenizers, monkeypatch):
    from retnet.train import rewards
    from retnet.train.config import GrpoConfig
    from retnet.train.kto import encode_rows
    from retnet.train.preference import PairEncoder
    from retnet.train.prompts import PromptEncoder

    tokenizer = tokenizers["llama"]
    bos = tokenizer.bos_token_id
    plain = lambda text: tokenizer.encode(text, add_special_tokens=False)
    pairs, _ = encode_rows(PairEncoder(tokenizer, config("unpaired")),
                           [(0, ("def f1(x):", " return 1"), True), (1, ("def f2(x):", " return 2"), False)], 2)
    assert [pairs.parts(i)[0].tolist() for i in range(2)] == [[bos, *plain("def f1(x):")], [bos, *plain("def f2(x):")]]

    cut = DataConfig(format="prompts", dataset="rows.jsonl", seq_len=64, max_prompt_length=3)
    for cfg, want in ((config("prompts"), [bos, *plain("def f1(x):")]), (cut, plain("def f1(x):")[-3:])):
        encoder = PromptEncoder(tokenizer, cfg)
        split = encoder.split([(0, "def f1(x):", {})])
        assert split.tokens[0].tolist() == want  # what the policy samples after
    # the reward model scores the whole prompt (BOS included) + completion + EOS, as the reward trainer's pairs
    scored = []
    monkeypatch.setattr(rewards, "scores_within_frames",
                        lambda model, ids, bounds, lengths: scored.append(ids[0].tolist()) or torch.zeros(1))
    sources = rewards.RewardSources(GrpoConfig(reward_funcs=["retnet.train.rewards:exact_match"]), tokenizer,
                                    encoder, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    sources._scores(split, np.array([0]), [" return 1"])
    assert scored == [[bos, *plain("def f1(x):"), *plain(" return 1"), tokenizer.eos_token_id]]


def test_a_tokenizer_that_adds_nothing_keeps_its_tokens_and_cache_key(tokenizers):
    from retnet.train.preference import PairEncoder, check_pair, prompt_tokens_key

    tokenizer = tokenizers["bpe"]
    pairs = PairEncoder(tokenizer, config()).encode([(0, check_pair("rows.jsonl", 0, ("def f1(x):", " a", " b")))])
    assert pairs.parts(0)[0].tolist() == tokenizer.encode("def f1(x):", add_special_tokens=False)
    assert prompt_tokens_key(tokenizer, "k") == "k"
    # a BOS tokenizer's cache of before held its prompts without the BOS: not reused
    assert prompt_tokens_key(tokenizers["llama"], "k") != "k"
