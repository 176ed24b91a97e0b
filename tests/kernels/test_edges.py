"""Edge cases of the public retention ops against the fp32 references, the Triton side forced (interpreted on CPU).

What test_chunk.py / test_recurrent.py / test_input_rules.py cover is not repeated: here T at and around the chunk
length for each tile size, packed rows with empty and whole-row sequences, gradients asked of some inputs only,
γ = 0 (ln γ = -inf) and decays strong enough to underflow, the decode buffer as a slice of a per-layer cache, and
which tensor is on which device when they differ. Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

from retnet.kernels import naive
from retnet.kernels.chunk import chunk_retention
from retnet.kernels.recurrent import recurrent_retention

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = 1e-4  # fp32, relative to the largest reference value
# Under strong decay, rows past a chunk's end form γ^-n (inf) in a branch ``tl.where`` drops; the interpreter warns
# of that overflow as numpy does. (Clamping the exponent in the kernels would cost bf16 dq/dk and dv 24 and 8
# bytes of register spills on sm_80: test_aot_compile.py.)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


# one past, one short of and exactly a chunk (test_chunk.py runs longer, multi-chunk rows)
@pytest.mark.parametrize("T, chunk_size", [(17, 16), (31, 32), (64, 64)])
def test_lengths_at_the_chunk_edge(kt, T, chunk_size):
    """T = C - 1, C, C + 1 for each tile length, K != V (V spans part of a second 32-wide fp32 tile). One row of two
    heads: more rows and heads are more programs of the same kind (test_chunk.py runs them)."""
    q, k, v, log_decay, h0 = kt.make_inputs(1, T, 2, 32, 48, initial_state=True, seed=T, device=DEVICE)
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, True, chunk_size=chunk_size)
    ref = kt.run_with_grads(naive.chunk_retention, q, k, v, log_decay, h0, True)
    kt.compare(got, ref, TOL, f"T={T} C={chunk_size}")


@pytest.mark.parametrize(
    "bounds, dtype",
    [([0, 0, 7, 20], torch.int64), ([0, 20], torch.int32), ([0, 20, 20], torch.int64)],
    ids=["empty-first-int64", "whole-row-int32", "empty-last-int64"],
)
def test_packed_rows_with_empty_and_whole_row_sequences(kt, bounds, dtype):
    """One initial state per sequence; an empty sequence's state (and its gradient) passes straight through. One
    head (K spanning two tiles): test_chunk.py's varlen test runs packed rows of several heads."""
    cu_seqlens = torch.tensor(bounds, dtype=dtype, device=DEVICE)
    q, k, v, log_decay, h0 = kt.make_inputs(
        1, 20, 1, 40, 24, initial_state=True, num_states=len(bounds) - 1, device=DEVICE
    )
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, True, chunk_size=16, cu_seqlens=cu_seqlens)
    ref = kt.run_with_grads(naive.chunk_retention, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    kt.compare(got, ref, TOL, str(bounds))
    with torch.no_grad():
        o, ht = recurrent_retention(q, k, v, log_decay, None, h0, True, cu_seqlens)
    kt.assert_close_scaled(o, ref[0], TOL, "recurrent o")
    kt.assert_close_scaled(ht, ref[1], TOL, "recurrent final state")


@pytest.mark.parametrize("wanted", [("q",), ("h0",)], ids=["q-only", "state-only"])
@pytest.mark.parametrize("output_final_state", [True, False], ids=["final-state", "no-final-state"])
def test_gradients_of_some_inputs_only(kt, wanted, output_final_state):
    q, k, v, log_decay, h0 = kt.make_inputs(1, 20, 2, 16, 24, initial_state=True, device=DEVICE)
    results = []
    for op in (chunk_retention, naive.chunk_retention):
        leaves = {"q": q.clone(), "h0": h0.clone()}
        for name in wanted:
            leaves[name].requires_grad_()
        o, ht = op(leaves["q"], k, v, log_decay, None, leaves["h0"], output_final_state)
        assert (ht is None) is not output_final_state
        gen = torch.Generator().manual_seed(1)
        loss = (o * torch.randn(o.shape, generator=gen).to(o)).sum()
        if output_final_state:
            loss = loss + (ht * torch.randn(ht.shape, generator=gen).to(ht)).sum()
        results.append(torch.autograd.grad(loss, [leaves[name] for name in wanted]))
    for name, got, ref in zip(wanted, *results, strict=True):
        kt.assert_close_scaled(got, ref, TOL, f"d{name}")


RECURRENT_OPS = [naive.recurrent_retention, recurrent_retention]
NO_DECAY_OPS = [naive.parallel_retention, naive.chunk_retention, chunk_retention, *RECURRENT_OPS]


@pytest.mark.parametrize("bounds", [None, [0, 0, 3, 6]], ids=["batch", "packed"])
@pytest.mark.parametrize("op", NO_DECAY_OPS, ids=lambda op: f"{op.__module__.rsplit('.', 1)[-1]}.{op.__name__}")
def test_zero_decay_is_memoryless_not_nan(op, bounds):
    """ln γ = -inf (γ = 0): each token sees only itself, o_t = scale (q_t·k_t) v_t, and the final state is the last
    token's kᵀv (an empty sequence keeps its initial state). The chunkwise and parallel forms formed 0 · -inf at
    distance 0 (NaN everywhere in that head, state included) where the recurrent forms gave this."""
    cu_seqlens = None if bounds is None else torch.tensor(bounds, device=DEVICE)
    batch, length = (2, 6) if bounds is None else (1, 6)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, 2, 16, generator=gen).to(DEVICE) for _ in range(3))
    num_states = batch if bounds is None else len(bounds) - 1
    h0 = torch.randn(num_states, 2, 16, 16, generator=gen).to(DEVICE)
    log_decay = torch.tensor([float("-inf"), -0.1], device=DEVICE)
    with torch.no_grad():
        o, ht = op(q, k, v, log_decay, None, h0, True, cu_seqlens=cu_seqlens)
        ref_o, ref_ht = naive.recurrent_retention(q, k, v, log_decay, None, h0, True, cu_seqlens)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    memoryless = 16**-0.5 * (q[:, :, 0] * k[:, :, 0]).sum(-1, keepdim=True) * v[:, :, 0]
    torch.testing.assert_close(o[:, :, 0], memoryless, rtol=1e-5, atol=1e-5)
    ends = [length] * batch if bounds is None else bounds[1:]
    for n, end in enumerate(ends):
        row, start = (n, 0) if bounds is None else (0, bounds[n])
        last = torch.outer(k[row, end - 1, 0], v[row, end - 1, 0]) if end > start else h0[n, 0]
        torch.testing.assert_close(ht[n, 0], last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ht, ref_ht, rtol=1e-4, atol=1e-4)


def test_zero_decay_gradients(kt):
    """The Triton backward with a γ = 0 head beside a slow one: finite, and the reference's gradients."""
    q, k, v, _, h0 = kt.make_inputs(1, 20, 2, 16, 16, initial_state=True, device=DEVICE)
    log_decay = torch.tensor([float("-inf"), kt.SCHEDULE_32[-1].item()], device=DEVICE)
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, True, chunk_size=16)
    ref = kt.run_with_grads(naive.recurrent_retention, q, k, v, log_decay, h0, True)
    assert all(torch.isfinite(g).all() for g in got[2].values())
    kt.compare(got, ref, TOL, "γ=0")


@pytest.mark.parametrize("log_decay", [-20.0, -1e-9], ids=["decay-0", "decay-1"])
def test_extreme_decays(kt, log_decay):
    """ln γ = -20 (γ^n underflows from n = 5) and -1e-9 (γ rounds to 1), with a partial last chunk: finite, and the
    reference's results."""
    q, k, v, _, h0 = kt.make_inputs(1, 40, 1, 16, 16, initial_state=True, device=DEVICE)
    decay = torch.tensor([log_decay], device=DEVICE)
    got = kt.run_with_grads(chunk_retention, q, k, v, decay, h0, True, chunk_size=16)
    assert all(torch.isfinite(x).all() for x in (got[0], got[1], *got[2].values()))
    kt.compare(got, kt.run_with_grads(naive.chunk_retention, q, k, v, decay, h0, True), TOL, f"ln γ={log_decay}")


@pytest.mark.parametrize("op", RECURRENT_OPS, ids=["reference", "triton"])
def test_decode_buffer_may_be_a_slice_of_a_layer_cache(kt, op):
    """Several tokens per sequence written in place into cache[1] of a [layers, B, H, K, V] buffer: the layer's
    slice advances as the out-of-place call's state, its neighbours keep every bit."""
    q, k, v, log_decay, h0 = kt.make_inputs(2, 3, 2, 16, 24, initial_state=True, device=DEVICE)
    cache = torch.randn(3, *h0.shape, device=DEVICE)
    cache[1] = h0
    neighbours = cache[[0, 2]].clone()
    with torch.no_grad():
        want_o, want_state = naive.recurrent_retention(q, k, v, log_decay, None, h0, True)
        o, state = op(q, k, v, log_decay, None, cache[1], False, update_state_inplace=True)
    assert state.data_ptr() == cache[1].data_ptr()
    kt.assert_close_scaled(o, want_o, TOL, "o")
    kt.assert_close_scaled(cache[1], want_state, TOL, "state")
    torch.testing.assert_close(cache[[0, 2]], neighbours, rtol=0, atol=0)


@pytest.mark.parametrize("op", [naive.chunk_retention, chunk_retention, *RECURRENT_OPS],
                         ids=["reference-chunk", "triton-chunk", "reference-recurrent", "triton-recurrent"])
def test_device_mismatch_names_each_tensors_device(op):
    q = torch.randn(1, 5, 2, 16, device=DEVICE)
    log_decay = torch.tensor([-0.1, -0.01], device=DEVICE)
    cu_seqlens = torch.tensor([0, 2, 5], device="meta")
    with pytest.raises(ValueError) as caught:
        op(q, q, q, log_decay, None, None, True, cu_seqlens=cu_seqlens)
    assert str(caught.value) == (
        f"{op.__name__}: all tensors must be on one device; got q, k, v, log_decay on {q.device}; cu_seqlens on meta"
    )


@pytest.mark.parametrize("op", RECURRENT_OPS, ids=["reference", "triton"])
def test_an_inplace_decode_step_is_an_inplace_write_to_autograd(kt, op):
    """A prefill with grad saves its initial state for the backward; a decode step then overwrites that buffer in
    place. The backward must refuse (autograd's version check), as after any torch in-place op: the Triton kernel
    writes through a raw pointer, and without counting the write the backward ran on the new values silently."""
    q, k, v, log_decay, h0 = kt.make_inputs(2, 5, 2, 16, 16, initial_state=True, device=DEVICE)
    prefill_q = q.clone().requires_grad_()
    o, _ = chunk_retention(prefill_q, k, v, log_decay, None, h0, True)
    before = h0._version
    with torch.no_grad():
        op(q[:, :1], k[:, :1], v[:, :1], log_decay, None, h0, False, update_state_inplace=True)
    assert h0._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()
