"""The model as a transformers user drives it, off the paths tested elsewhere (third hunt)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retnet.model import RetNetConfig, RetNetForCausalLM, modeling_retnet

from .conftest import TEXTS

GREEDY = dict(do_sample=False)


@torch.no_grad()
@pytest.mark.skipif(not modeling_retnet.ASSISTED_ROLLBACK, reason="transformers < 5.25 drafts without a kept cache")
def test_a_retnet_draft_for_a_target_of_another_tokenizer(bpe_tokenizer):
    # Assisted generation across tokenizers (tokenizer=, assistant_tokenizer=): transformers counts the tokens to crop
    # out of the draft's cache in the target's tokens, so it asks for crops further back than the draft's snapshot
    # ("a recurrent state can only return to a snapshot") and leaves it uncropped ("none of them is new"): every
    # generate failed after a round or two. The draft's cache starts again from nothing there (every round gets the
    # whole sequence), and the output is the target's greedy one.
    from retnet.tokenization import train_byte_level_bpe

    target_tokenizer = bpe_tokenizer
    draft_tokenizer = train_byte_level_bpe(TEXTS, vocab_size=260, min_frequency=1)
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(target_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=target_tokenizer.pad_token_id,
        eos_token_id=target_tokenizer.eos_token_id, initializer_range=0.5)).eval()
    draft = RetNetForCausalLM(RetNetConfig(
        vocab_size=len(draft_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=8,
        pad_token_id=draft_tokenizer.pad_token_id, eos_token_id=draft_tokenizer.eos_token_id,
        initializer_range=0.5)).eval()
    for prompt in ("def add(a, b):", "import os\nprint"):
        ids = target_tokenizer([prompt], return_tensors="pt")
        expected = target.generate(**ids, max_new_tokens=20, **GREEDY)
        out = target.generate(**ids, max_new_tokens=20, assistant_model=draft, tokenizer=target_tokenizer,
                              assistant_tokenizer=draft_tokenizer, **GREEDY)
        assert torch.equal(out, expected)


@torch.no_grad()
def test_a_right_padded_row_is_not_let_repeat_what_no_repeat_ngram_size_forbids_it_alone(model_factory):
    # transformers' logits processors read the context from input_ids: with the padding between a right-padded
    # row's prompt and its new tokens, no_repeat_ngram_size matched n-grams across the padding, and the row repeated
    # a bigram its prompt alone forbids (54, 54 after a prompt ending in 54). generate now reads such a prompt
    # left-aligned and hands its columns back as given.
    model = model_factory(eos_token_id=None, initializer_range=0.3)
    prompt = torch.tensor([[54, 74, 100, 20, 58, 71, 54]])
    other = torch.arange(5, 15)[None]
    alone = model.generate(prompt, max_new_tokens=4, no_repeat_ngram_size=2, **GREEDY)
    ids = torch.cat([other, torch.cat([prompt, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = (ids != 0).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, no_repeat_ngram_size=2,
                         return_dict_in_generate=True, output_hidden_states=True, **GREEDY)
    assert torch.equal(out.sequences[1, 10:], alone[0, 7:])
    assert torch.equal(out.sequences[:, :10], ids)  # the prompt's columns as given, the new tokens after them
    alone_states = model(prompt, output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(out.hidden_states[0][-1][1, :7], alone_states, atol=1e-5)  # in the prompt's columns
    # Beams (num_beams rows a prompt, fewer sequences returned) and steps without a cache (each spanning the
    # prompt): every step's prompt columns back in place, each row its own prompt's
    for options in ({"num_beams": 3, "num_return_sequences": 2}, {"use_cache": False}):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, return_dict_in_generate=True,
                             output_hidden_states=True, **GREEDY, **options)
        for step in out.hidden_states if "use_cache" in options else out.hidden_states[:1]:
            rows = step[-1].shape[0] // 2
            assert step[-1].shape[0] == 2 * options.get("num_beams", 1)
            assert all(torch.allclose(step[-1][row, :7], alone_states, atol=1e-5)
                       for row in range(rows, 2 * rows))


@torch.no_grad()
@pytest.mark.skipif(not modeling_retnet.ASSISTED_ROLLBACK, reason="transformers < 5.25 refuses assisted decoding")
def test_assisted_decoding_of_a_right_padded_prompt_gives_plain_generates_tokens(model_factory):
    # transformers verifies the first candidate with the prompt's last column's logits: after trailing padding (a
    # tokenizer's pad_to_multiple_of, say) a padding column's. The tokens differed from plain generate's, silently
    # (transformers' right-padding warning is dropped while RetNet generates). The prompt now runs left-aligned;
    # where it cannot (a streamer, given positions), such a prompt is refused.
    from transformers import TextStreamer

    model = model_factory(initializer_range=0.5, eos_token_id=None)
    prompt = torch.randint(2, 101, (1, 14), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([prompt, prompt[:, :8], torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = (torch.arange(ids.shape[1]) < 22).long()[None]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, prompt_lookup_num_tokens=3,
                                      **GREEDY), expected)

    class Tokens:
        def decode(self, *args, **kwargs):
            return ""

    with pytest.raises(ValueError, match="attention_mask ends in padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, prompt_lookup_num_tokens=3,
                       streamer=TextStreamer(Tokens()), **GREEDY)
