"""xPos at long contexts: q·ζ^(n/base) and k·ζ^(−n/base) would under/overflow at large positions n (fp32 from
n ≈ 36 650 at base 512, fp16 from n ≈ 4 960), so positions are taken relative to a frame near the tokens."""

import pytest
import torch

from retnet.model import RetNetCache, RetNetConfig, RetNetForCausalLM, modeling_retnet

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


def xpos_model(seed=0, **overrides):
    settings = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, chunk_size=8,
                    tie_word_embeddings=True, use_xpos=True)
    settings.update(overrides)
    torch.manual_seed(seed)
    return RetNetForCausalLM(RetNetConfig(**settings)).eval()


@pytest.mark.parametrize("shift", [10**5, 10**6, 10**9])
@pytest.mark.parametrize("mode", ["recurrent", "chunkwise", "parallel"])
def test_continuation_at_a_huge_position_matches_the_same_at_small_positions(shift, mode):
    model = xpos_model()
    ids = torch.randint(2, 101, (2, 23))
    cache = model(ids[:, :12]).cache
    far = RetNetCache.zeros(model.config, 2)
    far.offsets += shift  # as if 'shift' tokens had been seen (that left nothing in the state), without running them
    model(ids[:, :12], cache=far)  # positions shift .. shift + 11
    near_logits = model(ids[:, 12:], cache=cache, retention_mode=mode).logits
    far_logits = model(ids[:, 12:], cache=far, retention_mode=mode).logits
    assert torch.isfinite(far_logits).all()
    torch.testing.assert_close(far_logits, near_logits, atol=2e-5, rtol=1e-5)
    for layer in range(2):  # the states differ by the rotary angle (absolute); their size does not
        assert torch.isfinite(far.states[layer]).all()
        torch.testing.assert_close(far.states[layer].norm(dim=(2, 3)), cache.states[layer].norm(dim=(2, 3)),
                                   atol=1e-4, rtol=1e-4)
    # and decoding on from there
    step = ids[:, -1:]
    torch.testing.assert_close(model(step, cache=far).logits, model(step, cache=cache).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "fp16"])
def test_forward_at_large_positions_is_finite_and_shift_invariant(precision):
    model = xpos_model()
    if precision == "fp16":
        model = model.half()
    ids = torch.randint(2, 101, (1, 16))

    def run(start):
        positions = (start + torch.arange(16))[None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            return model(ids, position_ids=positions, use_cache=False).logits.float()

    reference = run(0)
    for start in (5_000, 40_000, 10**6):  # fp16 gave NaN from ~4 960, fp32 and bf16 from ~36 650
        out = run(start)
        assert torch.isfinite(out).all(), start
        torch.testing.assert_close(out, reference, atol={"fp32": 1e-4, "bf16-autocast": 1e-2, "fp16": 2e-3}[precision], rtol=0)


def test_rotary_angles_keep_their_precision_at_large_positions():
    # fp32 angles were off by up to ~0.06 rad at 10⁶ (logits moved 3e-3 on this model).
    model = xpos_model(use_xpos=False)
    ids = torch.randint(2, 101, (1, 16))
    reference = model(ids, use_cache=False).logits
    far = model(ids, position_ids=(10**6 + torch.arange(16))[None], use_cache=False).logits
    torch.testing.assert_close(far, reference, atol=2e-6, rtol=0)


def test_a_forward_longer_than_one_frame_runs_in_frames_and_the_forms_agree(monkeypatch):
    # xpos_scale_base=4: one frame covers 16 positions, so 70 tokens take 5 frames.
    model = xpos_model(xpos_scale_base=4.0)
    assert modeling_retnet.xpos_span(model.config) == 16
    ids = torch.randint(2, 101, (2, 70))
    outputs = {mode: model(ids, retention_mode=mode) for mode in ("parallel", "chunkwise", "recurrent")}
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outputs[mode].logits, outputs["parallel"].logits, atol=2e-5, rtol=1e-5)
    # One frame for all 70 (ζ^(−70/4) ≈ 3·10⁹ is still finite in fp32): the same function.
    monkeypatch.setattr(modeling_retnet, "xpos_span", lambda config, growth=None: 10**9)
    single = model(ids, retention_mode="parallel")
    torch.testing.assert_close(outputs["parallel"].logits, single.logits, atol=2e-5, rtol=1e-5)
    for layer in range(2):
        torch.testing.assert_close(outputs["parallel"].cache.states[layer], single.cache.states[layer],
                                   atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    # Cached, token by token (and a prefill then steps) equal uncached.
    cache = RetNetCache(2)
    steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(70)]
    torch.testing.assert_close(torch.cat(steps, 1), outputs["parallel"].logits, atol=2e-5, rtol=1e-5)
    cache = model(ids[:, :41]).cache
    rest = model(ids[:, 41:], cache=cache).logits
    torch.testing.assert_close(rest, outputs["parallel"].logits[:, 41:], atol=2e-5, rtol=1e-5)


def test_padded_and_packed_batches_with_xpos_match_single_sequences():
    model = xpos_model(xpos_scale_base=4.0)
    a, b = torch.randint(2, 101, (1, 12)), torch.randint(2, 101, (1, 7))
    ref_a, ref_b = model(a).logits, model(b).logits
    packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 12, 19])).logits
    torch.testing.assert_close(packed[:, :12], ref_a, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 12:], ref_b, atol=2e-5, rtol=1e-5)
    padded = torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)  # right padding: the packed path
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1).long()
    out = model(torch.cat([a, padded]), attention_mask=torch.cat([torch.ones(1, 12).long(), mask])).logits
    torch.testing.assert_close(out[1:, :7], ref_b, atol=2e-5, rtol=1e-5)


def test_limits_fail_loudly_naming_them():
    model = xpos_model(xpos_scale_base=4.0)
    ids = torch.randint(2, 101, (1, 300))
    # packed, a sequence runs in one frame: the scales' range bounds it (216 positions at base 4; fp16 models too,
    # whose q and k are scaled in fp32)
    with pytest.raises(ValueError, match=r"at most 216 positions per sequence"):
        model(ids, cu_seqlens=torch.tensor([0, 300]))
    with pytest.raises(ValueError, match=r"at most 216 positions per sequence"):
        xpos_model(xpos_scale_base=4.0).half()(ids, cu_seqlens=torch.tensor([0, 300]))
    ids = ids[:, :40]
    # positions far past the offsets of the cache the state would be returned in
    with pytest.raises(ValueError, match=r"past the cache's offsets.*at most \d+ are supported"):
        model(ids[:, :4], position_ids=(10**6 + torch.arange(4))[None])
    assert torch.isfinite(model(ids[:, :4], position_ids=(10**6 + torch.arange(4))[None], use_cache=False).logits).all()


def test_positions_far_behind_a_caches_offsets_fail_loudly():
    # Positions restarted at 0 on top of a long cache: moving its state back to their frame scales it by
    # ζ^(−behind/base), which overflowed fp32 into NaN logits and a NaN cache
    model = xpos_model(xpos_scale_base=4.0)
    cache = model(torch.randint(2, 101, (1, 400)), use_cache=True).cache
    ids = torch.randint(2, 101, (1, 5))
    near = model(ids, cache=cache.clone(), position_ids=torch.arange(390, 395)[None])
    assert torch.isfinite(near.logits).all() and all(torch.isfinite(s).all() for s in near.cache.states)
    before = [s.clone() for s in cache.states]
    with pytest.raises(ValueError, match=r"position_ids run 400 positions behind the cache's offsets.*at most \d+"):
        model(ids, cache=cache, position_ids=torch.arange(5)[None])
    assert all(torch.equal(a, b) for a, b in zip(cache.states, before))  # refused before anything ran


def test_packed_sequences_longer_than_a_frame_match_the_unpacked_run():
    # Training packs documents; one longer than the unpacked frame (16 positions at base 4) still runs packed
    # in fp32 and gives what the same documents give run alone (in frames).
    model = xpos_model(xpos_scale_base=4.0)
    ids = torch.randint(2, 101, (1, 150))
    packed = model(ids, cu_seqlens=torch.tensor([0, 97, 150]), use_cache=False).logits
    alone = torch.cat([model(ids[:, :97], use_cache=False).logits, model(ids[:, 97:], use_cache=False).logits], 1)
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_the_position_encoding_is_computed_once_per_forward_for_all_layers(monkeypatch):
    # Every layer rotates by the same angles and frames: one float64 table per forward, not one per layer
    # (a decode step of a 12-layer model ran ~450 of its ~1 540 ops there).
    model = xpos_model(xpos_scale_base=4.0, num_hidden_layers=3)
    calls = []
    original = modeling_retnet.RetNetRotaryEmbedding.forward
    monkeypatch.setattr(modeling_retnet.RetNetRotaryEmbedding, "forward",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
    cache = model(torch.randint(2, 101, (2, 40))).cache  # 40 tokens: 3 frames of 16 positions
    model(torch.randint(2, 101, (2, 1)), cache=cache)
    assert len(calls) == 2


def test_a_state_is_not_moved_into_the_frame_it_is_already_in(monkeypatch):
    # The model's own positions start every row at its cache's offsets, the frame its state is kept in: moving
    # it there multiplied each layer's [B, H, K, V] state by ones, a pass over the state as costly as the decay
    # itself (a decode step of an xPos model made three such passes per layer instead of two).
    model = xpos_model(xpos_scale_base=4.0)
    encodings = []
    original = modeling_retnet.RetNetRotaryEmbedding.forward
    monkeypatch.setattr(modeling_retnet.RetNetRotaryEmbedding, "forward",
                        lambda self, *args, **kwargs: encodings.append(original(self, *args, **kwargs)) or encodings[-1])
    ids = torch.randint(2, 101, (2, 45))
    reference = model(ids, use_cache=False).logits
    prefill = model(ids[:, :40], use_cache=True)  # 3 frames of 16 positions
    step = model(ids[:, 40:41], cache=prefill.cache)
    chunk = model(ids[:, 41:], cache=step.cache)
    torch.testing.assert_close(torch.cat([prefill.logits, step.logits, chunk.logits], 1), reference)
    own = encodings[1:]
    assert [piece.state_shift is None for piece in own[0].pieces] == [True, False, False]
    assert all(e.pieces[0].state_shift is None and e.final_shift is not None for e in own[1:])
    # given positions may start elsewhere: their frame is moved to
    model(ids[:, 41:], cache=step.cache, position_ids=torch.arange(45, 49).expand(2, -1))
    assert encodings[-1].pieces[0].state_shift is not None
