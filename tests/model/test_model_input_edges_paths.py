"""Model inputs at their edges: a forward of no new tokens with generate's [B, past] mask, the cache's to(), cu_seqlens refused by name."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("use_xpos", (False, True))
def test_no_new_tokens_with_a_mask_over_the_past_leaves_the_cache_as_it_was(model_factory, use_xpos):
    # attention_mask[:, -0:] is the whole mask: a [B, 0] input took the [B, past] mask as its own and failed to
    # broadcast it (RuntimeError), where the same call without a mask returned empty logits.
    model = model_factory(use_xpos=use_xpos)
    ids = torch.randint(2, 101, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        cache = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True).past_key_values
        before = cache.clone()
        empty = model(ids[:, :0], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
        assert empty.logits.shape == (2, 0, 101)
        assert torch.equal(cache.offsets, before.offsets) and cache.seen_tokens == before.seen_tokens
        assert all(torch.equal(a, b) for a, b in zip(cache.states, before.states, strict=True))
        after = model(ids[:, 5:], attention_mask=mask, past_key_values=cache).logits
        expected = model(ids[:, 5:], attention_mask=mask, past_key_values=before).logits
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_cache_to_a_dtype_is_refused_by_name(model_factory):
    # to(torch.bfloat16) made the offsets bf16, where 300 + 1 is 300: the positions of later tokens stopped
    # advancing, silently (and the states, documented fp32, were rounded)
    model = model_factory()
    with torch.no_grad():
        cache = model(torch.randint(2, 101, (1, 4)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"RetNetCache\.to takes a device, not a dtype"):
        cache.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"RetNetCache\.to takes a device, not a dtype"):
        cache.to(dtype=torch.bfloat16)  # (was Python's unexpected-keyword TypeError)
    assert cache.to() is cache
    assert cache.offsets.dtype == torch.int64 and all(s.dtype == torch.float32 for s in cache.states)
    assert cache.to("cpu") is cache


@pytest.mark.parametrize(("cu_seqlens", "refusal"), (
    ([0, 4, 9], "cu_seqlens must be a torch.Tensor of .N \\+ 1. offsets; got list"),  # was an AttributeError
    (torch.tensor([0, 4, 9], dtype=torch.uint16), "cu_seqlens must be an integer tensor of .*; got torch.uint16"),
    (torch.tensor([0.0, 4.0, 9.0]), "cu_seqlens must be an integer tensor of .*; got torch.float32"),
))
def test_packed_offsets_the_ops_refuse_are_refused_by_the_model_by_name(model_factory, cu_seqlens, refusal):
    # (uint16 failed on torch's type promotion building the positions, a RuntimeError)
    model = model_factory()
    with torch.no_grad(), pytest.raises(ValueError, match=refusal):
        model(torch.randint(2, 101, (1, 9)), cu_seqlens=cu_seqlens, use_cache=True)
