"""transformers features a causal-LM user reaches for, on a tiny random RetNet: what works with a recurrent
state gives the same tokens as without one; what cannot (a rolled-back or KV cache, attention weights) is a
clear error."""

import pytest
import torch
from transformers import DynamicCache
from transformers.utils import find_labels

from retnet.model import RetNetCache, RetNetForCausalLM, RetNetForSequenceClassification
from retnet.model.modeling_retnet import CACHE_KWARG

GREEDY = dict(do_sample=False, eos_token_id=None)


def _prompt(length, seed=5, batch=2):
    return torch.randint(2, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    ids = _prompt(9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


@pytest.fixture
def model(model_factory):
    # a larger init than the default so that greedy decoding does not settle on one repeated token
    return model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5)


@torch.no_grad()
def test_output_attentions_is_refused_clearly(model):
    with pytest.raises(ValueError, match="no attention weights"):
        model(_prompt(5), output_attentions=True)
    with pytest.raises(ValueError, match="no attention weights"):
        model.generate(_prompt(5), max_new_tokens=2, output_attentions=True, return_dict_in_generate=True, **GREEDY)
    assert model(_prompt(5), output_attentions=False).logits.shape == (2, 5, 101)


@torch.no_grad()
@pytest.mark.parametrize("name", ("cache", "past_key_values"))
def test_a_kv_cache_is_refused_clearly(model, name):
    with pytest.raises(TypeError, match="RetNetCache"):
        model(_prompt(5), **{name: DynamicCache()})
    with pytest.raises(TypeError, match="RetNetCache"):
        model.generate(_prompt(5), max_new_tokens=2, **{name: DynamicCache()}, **GREEDY)


@torch.no_grad()
@pytest.mark.parametrize("user_cache", (False, True))
@pytest.mark.parametrize("padded", (False, True))
def test_chunked_prefill_gives_the_same_tokens(model, user_cache, padded):
    ids, mask = _left_padded() if padded else (_prompt(9), None)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    extra = {CACHE_KWARG: RetNetCache(1)} if user_cache else {}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, prefill_chunk_size=4, **extra, **GREEDY)
    assert torch.equal(out, expected)


@torch.no_grad()
@pytest.mark.parametrize("whole", (True, False))
@pytest.mark.parametrize("padded", (False, True))
def test_chunked_prefill_continues_a_filled_cache(model, whole, padded):
    # transformers 5.17 counts a chunked prefill's columns from 0 whatever the cache holds: its first chunk's
    # mask ended before the cache's tokens, so the model got no new tokens and failed on a shape mismatch
    ids, mask = _left_padded() if padded else (_prompt(9), torch.ones(2, 9, dtype=torch.long))
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    full = torch.cat([first.sequences, _prompt(10, seed=8)], 1)
    full_mask = torch.cat([mask, torch.ones(2, full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    expected = model.generate(full, attention_mask=full_mask, max_new_tokens=5, **GREEDY)[:, full.shape[1]:]
    inputs = full if whole else full[:, cache.get_seq_length():]
    out = model.generate(inputs, attention_mask=full_mask, **{CACHE_KWARG: cache}, max_new_tokens=5,
                         prefill_chunk_size=4, **GREEDY)
    assert torch.equal(out[:, inputs.shape[1]:], expected)


@torch.no_grad()
@pytest.mark.parametrize("padded", (False, True))
def test_chunked_prefill_from_inputs_embeds(model, padded):
    # transformers splits input_ids, which are empty with inputs_embeds: the whole prompt met an empty mask or
    # empty position_ids and failed on a shape mismatch
    ids, mask = _left_padded() if padded else (_prompt(9), None)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)[:, ids.shape[1]:]
    embeds = model.get_input_embeddings()(ids)
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds" if kwargs.get("input_ids") is None
                                                           else "input_ids"].shape[1]), with_kwargs=True)
    try:
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, prefill_chunk_size=4,
                             **GREEDY)
    finally:
        hook.remove()
    assert torch.equal(out, expected)
    assert lengths == [4, 4, 1, 1, 1, 1, 1]  # the prompt's 9 in chunks, then one token a step


@torch.no_grad()
def test_continuing_a_cache_from_only_the_new_tokens_and_the_full_mask(model):
    ids, mask = _left_padded()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    # the last sampled token (not yet fed) and a few more, as a chat turn would append
    full = torch.cat([first.sequences, _prompt(4, seed=8)], 1)
    full_mask = torch.cat([mask, torch.ones(2, full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    expected = model.generate(full, attention_mask=full_mask, max_new_tokens=5, **GREEDY)[:, full.shape[1]:]
    new = full[:, cache.get_seq_length():]
    continued = model.generate(new, attention_mask=full_mask, **{CACHE_KWARG: cache}, max_new_tokens=5, **GREEDY)
    assert torch.equal(continued[:, new.shape[1]:], expected)


@torch.no_grad()
@pytest.mark.parametrize("implementation", ("static", "dynamic"))
def test_a_kv_cache_implementation_is_ignored_safely(model, implementation):
    ids = _prompt(7)
    expected = model.generate(ids, max_new_tokens=5, **GREEDY)
    assert torch.equal(model.generate(ids, max_new_tokens=5, cache_implementation=implementation, **GREEDY), expected)
    model.generation_config.cache_implementation = implementation
    assert torch.equal(model.generate(ids, max_new_tokens=5, **GREEDY), expected)


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [GREEDY, dict(do_sample=True, top_k=5, top_p=0.9, temperature=0.7, eos_token_id=None),
                                    dict(num_beams=2, length_penalty=0.5, early_stopping=True, **GREEDY)])
def test_scores_and_logits_with_the_cache_match_recomputing(model, kwargs):
    ids, mask = _left_padded()
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=use_cache, output_scores=True,
                                      output_logits=True, return_dict_in_generate=True, **kwargs))
    cached, recomputed = outputs
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores + cached.logits, recomputed.scores + recomputed.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", (True, False))
def test_generate_from_inputs_embeds(model, use_cache):
    ids, mask = _left_padded()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)[:, ids.shape[1]:]
    embeds = model.get_input_embeddings()(ids)
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, use_cache=use_cache, **GREEDY)
    assert torch.equal(out, expected)


@torch.no_grad()
def test_an_all_ones_mask_is_no_mask(model):
    ids = _prompt(9)
    ones = torch.ones_like(ids)
    assert torch.equal(model(ids, attention_mask=ones).logits, model(ids).logits)
    assert torch.equal(model.generate(ids, attention_mask=ones, max_new_tokens=4, **GREEDY),
                       model.generate(ids, max_new_tokens=4, **GREEDY))


@torch.no_grad()
@pytest.mark.parametrize("whole", (True, False))
def test_generate_from_inputs_embeds_continues_a_cache(model, whole):
    ids, mask = _left_padded()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    expected = model.generate(first.sequences, attention_mask=full_mask, max_new_tokens=5, **GREEDY)[:, -5:]
    embeds = model.get_input_embeddings()(first.sequences)
    # transformers' convention: the whole sequence's embeddings, or only the new ones with the whole mask
    embeds = embeds if whole else embeds[:, cache.get_seq_length():]
    out = model.generate(inputs_embeds=embeds, attention_mask=full_mask, **{CACHE_KWARG: cache}, max_new_tokens=5,
                         **GREEDY)
    assert torch.equal(out, expected)


@torch.no_grad()
@pytest.mark.parametrize("given_positions", (False, True))
def test_xpos_continuation_with_padding_in_the_new_tokens(model_factory, given_positions):
    # a padded chunk on top of a cache runs packed, and only its real tokens' positions may count against the
    # packed xPos frame: position_ids made as transformers makes them have 0 at padded positions
    model = model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5,
                          use_xpos=True)
    ids, mask = _left_padded()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    extra = _prompt(5, seed=9)
    extra_mask = torch.ones_like(extra)
    extra_mask[1, :3] = 0
    full = torch.cat([first.sequences, extra], 1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype), extra_mask], 1)
    expected = model.generate(full, attention_mask=full_mask, max_new_tokens=5, **GREEDY)
    positions = dict(position_ids=(full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)) if given_positions else {}
    continued = model.generate(full, attention_mask=full_mask, **{CACHE_KWARG: cache}, max_new_tokens=5, **positions,
                               **GREEDY)
    assert torch.equal(continued, expected)


@torch.no_grad()
def test_continuing_a_cache_from_inputs_it_has_already_seen_is_refused_clearly(model):
    # Only the new tokens without the whole mask: transformers takes input_ids as the whole sequence, of which
    # the cache has seen more than there is, so nothing would be fed to the model.
    first = model.generate(_prompt(9), max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    with pytest.raises(ValueError, match=r"seen 11 tokens.*4 columns.*whole sequence"):
        model.generate(_prompt(4, seed=8), **{CACHE_KWARG: cache}, max_new_tokens=2, **GREEDY)
    embeds = model.get_input_embeddings()(_prompt(4, seed=8))
    with pytest.raises(ValueError, match=r"seen 11 tokens.*4 columns.*whole sequence"):
        model.generate(inputs_embeds=embeds, **{CACHE_KWARG: cache}, max_new_tokens=2, **GREEDY)


@torch.no_grad()
def test_generate_leaves_the_positions_to_the_model_and_keeps_given_ones(model_factory):
    # transformers makes position_ids from the mask and grows them by a copy every step. Given positions may
    # start anywhere, so an xPos model checks them against the cache on the host and moves each layer's state
    # into their frame: a device sync and a pass over every state in every decoding step. The model numbers each
    # row's real tokens from its cache's offsets itself, the same positions.
    model = model_factory(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5,
                          use_xpos=True)
    ids, mask = _left_padded()
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
        assert seen and all(positions is None for positions in seen)
        recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=4, use_cache=False, **GREEDY)
        assert torch.equal(out, recomputed)
        seen.clear()
        # positions a caller passes still reach the model, grown by one a step
        given = (mask.cumsum(-1) - 1).clamp(min=0) + 3
        shifted = model.generate(ids, attention_mask=mask, position_ids=given, max_new_tokens=4, **GREEDY)
        assert [p[:, -1].tolist() for p in seen] == [[7, 11], [8, 12], [9, 13], [10, 14]]
    finally:
        hook.remove()
    assert shifted.shape == out.shape


@pytest.mark.parametrize("model_class", (RetNetForCausalLM, RetNetForSequenceClassification))
def test_trainer_sees_labels_as_the_only_label(model_class):
    # Trainer's default label_names are the forward parameters named like a label (find_labels), and evaluate()
    # computes no loss unless a batch holds every one of them: a shift_labels parameter beside labels left
    # Trainer.evaluate() without an eval_loss. shift_labels is still taken as a keyword.
    assert find_labels(model_class) == ["labels"]


@torch.no_grad()
def test_shift_labels_as_a_keyword_give_the_labels_loss(model):
    ids = _prompt(7)
    shifted = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(model(ids, shift_labels=shifted).loss, model(ids, labels=ids).loss)
    with pytest.raises(ValueError, match="labels or shift_labels, not both"):
        model(ids, labels=ids, shift_labels=shifted)
