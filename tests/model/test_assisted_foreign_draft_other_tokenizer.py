"""Assisted generation across tokenizers (tokenizer=, assistant_tokenizer=) with RetNet as the target and a draft
of another family (a key/value cache): the output is the target's greedy one."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retnet.model import RetNetConfig, RetNetForCausalLM, modeling_retnet

from .conftest import TEXTS


@torch.no_grad()
@pytest.mark.skipif(not modeling_retnet.ASSISTED_ROLLBACK, reason="transformers < 5.25 refuses assisted decoding")
@pytest.mark.parametrize("xpos", [False, True])
def test_a_llama_draft_of_another_tokenizer_gives_the_targets_greedy_tokens(bpe_tokenizer, xpos):
    # transformers cropped the draft's cache by a count of the target's tokens: the Llama draft kept tokens its next
    # input replaced, and then failed on a forward of no token ("cannot reshape tensor of 0 elements").
    from retnet.tokenization import train_byte_level_bpe

    draft_tokenizer = train_byte_level_bpe(TEXTS, vocab_size=260, min_frequency=1)
    torch.manual_seed(0)
    target = RetNetForCausalLM(RetNetConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=8,
        pad_token_id=bpe_tokenizer.pad_token_id, eos_token_id=bpe_tokenizer.eos_token_id, initializer_range=0.5,
        use_xpos=xpos)).eval()
    draft = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(draft_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=draft_tokenizer.pad_token_id,
        eos_token_id=draft_tokenizer.eos_token_id, initializer_range=0.5)).eval()
    for prompt in ("def add(a, b):", "import os\nprint", "class Stack:\n    def"):
        ids = bpe_tokenizer([prompt], return_tensors="pt")
        expected = target.generate(**ids, max_new_tokens=20, do_sample=False)
        out = target.generate(**ids, max_new_tokens=20, do_sample=False, assistant_model=draft,
                              tokenizer=bpe_tokenizer, assistant_tokenizer=draft_tokenizer)
        assert torch.equal(out, expected), prompt
