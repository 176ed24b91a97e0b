"""Paths of the Triton retention kernels where they answered differently from the fp32 references.

Each test names the path: a call the reference (``naive.py``) computes, and the Triton op (interpreted on CPU)
got wrong. What test_chunk.py, test_edges.py and test_kernel_user_paths.py cover is not repeated. Shapes are
tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

from retnet.kernels import chunk, naive

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
# (strong decays: rows past a chunk's end form γ^-n = inf in a branch ``tl.where`` drops; see test_edges.py)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


def _fp16_grads(fn, q, k, v, h0, upstream, scale, chunk_size=16):
    """o and the gradients of q, k, v and h0 for ``Σ o · upstream``."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, h0)]
    log_decay = torch.tensor([-0.05], device=DEVICE)
    o, _ = fn(*leaves[:3], log_decay, scale, leaves[3], False, chunk_size)
    (o.float() * upstream.float()).sum().backward()
    return (o.detach(), *(x.grad for x in leaves))


def test_fp16_state_gradient_with_a_scale_above_one_stays_finite(kt):
    """A scale above 1 with large fp16 queries (scale · q past 65504) over several chunks: the state-gradient kernel
    folded the scale into q before rounding it to fp16 (inf), so dk, dv and the initial state's gradient came back
    NaN where the reference's fit fp16. The scale now multiplies the fp32 product."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 40, 1, 16)  # three 16-token chunks: the later chunks' queries reach the earlier states
    q = (300 * torch.randn(shape, generator=gen)).clamp(-1000, 1000)
    k, v, upstream = (size * torch.randn(shape, generator=gen) for size in (1e-3, 1e-2, 1e-3))
    q, k, v, upstream = (x.to(DEVICE).half() for x in (q, k, v, upstream))
    h0 = (1e-3 * torch.randn(1, 1, 16, 16, generator=gen)).to(DEVICE)
    scale = 300.0
    want = _fp16_grads(naive.chunk_retention, q, k, v, h0, upstream, scale)
    got = _fp16_grads(chunk.chunk_retention, q, k, v, h0, upstream, scale)
    for label, g, w in zip(("o", "dq", "dk", "dv", "dh0"), got, want, strict=True):
        assert w.isfinite().all(), f"reference {label} should fit fp16"
        assert g.isfinite().all(), f"{label} is not finite"
        kt.assert_close_scaled(g, w, 1e-2, label)


# (q, k, v, upstream gradient) sizes and a small scale: scores (scale · q·k) or score gradients (scale · do·v) under
# fp16's smallest normal (6.1e-5) while o and every gradient are normal fp16 numbers.
FP16_SMALL_CASES = {
    "scores": (1.0, 1.0, 1e4, 1e3, 1e-7),  # the forward's and dv's scores ~ 4e-7
    "score-gradients": (1e3, 1e3, 1.0, 1.0, 1e-7),  # dq's and dk's score gradients ~ 4e-7
}


@pytest.mark.parametrize("case", list(FP16_SMALL_CASES))
def test_fp16_scores_below_fp16s_normal_range_keep_their_precision(kt, case):
    """The fp16 dots took a chunk's scores (or score gradients) rounded to fp16 as they were: tiny ones (a small
    scale) became subnormals or 0, and o, dv, dq, dk lost up to all of their intra-chunk part (30% of o at a scale
    of 1e-8) where the reference, fp32 inside, kept fp16's precision. A tile now enters its dot scaled by a power of
    two into fp16's normal range, whichever side it is out of."""
    q_size, k_size, v_size, do_size, scale = FP16_SMALL_CASES[case]
    gen = torch.Generator().manual_seed(0)
    shape = (1, 40, 1, 16)
    q, k, v, upstream = (size * torch.randn(shape, generator=gen) for size in (q_size, k_size, v_size, do_size))
    q, k, v, upstream = (x.to(DEVICE).half() for x in (q, k, v, upstream))
    h0 = torch.zeros(1, 1, 16, 16, device=DEVICE)
    want = _fp16_grads(naive.chunk_retention, q, k, v, h0, upstream, scale)
    got = _fp16_grads(chunk.chunk_retention, q, k, v, h0, upstream, scale)
    for label, g, w in zip(("o", "dq", "dk", "dv"), got[:4], want[:4], strict=True):
        assert w.abs().max() > 1e-3, f"reference {label} should be a normal fp16 number"
        kt.assert_close_scaled(g, w, 1e-2, label)


@pytest.mark.parametrize("log_decay", [-16.0, -30.0], ids=["gamma-1e-7", "gamma-9e-14"])
def test_fp16_initial_state_gradient_of_a_fast_decaying_head(kt, log_decay):
    """The initial state reaches o_i only through scale · γ^(i+1) q_i; the state-gradient kernel weighted the fp16 q
    by that before rounding it to fp16, so for a γ under fp16's normal range every row became a subnormal or 0, and
    the (fp32) initial state's gradient, γ q_0ᵀ do_0 + ..., came back imprecise or all zeros. q is now weighted by
    γ^i (1 on a chunk's first row) and scale · γ multiplies the fp32 product."""
    q, k, v, _, h0 = kt.make_inputs(1, 20, 1, 16, 8, torch.float16, initial_state=True, device=DEVICE)
    decay = torch.tensor([log_decay], device=DEVICE)
    got = kt.run_with_grads(chunk.chunk_retention, q, k, v, decay, h0, False, chunk_size=16)[2]["h0"]
    want = kt.run_with_grads(naive.chunk_retention, q.float(), k.float(), v.float(), decay, h0, False)[2]["h0"]
    # (relative to the gradient's own size, ~γ: assert_close_scaled's absolute floor of 1e-8 would pass zeros)
    largest = want.abs().max()
    assert largest > 0
    assert (got - want).abs().max() <= 1e-2 * largest, f"dh0 off by {((got - want).abs().max() / largest).item():.2g}"


@pytest.mark.parametrize("log_decay", [-60.0, float("-inf")], ids=["gamma-9e-27", "gamma-0"])
def test_fp32_initial_state_gradient_where_the_unweighted_product_overflows(kt, log_decay):
    """The fp16 fix above must not move fp32 (or bf16, of fp32's range) onto the unweighted qᵀ do: with q and do
    near 1e20 that product overflows fp32, and scale · γ applied after it gave inf (or inf · 0 = NaN for γ = 0)
    where the reference's weighted product is finite. Only fp16 takes the weights after its dot."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 16, 1, 16)
    q, upstream = (1e20 * torch.randn(shape, generator=gen) for _ in range(2))
    k, v = 1e-30 * torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q, k, v, upstream = (x.to(DEVICE) for x in (q, k, v, upstream))
    h0 = torch.randn(1, 1, 16, 16, generator=gen).to(DEVICE)
    grads = []
    for fn in (chunk.chunk_retention, naive.chunk_retention):
        leaf = h0.clone().requires_grad_()
        o, _ = fn(q, k, v, torch.tensor([log_decay], device=DEVICE), 0.25, leaf, False, 16)
        (o * upstream).sum().backward()
        grads.append(leaf.grad)
    got, want = grads
    assert want.isfinite().all()
    assert got.isfinite().all(), "the initial state's gradient overflowed"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
