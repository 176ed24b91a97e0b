"""Paths where property-based fuzzing of the retention ops (every form, both paths, random shapes, dtypes, decays,
packings and magnitudes) found an answer that differed from the fp32 references or from the other forms.

Each test pins one path, deterministically and with tiny shapes (the interpreter runs every program in Python).
What test_chunk.py, test_edges.py, test_kernel_user_paths.py and test_kernels_hunt_paths.py cover is not repeated.
"""

from __future__ import annotations

import os

import pytest
import torch

from retnet.kernels import chunk, naive, recurrent

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"

ALL_OPS = [naive.parallel_retention, naive.chunk_retention, naive.recurrent_retention,
           chunk.chunk_retention, recurrent.recurrent_retention]


def _name(op) -> str:
    return f"{op.__module__.rsplit('.', 1)[-1]}.{op.__name__}"


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


# (k size, v size, ln γ, keys only on each chunk's first token): keys that are fp16 subnormals, and normal keys that
# the decay to their chunk's end weighs into subnormals (γ^15 = 3e-7) with nothing later in the chunk.
FP16_WEIGHTED_KEY_CASES = {
    "subnormal-keys": (1e-6, 1e4, -0.1, False),
    "keys-decayed-into-subnormals": (1.0, 1.0, -1.0, True),
}


@pytest.mark.parametrize("case", list(FP16_WEIGHTED_KEY_CASES))
def test_fp16_keys_weighted_into_subnormals_keep_the_states_precision(case):
    """The state walk rounded each fp16 key, weighted by its decay to the chunk's end, to fp16 as it was: values under
    fp16's normal range (6.1e-5) kept a few bits or none, and the final state came back 3-7% off (keys of 1e-6), or
    without the early keys' part, where the reference, fp32 inside, kept fp16's precision. The weighted keys now enter
    their dot scaled by a power of two into fp16's normal range, as the scores do."""
    k_size, v_size, log_decay, first_token_only = FP16_WEIGHTED_KEY_CASES[case]
    gen = torch.Generator().manual_seed(0)
    shape = (1, 48, 1, 16)  # three 16-token chunks
    q = torch.randn(shape, generator=gen)
    k = k_size * torch.randn(shape, generator=gen)
    v = v_size * torch.randn(shape, generator=gen)
    if first_token_only:
        k[:, 1:16] = 0
        k[:, 17:32] = 0
        k[:, 33:] = 0
    q, k, v = (x.to(DEVICE).half() for x in (q, k, v))
    decay = torch.tensor([log_decay], device=DEVICE)
    got_o, got_state = chunk.chunk_retention(q, k, v, decay, None, None, True, 16)
    want_o, want_state = naive.chunk_retention(q, k, v, decay, None, None, True, 16)
    assert want_state.abs().max() > 0
    assert _relative_error(got_state, want_state) <= 2e-3, "final state"
    assert _relative_error(got_o, want_o) <= 2e-3, "o"


def test_fp16_subnormal_queries_keep_the_state_gradients_precision():
    """The state-gradient walk rounded each fp16 query, weighted by γ^i, to fp16 as it was: queries that are fp16
    subnormals (1e-6) with upstream gradients of 1e3 (products that fit fp16 well) lost bits, and dk, dv and the initial
    state's gradient came back 2-7% off the reference's. They now enter their dot scaled into fp16's normal range."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 48, 1, 16)
    q = 1e-6 * torch.randn(shape, generator=gen)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    upstream = 1e3 * torch.randn(shape, generator=gen)
    q, k, v, upstream = (x.to(DEVICE).half() for x in (q, k, v, upstream))
    h0 = torch.randn(1, 1, 16, 16, generator=gen).to(DEVICE)
    decay = torch.tensor([-0.1], device=DEVICE)
    grads = []
    for op in (chunk.chunk_retention, naive.chunk_retention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, h0)]
        o, _ = op(*leaves[:3], decay, None, leaves[3], False, 16)
        (o.float() * upstream.float()).sum().backward()
        grads.append([x.grad for x in leaves])
    for label, got, want in zip(("dq", "dk", "dv", "dh0"), *grads, strict=True):
        assert want.abs().max() > 0
        assert _relative_error(got, want) <= 2e-3, label


@pytest.mark.parametrize("cu_seqlens", [None, [0, 0], [0]], ids=["batch", "one-empty-sequence", "no-sequences"])
@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_a_call_without_tokens_stays_in_the_graph(op, cu_seqlens):
    """With T = 0 the chunkwise and recurrent forms (both paths; the Triton ops hand such a call to the references)
    built o and the final state from new zero tensors: ``o.sum().backward()`` raised "element 0 of tensors does not
    require grad", where the parallel form's empty products gave q, k, v their (empty) gradients. Every form now
    answers as the parallel one: o in the graph of q, k and v, the final state in that of the initial state."""
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEVICE)
    batch = 2 if cu_seqlens is None else 1
    states = batch if cu_seqlens is None else len(cu_seqlens) - 1
    q, k = (torch.randn(batch, 0, 2, 4, device=DEVICE, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, 0, 2, 3, device=DEVICE, requires_grad=True)
    h0 = torch.randn(states, 2, 4, 3, device=DEVICE, requires_grad=True)
    o, state = op(q, k, v, torch.tensor([-0.1, -0.5], device=DEVICE), None, h0, True, cu_seqlens=offsets)
    assert o.shape == (batch, 0, 2, 3) and state.shape == h0.shape
    upstream = torch.randn(state.shape, device=DEVICE)
    (o.sum() + (state * upstream).sum()).backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.grad is not None and x.grad.shape == x.shape, name
    torch.testing.assert_close(h0.grad, upstream)  # the state passes through unchanged


@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_a_sparse_input_is_refused_by_the_rule(op):
    """A sparse (or nested) q, k, v, log_decay, state or cu_seqlens failed inside each path with torch's own error,
    a different one per form ("expand is unsupported for Sparse tensors", "unsupported memory format option"): now
    the rules' ValueError naming the tensor and its layout, on every path."""
    q = torch.randn(1, 3, 2, 4, device=DEVICE)
    log_decay = torch.tensor([-0.1, -0.5], device=DEVICE)
    with pytest.raises(ValueError, match=rf"^{op.__name__}: k must be a dense \(torch.strided\) tensor; got a "
                                         r"torch.sparse_coo tensor"):
        op(q, q.to_sparse(), q, log_decay)
    with pytest.raises(ValueError, match=rf"^{op.__name__}: initial_state must be a dense"):
        op(q, q, q, log_decay, None, torch.zeros(1, 2, 4, 4, device=DEVICE).to_sparse())


@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_a_scale_on_meta_is_refused_by_the_rule(op):
    """A one-element scale tensor is read as a float: one on meta (no values) raised torch's "Tensor.item() cannot be
    called on meta tensors" from inside the check, not the rule (as a cu_seqlens on meta already is)."""
    q = torch.randn(1, 3, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match=rf"^{op.__name__}: scale must hold a value .* got a meta tensor"):
        op(q, q, q, torch.tensor([-0.1, -0.5], device=DEVICE), torch.tensor(0.5, device="meta"))


@pytest.mark.parametrize("op", [chunk.chunk_retention, recurrent.recurrent_retention], ids=_name)
def test_a_second_order_term_through_the_triton_backward_raises(op):
    """The Triton backward is not differentiable, and ``once_differentiable`` marked its gradients so only when the
    upstream gradients required grad: a gradient penalty (``do`` = ones from ``o.sum()``) got constant gradients, and
    ``(dq ** 2).sum() + other`` backpropagated without the penalty's term, silently. Differentiating them now raises
    (the gradients themselves are the same)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 20, 2, 8, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(1, 20, 2, 4, generator=gen).to(DEVICE).requires_grad_()
    log_decay = torch.tensor([-0.1, -0.5], device=DEVICE)
    o, _ = op(q, q, v, log_decay)
    dq, dv = torch.autograd.grad(o.sum(), [q, v], create_graph=True)
    want = torch.autograd.grad(naive.chunk_retention(q, q, v, log_decay)[0].sum(), [q, v])
    torch.testing.assert_close(dq, want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dv, want[1], rtol=1e-4, atol=1e-4)
    penalty = (dq**2).sum() + (v**2).sum()
    with pytest.raises(RuntimeError, match=r"backward is not differentiable.*RETNET_KERNELS=torch"):
        penalty.backward()
