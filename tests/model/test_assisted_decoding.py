"""Assisted decoding with RetNet as the target: prompt lookup and a draft model propose tokens, the target
verifies them in one forward and transformers crops the rejected ones out of its cache. A recurrent state cannot
drop tokens, so RetNetCache goes back to a snapshot and the next forward feeds the accepted ones again: the
output must equal plain greedy decoding's, token for token, in every retention form."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retnet.model import modeling_retnet
from retnet.model.cache import RetNetCache
from retnet.model.modeling_retnet import CACHE_KWARG

# transformers < 5.25 refuses assisted decoding of a recurrent state (the refusal: test_assisted_decoding.py).
needs_rollback = pytest.mark.skipif(
    not modeling_retnet.ASSISTED_ROLLBACK, reason="transformers < 5.25 refuses assisted decoding of a recurrent state"
)

GREEDY = dict(do_sample=False, eos_token_id=None)


def _repetitive_prompt(length=30, repeat=12, seed=5):
    # n-grams that recur, so that prompt lookup finds candidates (some accepted, most not, by a random model)
    ids = torch.randint(2, 101, (1, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:, :repeat]], 1)


@pytest.fixture
def crops(monkeypatch):
    """(tokens_to_remove, seen before, seen after) of every crop of a RetNetCache."""
    calls = []
    crop = RetNetCache.crop

    def recording(self, tokens_to_remove):
        before = self.seen_tokens
        crop(self, tokens_to_remove)
        calls.append((tokens_to_remove, before, self.seen_tokens))

    monkeypatch.setattr(RetNetCache, "crop", recording)
    return calls


def _assert_rolled_back(crops):
    # some candidates were rejected, and the state went back past the accepted ones (fed again next)
    assert any(removed < 0 for removed, _, _ in crops)
    assert any(after < before + removed for removed, before, after in crops if removed < 0)


@needs_rollback
@torch.no_grad()
@pytest.mark.parametrize("mode", ("chunkwise", "recurrent", "parallel"))
@pytest.mark.parametrize("use_xpos", (False, True))
def test_prompt_lookup_decoding_equals_greedy_decoding(model_factory, crops, mode, use_xpos):
    model = model_factory(initializer_range=0.5, retention_mode=mode, use_xpos=use_xpos)
    ids = _repetitive_prompt()
    expected = model.generate(ids, max_new_tokens=24, **GREEDY)
    assert torch.equal(model.generate(ids, max_new_tokens=24, prompt_lookup_num_tokens=3, **GREEDY), expected)
    _assert_rolled_back(crops)


@needs_rollback
@torch.no_grad()
def test_a_draft_retnet_keeps_its_cache_between_rounds_and_the_output_is_the_targets_greedy_one(model_factory,
                                                                                                   crops):
    target = model_factory(initializer_range=0.5)
    draft = model_factory(seed=1, initializer_range=0.5)
    ids = _repetitive_prompt(length=20, repeat=0)
    expected = target.generate(ids, max_new_tokens=20, **GREEDY)
    prefills = []
    draft.register_forward_pre_hook(lambda module, args, kwargs: prefills.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    assert torch.equal(target.generate(ids, max_new_tokens=20, assistant_model=draft, **GREEDY), expected)
    _assert_rolled_back(crops)
    # only the first round prefills the prompt; later ones feed what the draft has not seen (a few tokens)
    assert prefills[0] == ids.shape[1] and max(prefills[1:]) < 8


@needs_rollback
@torch.no_grad()
def test_another_models_draft_for_a_retnet_target(model_factory, crops):
    target = model_factory(initializer_range=0.5)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)).eval()
    ids = _repetitive_prompt()
    expected = target.generate(ids, max_new_tokens=16, **GREEDY)
    assert torch.equal(target.generate(ids, max_new_tokens=16, assistant_model=llama, **GREEDY), expected)


@needs_rollback
@torch.no_grad()
def test_the_returned_cache_continues_like_plain_decoding(model_factory):
    model = model_factory(initializer_range=0.5)
    ids = _repetitive_prompt()
    out = model.generate(ids, max_new_tokens=12, prompt_lookup_num_tokens=3, return_dict_in_generate=True,
                         **GREEDY)
    cache = out.get(CACHE_KWARG)
    # handed back as a plain cache; it may stand before the last accepted tokens (it feeds them again)
    assert isinstance(cache, RetNetCache) and not cache.recording and cache.snapshot is None
    assert cache.get_seq_length() <= out.sequences.shape[1] - 1
    continued = model.generate(out.sequences, **{CACHE_KWARG: cache}, max_new_tokens=6, **GREEDY)
    assert torch.equal(continued, model.generate(ids, max_new_tokens=18, **GREEDY))


@needs_rollback
@torch.no_grad()
def test_an_eos_among_the_accepted_candidates_stops_as_plain_decoding(model_factory):
    model = model_factory(initializer_range=0.5)
    ids = _repetitive_prompt()
    plain = model.generate(ids, max_new_tokens=20, **GREEDY)
    eos = int(plain[0, ids.shape[1] + 6])
    settings = dict(do_sample=False, eos_token_id=eos, pad_token_id=0, max_new_tokens=20)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **settings), model.generate(ids, **settings))


@needs_rollback
@torch.no_grad()
def test_speculative_sampling_with_a_draft_is_seeded(model_factory):
    target = model_factory(initializer_range=0.5)
    draft = model_factory(seed=1, initializer_range=0.5)
    ids = _repetitive_prompt()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(target.generate(ids, max_new_tokens=12, do_sample=True, eos_token_id=None, assistant_model=draft))
    assert runs[0].shape == (1, ids.shape[1] + 12) and torch.equal(runs[0], runs[1])


@torch.no_grad()
def test_crop_goes_back_to_the_snapshot_and_no_further(model_factory):
    model = model_factory()
    cache = RetNetCache(model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="holds none"):
        model(torch.arange(2, 12)[None], **{CACHE_KWARG: cache}).get(CACHE_KWARG).crop(-2)
    cache = RetNetCache(model.config.num_hidden_layers)
    cache.activate_past_recording(3)
    assert cache.is_croppable and cache.get_recurrent_states_to_keep() == 3
    model(torch.arange(2, 12)[None], **{CACHE_KWARG: cache})  # ten tokens: the snapshot after six
    cache.crop(0)
    assert cache.get_seq_length() == 10
    cache.crop(-2)  # to 8: back to 6, two to feed again
    assert (cache.get_seq_length(), cache.refeed, int(cache.offsets)) == (6, 2, 6)
    plain = model(torch.arange(2, 8)[None]).get(CACHE_KWARG)
    # (close, not equal: on several threads the ten-token forward's matmuls split otherwise than the six-token one's)
    for kept, fed in zip(cache.states, plain.states, strict=True):
        torch.testing.assert_close(kept, fed, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"go back from 6 to 4 tokens.*one at 6 tokens"):
        cache.crop(-2)
    cache.crop(9)  # a positive count keeps that many: more than seen is no crop
    assert cache.get_seq_length() == 6


@torch.no_grad()
def test_a_transformers_that_cannot_roll_the_state_back_refuses_by_version(model_factory, monkeypatch):
    monkeypatch.setattr(modeling_retnet, "ASSISTED_ROLLBACK", False)
    model = model_factory()
    with pytest.raises(ValueError, match=r"needs transformers >= 5\.25"):
        model.generate(_repetitive_prompt(), max_new_tokens=4, prompt_lookup_num_tokens=3, **GREEDY)


@needs_rollback
@torch.no_grad()
@pytest.mark.parametrize("use_xpos", (False, True))
def test_the_snapshot_costs_no_second_pass_through_the_model_but_in_xpos_frames(model_factory, crops, use_xpos):
    # Without xPos each layer keeps its state between two retention calls; in xPos frames the state between them
    # is in the first's frame, so the forward runs in two passes instead.
    model = model_factory(initializer_range=0.5, use_xpos=use_xpos)
    passes, layer_calls = [], []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    model.model.layers[0].register_forward_pre_hook(lambda *_: layer_calls.append(1))
    model.generate(_repetitive_prompt(), max_new_tokens=24, prompt_lookup_num_tokens=3, **GREEDY)
    _assert_rolled_back(crops)
    assert (len(layer_calls) > len(passes)) == use_xpos


@needs_rollback
@torch.no_grad()
def test_a_failed_assisted_run_hands_the_callers_cache_back_plain(model_factory):
    model = model_factory(initializer_range=0.5)
    ids = _repetitive_prompt()
    cache = model(ids[:, :-1], use_cache=True).get(CACHE_KWARG)
    calls = []

    def failing(input_ids, scores):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a logits processor failed")
        return scores

    with pytest.raises(RuntimeError, match="logits processor failed"):
        model.generate(ids, **{CACHE_KWARG: cache}, max_new_tokens=12, prompt_lookup_num_tokens=3,
                       logits_processor=[failing], **GREEDY)
    assert (cache.recording, cache.snapshot, cache.refeed) == (0, None, 0)  # no second set of states kept alive


@torch.no_grad()
def test_a_recording_cache_refuses_packed_sequences(model_factory):
    model = model_factory()
    cache = RetNetCache(model.config.num_hidden_layers)
    cache.activate_past_recording(2)
    with pytest.raises(ValueError, match=r"recording cache .* takes no cu_seqlens"):
        model(torch.arange(2, 12)[None], cu_seqlens=torch.tensor([0, 4, 10]), **{CACHE_KWARG: cache})
