"""Assisted decoding with RetNet as the target, off the main path: more candidates than the cache was first told
to keep (a heuristic schedule), the outputs transformers collects per token, and a cache continued from an
earlier generate. Each compared with plain greedy decoding, token for token."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retnet.model import modeling_retnet
from retnet.model.cache import RetNetCache
from retnet.model.modeling_retnet import CACHE_KWARG

# transformers < 5.25 refuses assisted decoding of a recurrent state (the refusal: test_assisted_decoding.py).
pytestmark = pytest.mark.skipif(
    not modeling_retnet.ASSISTED_ROLLBACK, reason="transformers < 5.25 refuses assisted decoding of a recurrent state"
)

GREEDY = dict(do_sample=False, eos_token_id=None)


def _repetitive_prompt(length=30, repeat=12, seed=5):
    ids = torch.randint(2, 101, (1, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:, :repeat]], 1)


@torch.no_grad()
def test_more_candidates_than_the_cache_was_told_to_keep_are_rolled_back(model_factory):
    # transformers activates the recording once, with the draft count of the time; a "heuristic" schedule then
    # grows it by 2 after each fully accepted round. The forward after one took its snapshot `recording + 1`
    # tokens before its end, and the crop of a longer rejected draft failed ("can only return to a snapshot").
    target = model_factory(initializer_range=0.5)
    draft = model_factory(initializer_range=0.5)
    torch.manual_seed(0)
    for parameter in draft.parameters():  # close to the target: it agrees for a while, then does not
        parameter.add_(torch.randn_like(parameter) * 0.02)
    draft.generation_config.num_assistant_tokens = 1
    draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    ids = torch.randint(2, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = target.generate(ids, max_new_tokens=16, **GREEDY)
    assert torch.equal(target.generate(ids, max_new_tokens=16, assistant_model=draft, **GREEDY), expected)


@torch.no_grad()
def test_a_crop_after_a_forward_longer_than_the_recording_of_a_running_cache(model_factory):
    model = model_factory()
    cache = RetNetCache(model.config.num_hidden_layers)
    cache.activate_past_recording(1)
    model(torch.arange(2, 12)[None], **{CACHE_KWARG: cache})  # the prompt (and one candidate)
    cache.crop(0)
    model(torch.arange(12, 17)[None], **{CACHE_KWARG: cache})  # a bonus token and four candidates
    cache.crop(-4)
    if cache.refeed:
        model(torch.arange(17 - 4 - cache.refeed, 13)[None], **{CACHE_KWARG: cache})
    plain = model(torch.arange(2, 13)[None]).get(CACHE_KWARG)
    assert cache.get_seq_length() == 11
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cache.states, plain.states))


@torch.no_grad()
def test_hidden_states_scores_and_logits_per_token_equal_greedy_decodings(model_factory):
    # After a crop the next forward feeds the accepted tokens again: transformers splits that forward's hidden
    # states per token expecting only the new ones, and failed on "Could not find a (batch_size, seq_len) pair".
    model = model_factory(initializer_range=0.5)
    ids = _repetitive_prompt()
    settings = dict(max_new_tokens=16, return_dict_in_generate=True, output_hidden_states=True, output_scores=True,
                    output_logits=True, **GREEDY)
    plain = model.generate(ids, **settings)
    assisted = model.generate(ids, prompt_lookup_num_tokens=3, **settings)
    assert torch.equal(assisted.sequences, plain.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(assisted, name)) == len(getattr(plain, name)) == 16
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(getattr(assisted, name), getattr(plain, name)))
    assert len(assisted.hidden_states) == len(plain.hidden_states)
    for step, (got, expected) in enumerate(zip(assisted.hidden_states, plain.hidden_states)):
        for a, b in zip(got, expected):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), step


@torch.no_grad()
def test_prompt_lookup_continuing_a_cache_of_an_earlier_generate(model_factory):
    # transformers' assisted loop feeds its first forward the whole sequence: on a cache that has seen most of it
    # the state took the sequence in twice (silently another output).
    model = model_factory(initializer_range=0.5, use_xpos=True)
    ids = _repetitive_prompt()
    first = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True, **GREEDY)
    expected = model.generate(ids, max_new_tokens=16, **GREEDY)
    cache = first.get(CACHE_KWARG)
    continued = model.generate(first.sequences, **{CACHE_KWARG: cache}, max_new_tokens=10,
                               prompt_lookup_num_tokens=3, **GREEDY)
    assert torch.equal(continued, expected)
    assert not cache.recording and cache.snapshot is None  # handed back plain


@torch.no_grad()
def test_a_draft_retnet_continuing_a_target_cache(model_factory):
    # (the draft starts its own cache; the target's continues)
    target = model_factory(initializer_range=0.5)
    draft = model_factory(seed=1, initializer_range=0.5)
    ids = _repetitive_prompt(length=16, repeat=0)
    first = target.generate(ids, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
    continued = target.generate(first.sequences, **{CACHE_KWARG: first.get(CACHE_KWARG)}, max_new_tokens=8,
                                assistant_model=draft, **GREEDY)
    assert torch.equal(continued, target.generate(ids, max_new_tokens=12, **GREEDY))


@torch.no_grad()
def test_a_retnet_draft_with_a_heuristic_schedule_for_another_target(model_factory):
    # the draft's cache records from its first round with the count of then; later rounds draft more
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)).eval()
    draft = model_factory(initializer_range=0.5, use_xpos=True)
    draft.generation_config.num_assistant_tokens = 1
    draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    ids = _repetitive_prompt(length=12, repeat=0)
    expected = llama.generate(ids, max_new_tokens=12, **GREEDY)
    assert torch.equal(llama.generate(ids, max_new_tokens=12, assistant_model=draft, **GREEDY), expected)


def test_clone_of_a_recording_cache_keeps_what_the_next_forward_needs(model_factory):
    model = model_factory()
    cache = RetNetCache(model.config.num_hidden_layers)
    cache.activate_past_recording(3)
    with torch.no_grad():
        model(torch.arange(2, 12)[None], **{CACHE_KWARG: cache})
    cache.crop(-2)
    copy = cache.clone()
    # (the tokens it feeds again next are answered already: their outputs are left out, so it must know them)
    assert (copy.recording, copy.refeed, copy.snapshot.seen_tokens) == (cache.recording, cache.refeed, 6) == (3, 2, 6)
    copy.to("meta")  # moves its own snapshot, not the original's
    assert cache.snapshot.states[0].device.type == "cpu" and copy.snapshot.states[0].device.type == "meta"


@torch.no_grad()
def test_continuing_a_cache_from_only_the_new_tokens_is_refused_by_name(model_factory):
    # transformers' assisted loop cuts the mask to the inputs' width: the new tokens alone cannot be told from the
    # ones the cache saw (the first forward got none of them, and failed on a shape deep in the rotary embedding)
    model = model_factory(initializer_range=0.5)
    first = model.generate(_repetitive_prompt(), max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    cache = first.get(CACHE_KWARG)
    whole = torch.cat([first.sequences, torch.tensor([[7, 8, 9]])], 1)
    with pytest.raises(ValueError, match=r"needs input_ids to be the whole sequence.*4 input columns.*mask of 50"):
        model.generate(whole[:, cache.get_seq_length():], attention_mask=torch.ones_like(whole),
                       **{CACHE_KWARG: cache.clone()}, max_new_tokens=4, prompt_lookup_num_tokens=2, **GREEDY)
    continued = model.generate(whole, attention_mask=torch.ones_like(whole), **{CACHE_KWARG: cache}, max_new_tokens=4,
                               prompt_lookup_num_tokens=2, **GREEDY)
    assert torch.equal(continued, model.generate(whole, max_new_tokens=4, **GREEDY))


@torch.no_grad()
def test_early_exit_drafting_is_refused_by_name(model_factory):
    # transformers drafts from the first layers by lowering config.num_hidden_layers, which the forward does not
    # read: it failed on "the cache has 1 layers, but the model has 2"
    with pytest.raises(ValueError, match="assistant_early_exit is not supported"):
        model_factory().generate(_repetitive_prompt(), max_new_tokens=4, assistant_early_exit=1, **GREEDY)
