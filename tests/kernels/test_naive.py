"""The three fp32 reference forms (parallel, chunkwise, recurrent) compute one function."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from retnet.kernels import naive
from tests.launch import WITHOUT_RETNET_INIT

FORMS = {
    "parallel": naive.parallel_retention,
    "chunk16": lambda *a, **kw: naive.chunk_retention(*a, chunk_size=16, **kw),
    "chunk64": lambda *a, **kw: naive.chunk_retention(*a, chunk_size=64, **kw),
    "recurrent": naive.recurrent_retention,
}
TOL = 1e-5


def test_decay_schedule_is_exact_in_log_space(kt):
    # γ for the slowest heads rounds to 1.0 in fp32, ln γ must not.
    assert kt.SCHEDULE_32.dtype == torch.float32
    assert (kt.SCHEDULE_32 < 0).all()
    assert torch.exp(kt.SCHEDULE_32[-1]) == 1.0
    expected = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(32, dtype=torch.float64)))
    torch.testing.assert_close(kt.SCHEDULE_32.double(), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("initial_state", [False, True])
def test_forms_agree_forward(kt, T, initial_state):
    q, k, v, log_decay, h0 = kt.make_inputs(2, T, 32, 16, 8, initial_state=initial_state, seed=T)
    assert log_decay.shape == (32,)
    ref_o, ref_ht = naive.parallel_retention(q, k, v, log_decay, None, h0, True)
    for name, form in FORMS.items():
        o, ht = form(q, k, v, log_decay, None, h0, True)
        assert o.shape == (2, T, 32, 8) and ht.shape == (2, 32, 16, 8) and ht.dtype == torch.float32
        kt.assert_close_scaled(o, ref_o, TOL, f"{name} o")
        kt.assert_close_scaled(ht, ref_ht, TOL, f"{name} final state")
        o2, none = form(q, k, v, log_decay, None, h0, False)
        assert none is None
        torch.testing.assert_close(o2, o)


@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("initial_state", [False, True])
def test_forms_agree_gradients(kt, T, initial_state):
    q, k, v, log_decay, h0 = kt.make_inputs(1, T, 32, 16, 8, initial_state=initial_state, seed=T + 1)
    ref_o, ref_ht, ref_grads = kt.run_with_grads(naive.parallel_retention, q, k, v, log_decay, h0, True)
    for name, form in FORMS.items():
        o, ht, grads = kt.run_with_grads(form, q, k, v, log_decay, h0, True)
        kt.assert_close_scaled(o, ref_o, TOL, f"{name} o")
        kt.assert_close_scaled(ht, ref_ht, TOL, f"{name} final state")
        assert grads.keys() == ref_grads.keys()
        for g in grads:
            kt.assert_close_scaled(grads[g], ref_grads[g], TOL, f"{name} d{g}")


def test_strong_decay_and_scale(kt):
    """A fast-decaying head (γ^64 underflows) and an explicit scale: still one function."""
    q, k, v, _, h0 = kt.make_inputs(1, 70, 2, 8, 8, initial_state=True)
    log_decay = torch.tensor([-3.0, -1e-3])
    ref = naive.parallel_retention(q, k, v, log_decay, 0.3, h0, True)
    for name, form in FORMS.items():
        o, ht = form(q, k, v, log_decay, 0.3, h0, True)
        assert torch.isfinite(o).all() and torch.isfinite(ht).all()
        kt.assert_close_scaled(o, ref[0], TOL, f"{name} o")
        kt.assert_close_scaled(ht, ref[1], TOL, f"{name} final state")


def test_output_dtype_follows_v(kt):
    q, k, v, log_decay, _ = kt.make_inputs(1, 5, 2, 8, 8, dtype=torch.bfloat16)
    for form in FORMS.values():
        o, ht = form(q, k, v, log_decay, None, None, True)
        assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32


# Both include an empty sequence; the first is too ragged to pad (run one by one), the second is run as one
# right-padded batch.
VARLEN_BOUNDS = {"ragged": [0, 3, 40, 40, 57], "padded": [0, 20, 20, 33, 50]}


@pytest.mark.parametrize("bounds", VARLEN_BOUNDS.values(), ids=VARLEN_BOUNDS.keys())
@pytest.mark.parametrize("initial_state", [False, True])
def test_varlen_equals_each_sequence_alone(kt, initial_state, bounds):
    cu_seqlens = torch.tensor(bounds)
    q, k, v, log_decay, h0 = kt.make_inputs(1, bounds[-1], 4, 8, 16, initial_state=initial_state, num_states=4)
    for name, form in FORMS.items():
        o, ht = form(q, k, v, log_decay, None, h0, True, cu_seqlens=cu_seqlens)
        assert ht.shape == (4, 4, 8, 16)
        for i, (s, e) in enumerate(itertools.pairwise(bounds)):
            h0_i = None if h0 is None else h0[i : i + 1]
            o_i, ht_i = naive.parallel_retention(q[:, s:e], k[:, s:e], v[:, s:e], log_decay, None, h0_i, True)
            kt.assert_close_scaled(o[:, s:e], o_i, TOL, f"{name} o[{i}]")
            kt.assert_close_scaled(ht[i : i + 1], ht_i, TOL, f"{name} state[{i}]")


def test_varlen_gradients(kt):
    """Every form's varlen path (here the padded batch) against the parallel form run sequence by sequence."""
    cu_seqlens = torch.tensor([0, 20, 33])
    q, k, v, log_decay, h0 = kt.make_inputs(1, 33, 2, 8, 8, initial_state=True, num_states=2)
    one_by_one = functools.partial(naive._per_sequence, naive.parallel_retention)
    ref = kt.run_with_grads(one_by_one, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    for name, form in FORMS.items():
        o, ht, grads = kt.run_with_grads(form, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
        kt.assert_close_scaled(o, ref[0], TOL, f"{name} o")
        kt.assert_close_scaled(ht, ref[1], TOL, f"{name} final state")
        for g in grads:
            kt.assert_close_scaled(grads[g], ref[2][g], TOL, f"{name} d{g}")


@pytest.mark.parametrize(
    "shapes, match",
    [
        (dict(q=(2, 5, 3)), "must be \\[B, T, H, D\\]"),
        (dict(k=(2, 5, 3, 9)), "same shape"),
        (dict(v=(2, 6, 3, 4)), "v must be"),
        (dict(log_decay=(4,)), "log_decay must be"),
        (dict(h0=(2, 3, 8, 5)), "initial_state must be"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    dims = dict(q=(2, 5, 3, 8), k=(2, 5, 3, 8), v=(2, 5, 3, 4), log_decay=(3,), h0=(2, 3, 8, 4)) | shapes
    q, k, v, h0 = (torch.randn(dims[n]) for n in ("q", "k", "v", "h0"))
    log_decay = -torch.rand(dims["log_decay"])
    for form in FORMS.values():
        with pytest.raises(ValueError, match=match):
            form(q, k, v, log_decay, None, h0, True)


def test_bad_cu_seqlens_raise():
    q = torch.randn(2, 6, 1, 4)
    with pytest.raises(ValueError, match="B=1"):
        naive.chunk_retention(q, q, q, torch.tensor([-0.1]), cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="end at T"):
        naive.chunk_retention(q[:1], q[:1], q[:1], torch.tensor([-0.1]), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="chunk_size"):
        naive.chunk_retention(q, q, q, torch.tensor([-0.1]), chunk_size=0)


@pytest.mark.parametrize("bounds", [[0, 5, 5], [0, 0, 16, 49, 50], [0, 33]])
def test_chunkwise_varlen_pads_each_sequence_to_whole_chunks(kt, bounds):
    """The chunkwise form runs all packed sequences' chunks at once, each sequence padded in front: empty,
    partial-chunk and trailing empty sequences, outputs, states and gradients, against one by one."""
    cu_seqlens = torch.tensor(bounds)
    n = len(bounds) - 1
    q, k, v, log_decay, h0 = kt.make_inputs(1, bounds[-1], 3, 8, 4, initial_state=True, num_states=n, seed=n)
    one_by_one = functools.partial(naive._per_sequence, naive.parallel_retention)
    ref = kt.run_with_grads(one_by_one, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    o, ht, grads = kt.run_with_grads(FORMS["chunk16"], q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    kt.assert_close_scaled(o, ref[0], TOL, "o")
    kt.assert_close_scaled(ht, ref[1], TOL, "final state")
    for g in grads:
        kt.assert_close_scaled(grads[g], ref[2][g], TOL, f"d{g}")


@pytest.mark.parametrize(
    "batch, bounds",
    [(2, None), (0, None), (1, [0]), (1, [0, 0, 0])],
    ids=["T=0", "B=0", "no-sequences", "only-empty-sequences"],
)
def test_chunkwise_without_tokens(batch, bounds):
    """No tokens to chunk (T = 0, B = 0, cu_seqlens [0] or only empty sequences): empty outputs, and each
    sequence's state passes through as a new tensor, as the other forms do."""
    cu_seqlens = None if bounds is None else torch.tensor(bounds)
    n = batch if bounds is None else len(bounds) - 1
    q, v = torch.randn(batch, 0, 2, 8), torch.randn(batch, 0, 2, 4)
    log_decay, h0 = torch.tensor([-0.1, -0.01]), torch.randn(n, 2, 8, 4)
    for form in FORMS.values():
        o, ht = form(q, q, v, log_decay, None, h0, True, cu_seqlens=cu_seqlens)
        assert o.shape == (batch, 0, 2, 4) and ht.shape == (n, 2, 8, 4) and ht.dtype == torch.float32
        torch.testing.assert_close(ht, h0, rtol=0, atol=0)
        assert n == 0 or ht.data_ptr() != h0.data_ptr()
        o, ht = form(q, q, v, log_decay, None, None, True, cu_seqlens=cu_seqlens)
        assert o.shape == (batch, 0, 2, 4) and ht.shape == (n, 2, 8, 4) and not ht.any()


def test_chunkwise_batch_without_rows_but_tokens():
    q = torch.randn(0, 37, 2, 8)
    o, ht = naive.chunk_retention(q, q, q, torch.tensor([-0.1, -0.01]), None, None, True, chunk_size=16)
    assert o.shape == (0, 37, 2, 8) and ht.shape == (0, 2, 8, 8)


# retnet.kernels.naive without retnet/__init__.py (transformers' import is nothing the probe measures: the peak is
# read after a warm-up, as the growth of this process's own maximum).
MEMORY_PROBE = WITHOUT_RETNET_INIT + """
import resource
import torch
from retnet.kernels import naive
assert "transformers" not in sys.modules
torch.set_num_threads(1)
q = torch.randn(1, 8000, 1, 256) * 0.1
log_decay = torch.tensor([-0.01])
with torch.no_grad():
    naive.chunk_retention(q[:, :64], q[:, :64], q[:, :64], log_decay, chunk_size=4)  # warm up the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    o, ht = naive.chunk_retention(q, q, q, log_decay, None, None, True, chunk_size=4)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


def test_chunkwise_inference_memory_does_not_hold_every_chunk_state():
    """Without autograd the states of all chunks are not needed at once: 2 000 chunks of a 256×256 state
    (500 MiB stacked, and as much again for the chunks' kᵀv) must not be held together. The peak stays
    within a few blocks of states (plus the O(T) inputs and outputs)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True)
    grown_mib = int(result.stdout.split()[-1])
    assert grown_mib < 400, f"peak memory grew by {grown_mib} MiB"


@pytest.mark.parametrize("bounds", [None, [0, 5, 5, 40, 71, 100]])
def test_chunkwise_in_blocks_of_chunks_matches(kt, monkeypatch, bounds):
    """Formed 3 chunks at a time (sequences starting and ending inside and across blocks): outputs, states and
    gradients as the recurrent form."""
    cu_seqlens = None if bounds is None else torch.tensor(bounds)
    batch, n = (2, 2) if bounds is None else (1, len(bounds) - 1)
    q, k, v, log_decay, h0 = kt.make_inputs(batch, 100, 3, 8, 4, initial_state=True, num_states=n, seed=3)
    monkeypatch.setattr(naive, "STATE_BLOCK_BYTES", 3 * batch * 3 * 8 * 4 * 4)
    ref = kt.run_with_grads(naive.recurrent_retention, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    o, ht, grads = kt.run_with_grads(FORMS["chunk16"], q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    kt.assert_close_scaled(o, ref[0], TOL, "o")
    kt.assert_close_scaled(ht, ref[1], TOL, "final state")
    for g in grads:
        kt.assert_close_scaled(grads[g], ref[2][g], TOL, f"d{g}")


@pytest.mark.parametrize("T", [0, 1, 5])
@pytest.mark.parametrize("grad", [False, True])
def test_recurrent_leaves_the_callers_state_alone_and_matches_under_inference(kt, T, grad):
    # The decode path updates its own state in place (no kᵀv materialised): never the caller's tensor, and
    # with inputs that need gradients it stays out of place.
    q, k, v, log_decay, h0 = kt.make_inputs(3, max(T, 1), 4, 16, 8, initial_state=True, seed=T)
    q, k, v = q[:, :T], k[:, :T], v[:, :T]
    before = h0.clone()
    expected_o, expected_ht = naive.parallel_retention(q, k, v, log_decay, None, h0, True)
    inputs = [x.detach().requires_grad_(grad) for x in (q, k, v, h0)]
    o, ht = naive.recurrent_retention(*inputs[:3], log_decay, None, inputs[3], True)
    assert torch.equal(h0, before) and ht.data_ptr() != h0.data_ptr()
    kt.assert_close_scaled(o, expected_o, TOL, "o")
    kt.assert_close_scaled(ht, expected_ht, TOL, "ht")
    if grad and T:
        (o.sum() + ht.sum()).backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)
    with torch.inference_mode():
        o_inf, ht_inf = naive.recurrent_retention(q, k, v, log_decay, None, h0, True)
    assert torch.equal(o_inf, o.detach()) and torch.equal(ht_inf, ht.detach()) and torch.equal(h0, before)


@pytest.mark.parametrize("bounds", [None, [0, 20, 33], [0, 1, 2, 33]], ids=["batch", "padded-batch", "one-by-one"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_autocast_changes_nothing_and_the_state_stays_fp32(kt, dtype, bounds):
    """Under CPU autocast the references' matmuls ran in bf16: the parallel and recurrent forms (and the packed
    padded batch) returned a bf16 final state, where it is fp32 everywhere. They now turn autocast off: the same
    outputs and states, bit for bit, as without it."""
    cu_seqlens = None if bounds is None else torch.tensor(bounds)
    batch = 2 if bounds is None else 1
    states = batch if bounds is None else len(bounds) - 1
    q, k, v, log_decay, h0 = kt.make_inputs(batch, 33, 3, 8, 4, dtype=dtype, initial_state=True, num_states=states)
    for name, form in FORMS.items():
        want_o, want_ht = form(q, k, v, log_decay, None, h0, True, cu_seqlens=cu_seqlens)
        for initial in (h0, None):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                o, ht = form(q, k, v, log_decay, None, initial, True, cu_seqlens=cu_seqlens)
            assert ht.dtype == torch.float32 and o.dtype == dtype, name
            if initial is h0:
                assert torch.equal(o, want_o) and torch.equal(ht, want_ht), name


@pytest.mark.parametrize("bounds", [None, [0, 3, 3, 7]])
def test_chunk_size_beyond_the_sequences_costs_nothing(kt, bounds):
    """``chunk_size`` is a tiling choice (the Triton kernels tile with at most 64): the reference padded 7 tokens to
    a chunk of 2^20 and formed its C×C decay mask, ~4 TiB (a failed allocation; 26 s and 7.6 GiB at 2^14)."""
    cu_seqlens = None if bounds is None else torch.tensor(bounds)
    n = 2 if bounds is None else len(bounds) - 1
    q, k, v, log_decay, h0 = kt.make_inputs(2 if bounds is None else 1, 7, 2, 8, 4, initial_state=True,
                                            num_states=n)
    ref = kt.run_with_grads(naive.parallel_retention, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens)
    o, ht, grads = kt.run_with_grads(naive.chunk_retention, q, k, v, log_decay, h0, True, chunk_size=1 << 20,
                                     cu_seqlens=cu_seqlens)
    kt.assert_close_scaled(o, ref[0], TOL, "o")
    kt.assert_close_scaled(ht, ref[1], TOL, "final state")
    for g in grads:
        kt.assert_close_scaled(grads[g], ref[2][g], TOL, f"d{g}")
