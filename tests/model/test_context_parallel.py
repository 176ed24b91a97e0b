"""Context parallelism (retnet/model/context_parallel.py): the layouts, the folds and the refusals in one process.
With xPos each piece runs in xPos frames of its own and moves the state crossing a cut into the receiving piece's
frame. A row split along time across real torchrun (gloo) ranks gives the whole row's outputs, loss and gradients,
with xPos too (2 and 3 pieces; packed rows with documents crossing the cuts, plain rows in several frames a piece,
positions whose scales from one origin lie beyond fp32): the rows of context_parallel_cases.py, checked by
tests/train/test_context_parallel_grpo_paths.py, whose 4-rank launch splits them on its first 2 and 3 ranks (a
launch of their own cost its ranks' start, ~25 s of CPU; the cases take under a second). (A training run of an xPos
``model.init_from`` split in two: tests/train/test_context_parallel.py.)"""

from __future__ import annotations

import pytest
import torch

from retnet.model.context_parallel import ContextShard, add_incoming, incoming_state, shard_sequences


def test_one_piece_is_the_plain_forward(model_factory):
    model = model_factory()
    input_ids = torch.randint(2, 101, (1, 45))
    cu_seqlens = torch.tensor([0, 7, 30, 45], dtype=torch.int32)
    inputs, shard, targets = shard_sequences(input_ids, input_ids, 0, 1, cu_seqlens)
    split = model(**inputs, context_parallel=shard, num_items_in_batch=targets)
    plain = model(input_ids=input_ids, labels=input_ids, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(split.logits, plain.logits)
    torch.testing.assert_close(split.loss, plain.loss)


def test_layout_of_a_packed_row():
    input_ids = torch.arange(12)[None]
    cu_seqlens = torch.tensor([0, 2, 9, 12], dtype=torch.int32)  # documents 0..2, 2..9, 9..12; pieces of 4
    labels = input_ids.clone()
    labels[0, [0, 2, 9]] = -100
    layouts = [shard_sequences(input_ids, labels, rank, 3, cu_seqlens) for rank in range(3)]
    shard = layouts[0][1]
    assert shard.offsets == (0, 2, 6) and shard.single == (False, True, False)
    assert [layout[0]["cu_seqlens"].tolist() for layout in layouts] == [[0, 2, 4], [0, 4], [0, 1, 4]]
    assert [layout[1].first_length for layout in layouts] == [2, 4, 1]
    # the labels move left on the whole row: piece 0's last token predicts piece 1's first
    assert layouts[0][0]["shift_labels"].tolist() == [[1, -100, 3, 4]]
    assert layouts[2][0]["shift_labels"].tolist() == [[-100, 10, 11, -100]]
    assert {layout[2] for layout in layouts} == {9}


def test_layout_of_unpacked_rows():
    inputs, shard, targets = shard_sequences(torch.zeros(2, 9, dtype=torch.long), None, 2, 3)
    assert inputs["input_ids"].shape == (2, 3) and "shift_labels" not in inputs and targets == 0
    assert shard.offsets == (0, 3, 6) and shard.single == (True, True, True) and shard.offset == 6


def test_state_folding_follows_the_layout(monkeypatch):
    """The fold of the gathered states, one process: decay through continuing single pieces, reset elsewhere."""
    states = torch.rand(4, 1, 2, 3, 3)
    monkeypatch.setattr("retnet.model.context_parallel._GatherStates.apply", lambda state, shard: states)
    log_decay = torch.log(torch.tensor([0.5, 0.9]))
    gamma = torch.exp(log_decay)[None, :, None, None]
    # piece 1 continues and is single (decays by γ^5 and adds), piece 2 starts fresh (resets), piece 3 continues
    shard = ContextShard(3, 4, (5, 5, 5, 5), (0, 3, 0, 2), (False, True, True, True))
    torch.testing.assert_close(incoming_state(states[3], log_decay, shard), states[2])
    shard = ContextShard(2, 4, (5, 5, 5, 5), (0, 3, 4, 2), (False, True, True, True))
    torch.testing.assert_close(incoming_state(states[2], log_decay, shard), states[0] * gamma ** 5 + states[1])
    shard = ContextShard(2, 4, (5, 5, 5, 5), (0, 3, 0, 2), (False, True, True, True))
    assert incoming_state(states[2], log_decay, shard).abs().max() == 0


def test_refusals(model_factory):
    model = model_factory()
    with pytest.raises(ValueError, match="does not split into 4 equal pieces"):
        shard_sequences(torch.zeros(1, 10, dtype=torch.long), None, 0, 4)
    with pytest.raises(ValueError, match="must rise strictly"):
        shard_sequences(torch.zeros(1, 10, dtype=torch.long), None, 0, 2, torch.tensor([0, 6, 6, 10]))
    with pytest.raises(ValueError, match="offsets\\[0\\]"):
        ContextShard(0, 2, (3, 3), (1, 0), (True, True))
    inputs, shard, _ = shard_sequences(torch.randint(2, 101, (1, 8)), None, 1, 2)
    with pytest.raises(ValueError, match="piece 1 of 2 has 4 tokens"):
        model(input_ids=inputs["input_ids"][:, :3], context_parallel=shard)
    with pytest.raises(ValueError, match="cannot take an attention_mask"):
        model(**inputs, context_parallel=shard, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="cannot take a cache"):
        model(**inputs, context_parallel=shard, use_cache=True)
    with pytest.raises(ValueError, match="labels or shift_labels"):
        model(input_ids=inputs["input_ids"], labels=inputs["input_ids"], shift_labels=inputs["input_ids"])


def test_the_incoming_share_is_fp32_under_fp16_autocast():
    """A long document's state exceeds fp16's range (the kernels keep it fp32): the share is summed in fp32."""
    torch.manual_seed(0)
    q = (torch.randn(1, 4, 2, 8) * 1e-3).half()
    state = torch.full((1, 2, 8, 8), 1e5)
    log_decay = torch.log(torch.tensor([0.999, 0.9999]))
    # from the same fp16 q: its rounding alone moves a sum that cancels by more than the tolerance
    expected = add_incoming(torch.zeros(1, 4, 2, 8), q.float(), state, log_decay, 8 ** -0.5, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        got = add_incoming(torch.zeros(1, 4, 2, 8, dtype=torch.float16), q, state, log_decay, 8 ** -0.5, 4)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=2e-3, atol=1e-3)


def _allocation_peak(run) -> tuple[int, object]:
    """(peak of torch's CPU allocations while ``run()`` runs, above what was live before; its result)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() in (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP):
            live += event.nbytes()
            peak = max(peak, live)
    assert events, "the profiler recorded no memory events"
    return peak, result


def test_the_incoming_share_makes_no_fp32_copy_of_q(monkeypatch):
    """The share is computed a chunk of time at a time (32 tokens here, 15 chunks for the first 480 tokens): the
    same outputs and gradients as the one-einsum form, while neither the forward's allocations nor what it keeps
    for the backward hold an fp32 copy of the first tokens' q (which the one-einsum form made, and kept)."""
    monkeypatch.setattr("retnet.model.context_parallel.SHARE_CHUNK_ELEMENTS", 2 * 4 * 32 * 32)
    batch, length, heads, k_dim, v_dim, first = 2, 512, 4, 32, 32, 480
    log_decay = torch.log(torch.tensor([0.9, 0.95, 0.99, 0.999]))
    torch.manual_seed(0)
    q, o = torch.randn(batch, length, heads, k_dim), torch.randn(batch, length, heads, v_dim)
    state = torch.randn(batch, heads, k_dim, v_dim)
    leaves = [x.clone().requires_grad_() for x in (o, q, state)]
    got = add_incoming(*leaves[:2], leaves[2], log_decay, k_dim ** -0.5, first)
    upstream = torch.randn_like(got)
    got.backward(upstream)
    expected_leaves = [x.clone().requires_grad_() for x in (o, q, state)]
    o_ref, q_ref, state_ref = expected_leaves
    decay = torch.exp(torch.arange(1, first + 1)[:, None] * log_decay)
    share = torch.einsum("bthk,bhkv->bthv", q_ref[:, :first] * decay[None, :, :, None], state_ref) * k_dim ** -0.5
    expected = torch.cat([o_ref[:, :first] + share, o_ref[:, first:]], 1)
    expected.backward(upstream)
    torch.testing.assert_close(got, expected)
    for leaf, reference in zip(leaves, expected_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, reference.grad)

    q16, o16, state = q.bfloat16().requires_grad_(), o.bfloat16().requires_grad_(), state.requires_grad_()
    copy = batch * first * heads * k_dim * 4  # the fp32 copy of the first tokens' q
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        peak, out = _allocation_peak(lambda: add_incoming(o16, q16, state, log_decay, k_dim ** -0.5, first))
    inputs = {x.untyped_storage().data_ptr() for x in (q16, o16, state)}
    kept_bytes = sum(t.numel() * t.element_size() for t in kept if t.untyped_storage().data_ptr() not in inputs)
    assert kept_bytes < copy / 8, (kept_bytes, copy)
    assert peak - out.numel() * out.element_size() < copy / 2, (peak, copy)


# ----------------------------------------------------------------------------------------------------------
# xPos
# ----------------------------------------------------------------------------------------------------------
def test_the_fold_moves_each_carried_state_into_the_next_pieces_frame(monkeypatch):
    """One process: a state carried through a continuing piece is decayed by γ^L and moved by its xPos factor."""
    states = torch.rand(4, 1, 2, 3, 3)
    monkeypatch.setattr("retnet.model.context_parallel._GatherStates.apply", lambda state, shard: states)
    log_decay = torch.log(torch.tensor([0.5, 0.9]))
    gamma = torch.exp(log_decay)[None, :, None, None]
    carry_shifts = torch.rand(4, 1, 3, 1)
    # piece 0 holds two sequences, piece 1 continues the second (single): states[0] passes through it
    shard = ContextShard(2, 4, (5, 5, 5, 5), (0, 3, 4, 2), (False, True, True, True))
    torch.testing.assert_close(incoming_state(states[2], log_decay, shard, carry_shifts),
                               states[0] * gamma ** 5 * carry_shifts[1] + states[1])
    shard = ContextShard(3, 4, (5, 5, 5, 5), (0, 3, 4, 2), (False, True, True, True))
    torch.testing.assert_close(incoming_state(states[3], log_decay, shard, carry_shifts),
                               (states[0] * gamma ** 5 * carry_shifts[1] + states[1]) * gamma ** 5 * carry_shifts[2]
                               + states[2])


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_one_xpos_piece_is_the_plain_forward(model_factory, packed):
    """Its own frames (from the piece's first position, several a piece unpacked) give the plain forward's."""
    model = model_factory(use_xpos=True, xpos_scale_base=2.0, chunk_size=8)
    input_ids = torch.randint(2, 101, (1 if packed else 2, 45), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, 7, 30, 45], dtype=torch.int32) if packed else None
    inputs, shard, targets = shard_sequences(input_ids, input_ids, 0, 1, cu_seqlens)
    split = model(**inputs, context_parallel=shard, num_items_in_batch=targets)
    plain = model(input_ids=input_ids, labels=input_ids, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(split.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.loss, plain.loss)


def test_a_packed_piece_past_one_frame_is_refused_by_name(model_factory):
    """A packed row runs each sequence in one frame (the kernels take no per-sequence frames): a piece holding more
    of one document than a frame covers (48 positions at xpos_scale_base 1) is refused, naming the way out."""
    model = model_factory(use_xpos=True, xpos_scale_base=1.0, chunk_size=8)
    input_ids = torch.randint(2, 101, (1, 120))
    inputs, shard, _ = shard_sequences(input_ids, None, 0, 2, torch.tensor([0, 100, 120], dtype=torch.int32))
    with pytest.raises(ValueError, match="more context-parallel ranks"):
        model(**inputs, context_parallel=shard)
