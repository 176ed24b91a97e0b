"""Triton chunkwise retention (forward and backward) against the fp32 reference.

On a CPU machine these run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py). Its
bf16 ``tl.dot`` multiplies raw bits; tests/conftest.py widens bf16 dot operands to fp32 (exact), which is
what a tensor core computes for them, so bf16 runs here too (the first test checks that).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import retnet.kernels as kernels
from retnet.kernels import naive
from retnet.kernels.chunk import chunk_retention
from retnet.kernels.recurrent import recurrent_retention

# Real kernels on a GPU; the interpreter (conftest.py sets TRITON_INTERPRET=1 without one) on the CPU.
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
# Relative to the largest reference value. Measured: ~3e-7 (fp32), ~6e-4 (fp16).
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES, DTYPE_IDS = [torch.float32, torch.float16, torch.bfloat16], ["fp32", "fp16", "bf16"]

# (B, T, H, K, V, chunk_size), and the dtypes each runs in: all three where the case's path differs by dtype,
# only fp16 where the other two run the same path (same tile counts, chunk length and masks) in a cheaper case:
CASES = [
    ((1, 1, 2, 16, 16, 16), DTYPES),  # a single token
    ((2, 37, 2, 32, 16, 16), DTYPES),  # batch, a partial last chunk
    ((1, 100, 3, 16, 32, 64), DTYPES),  # partial chunk at the default size, K != V
    ((1, 37, 2, 40, 24, 16), DTYPES),  # head dims that are not powers of two (masked tiles)
    # The largest head dims: several K and V tiles in every kernel. fp32 (16 K tiles of 16 wide in dq/dk, 19 s
    # interpreted) has several K and V tiles in every kernel in the 64x200 case below (its V tiles masked) and
    # test_input_rules.py's K=320 / V=512 cases, masked K tiles in the K=40 case above; bf16 K=256 in
    # test_bf16_model_sized_heads, several bf16 V tiles in the 64x200 and 128x128 cases.
    ((1, 20, 1, 256, 256, 16), [torch.float16]),
    ((1, 33, 1, 64, 200, 32), DTYPES),  # K != V, V spans two output tiles (fp32: 2 K and 4-7 V tiles, V masked)
    ((1, 150, 1, 16, 16, 16), DTYPES),  # many chunks
    # Model-like tiles: 64-token chunks, full 64-wide K tile, V = 128 (batches: above). Those are fp16's and bf16's
    # tiles; bf16 runs them (three chunks too) in test_bf16_model_sized_heads' 128x128 case; fp32 tiles K = 64 as the
    # 64x200 case above does, and 64-token chunks in the 100-token case.
    ((1, 130, 2, 64, 128, 64), [torch.float16]),
]


def test_bf16_dots_are_exact_products_summed_in_fp32():
    """What the bf16 tests below rest on: on the interpreter (patched in tests/conftest.py) as on a GPU, a
    bf16 ``tl.dot`` equals the fp32 matmul of the same values (the products are exact in fp32)."""
    import triton
    import triton.language as tl

    @triton.jit
    def matmul(a, b, c, N: tl.constexpr):
        r = tl.arange(0, N)
        tile = r[:, None] * N + r[None, :]
        tl.store(c + tile, tl.dot(tl.load(a + tile), tl.load(b + tile)))

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16, device=DEVICE)
    matmul[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


def _case_id(case):
    return "B{}-T{}-H{}-K{}-V{}-C{}".format(*case)


def _reference(kt, q, k, v, log_decay, h0, output_final_state, **kwargs):
    """fp32 reference on fp32 copies of the (possibly low-precision) inputs."""
    return kt.run_with_grads(
        naive.chunk_retention, q.float(), k.float(), v.float(), log_decay, h0, output_final_state, **kwargs
    )


@pytest.mark.parametrize(
    "case, dtype",
    [pytest.param(case, dtype, id=f"{_case_id(case)}-{DTYPE_IDS[DTYPES.index(dtype)]}")
     for case, dtypes in CASES for dtype in dtypes],
)
def test_matches_reference(kt, case, dtype):
    B, T, H, K, V, chunk_size = case
    q, k, v, log_decay, h0 = kt.make_inputs(B, T, H, K, V, dtype, initial_state=True, seed=T, device=DEVICE)
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, True, chunk_size=chunk_size)
    assert got[0].dtype == dtype and got[0].shape == (B, T, H, V)
    assert got[2]["q"].dtype == dtype and got[2]["h0"].dtype == torch.float32
    kt.compare(got, _reference(kt, q, k, v, log_decay, h0, True), TOL[dtype])


@pytest.mark.parametrize(
    "initial_state, output_final_state", [(False, False), (False, True), (True, False)]
)
def test_state_options(kt, initial_state, output_final_state):
    # One sequence: test_matches_reference runs this shape as a batch of two with both states (the kernels index
    # h0 and ht by sequence the same whichever of them is present); each interpreted sequence costs ~1 s of CPU
    q, k, v, log_decay, h0 = kt.make_inputs(1, 37, 2, 32, 16, initial_state=initial_state, device=DEVICE)
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, output_final_state, chunk_size=16)
    ref = _reference(kt, q, k, v, log_decay, h0, output_final_state)
    kt.compare(got, ref, TOL[torch.float32])


def test_final_state_alone_carries_gradient(kt):
    """A loss on the final state alone (o unused, so no do) reaches k, v and the initial state."""
    q, k, v, log_decay, h0 = kt.make_inputs(1, 37, 2, 16, 16, initial_state=True, device=DEVICE)
    leaves = [x.clone().requires_grad_() for x in (k, v, h0)]
    ref_leaves = [x.clone().requires_grad_() for x in (k, v, h0)]
    dht = torch.randn(1, 2, 16, 16, device=DEVICE)
    _, ht = chunk_retention(q, leaves[0], leaves[1], log_decay, None, leaves[2], True, chunk_size=16)
    _, ref_ht = naive.chunk_retention(q, ref_leaves[0], ref_leaves[1], log_decay, None, ref_leaves[2], True)
    grads = torch.autograd.grad((ht * dht).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_ht * dht).sum(), ref_leaves)
    for name, g, r in zip(["k", "v", "h0"], grads, ref_grads):
        kt.assert_close_scaled(g, r, TOL[torch.float32], f"d{name}")


def test_strong_decay_and_explicit_scale(kt):
    """ln γ = -3 (γ^chunk underflows: exponents must be masked, not inf·0) next to the slowest head."""
    q, k, v, _, h0 = kt.make_inputs(1, 70, 2, 16, 16, initial_state=True, device=DEVICE)
    log_decay = torch.tensor([-3.0, kt.SCHEDULE_32[-1].item()], device=DEVICE)
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, True, chunk_size=32)
    for x in (got[0], got[1], *got[2].values()):
        assert torch.isfinite(x).all()
    ref = _reference(kt, q, k, v, log_decay, h0, True)
    kt.compare(got, ref, TOL[torch.float32])
    o, _ = chunk_retention(q, k, v, log_decay, scale=0.3, chunk_size=32)
    ref_o, _ = naive.chunk_retention(q, k, v, log_decay, scale=0.3)
    kt.assert_close_scaled(o, ref_o, TOL[torch.float32], "scale=0.3")


def test_chunk_size_is_only_a_tiling_choice(kt):
    q, k, v, log_decay, h0 = kt.make_inputs(1, 70, 2, 16, 16, initial_state=True, device=DEVICE)
    ref_o, ref_ht = naive.parallel_retention(q, k, v, log_decay, None, h0, True)
    for chunk_size in (1, 16, 32, 100):  # 1 -> 16 and 100 -> 64 (nearest supported tile)
        o, ht = chunk_retention(q, k, v, log_decay, None, h0, True, chunk_size=chunk_size)
        kt.assert_close_scaled(o, ref_o, TOL[torch.float32], f"chunk {chunk_size} o")
        kt.assert_close_scaled(ht, ref_ht, TOL[torch.float32], f"chunk {chunk_size} state")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_equals_each_sequence_alone(kt, dtype):
    bounds = [0, 5, 5, 41, 60]  # includes an empty sequence; lengths cross chunk edges differently
    cu_seqlens = torch.tensor(bounds, device=DEVICE, dtype=torch.int32)
    q, k, v, log_decay, h0 = kt.make_inputs(
        1, 60, 2, 24, 16, dtype, initial_state=True, num_states=4, device=DEVICE
    )
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, True, chunk_size=16, cu_seqlens=cu_seqlens)
    assert got[1].shape == (4, 2, 24, 16)
    kt.compare(got, _reference(kt, q, k, v, log_decay, h0, True, cu_seqlens=cu_seqlens), TOL[dtype], "varlen")
    # The same sequences one by one through the Triton op: no state leaks across documents.
    with torch.no_grad():
        o, ht = got[0], got[1]
        for i, (s, e) in enumerate(itertools.pairwise(bounds)):
            if s == e:
                torch.testing.assert_close(ht[i], h0[i])  # an empty document passes its state through
                continue
            o_i, ht_i = chunk_retention(q[:, s:e], k[:, s:e], v[:, s:e], log_decay, None, h0[i : i + 1], True, 16)
            kt.assert_close_scaled(o[:, s:e], o_i, TOL[dtype], f"o[{i}]")
            kt.assert_close_scaled(ht[i : i + 1], ht_i, TOL[dtype], f"state[{i}]")


def test_noncontiguous_inputs(kt):
    q, k, v, log_decay, h0 = kt.make_inputs(1, 37, 2, 16, 16, initial_state=True, device=DEVICE)
    # [B, H, T, D] storage viewed as [B, T, H, D]
    qt, kt_, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    h0t = h0.transpose(-1, -2).contiguous().transpose(-1, -2)
    o, ht = chunk_retention(qt, kt_, vt, log_decay, None, h0t, True, chunk_size=16)
    ref_o, ref_ht = chunk_retention(q, k, v, log_decay, None, h0, True, chunk_size=16)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(ht, ref_ht)


def test_public_ops_dispatch_to_triton(kt, kernels_env):
    """With RETNET_KERNELS=triton the public chunk and parallel ops never touch the references."""
    q, k, v, log_decay, h0 = kt.make_inputs(1, 20, 2, 16, 16, initial_state=True, device=DEVICE)
    ref_o, ref_ht = naive.parallel_retention(q, k, v, log_decay, None, h0, True)

    def refuse(*args, **kwargs):
        raise AssertionError("reference called on the Triton path")

    kernels_env.setattr(naive, "chunk_retention", refuse)
    kernels_env.setattr(naive, "parallel_retention", refuse)
    for op in (kernels.chunk_retention, kernels.parallel_retention):
        o, ht = op(q, k, v, log_decay, None, h0, True)
        kt.assert_close_scaled(o, ref_o, TOL[torch.float32], op.__name__)
        kt.assert_close_scaled(ht, ref_ht, TOL[torch.float32], op.__name__)
    kernels_env.setenv("RETNET_KERNELS", "torch")
    with pytest.raises(AssertionError, match="reference called"):
        kernels.chunk_retention(q, k, v, log_decay)


def _inputs(**overrides):
    x = dict(
        q=torch.randn(1, 8, 2, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16),
        log_decay=torch.tensor([-0.1, -0.01]), initial_state=None, cu_seqlens=None,
    )
    x.update(overrides)
    return x


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(q=torch.randn(8, 2, 16)), r"\[B, T, H, D\].*\(8, 2, 16\)"),
        (dict(k=torch.randn(1, 8, 2, 32)), r"same shape.*\(1, 8, 2, 16\) and \(1, 8, 2, 32\)"),
        (dict(v=torch.randn(1, 9, 2, 16)), r"v must be \[B, T, H, V\].*\(1, 9, 2, 16\)"),
        (dict(log_decay=torch.tensor([-0.1])), r"log_decay must be \[H\] = \[2\]; got \(1,\)"),
        (dict(initial_state=torch.zeros(1, 2, 16, 8)), r"initial_state must be .*\[1, 2, 16, 16\]"),
        (
            dict(q=torch.randn(1, 8, 2, 600), k=torch.randn(1, 8, 2, 600)),
            r"head dims must be in \[1, 512\]; got K=600, V=16",
        ),
        (
            dict(v=torch.randn(1, 8, 2, 1024)),
            r"head dims must be in \[1, 512\]; got K=16, V=1024",
        ),
        (
            dict(q=torch.ones(1, 8, 2, 16, dtype=torch.int32), k=torch.ones(1, 8, 2, 16, dtype=torch.int32)),
            "dtype must be one of float32, float16, bfloat16; got torch.int32",
        ),
        (dict(v=torch.randn(1, 8, 2, 16, dtype=torch.float16)), "share one dtype"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7])), "end at T=8"),
        (dict(cu_seqlens=torch.tensor([0, 6, 3, 8])), r"never decrease and end at T=8; got \[0, 6, 3, 8\]"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "integer"),
    ],
    ids=[
        "rank", "qk-shape", "v-shape", "log-decay", "state-shape", "K>512", "V>512", "int-dtype",
        "mixed-dtype", "cu-seqlens-end", "cu-seqlens-decreasing", "cu-seqlens-float",
    ],
)
def test_guard_rails(overrides, match):
    x = _inputs(**overrides)
    with pytest.raises(ValueError, match=match):
        chunk_retention(
            x["q"], x["k"], x["v"], x["log_decay"], initial_state=x["initial_state"], cu_seqlens=x["cu_seqlens"]
        )


def test_guard_rails_batch_with_cu_seqlens_and_chunk_size():
    q = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="B=1"):
        chunk_retention(q, q, q, torch.tensor([-0.1, -0.01]), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1; got 0"):
        chunk_retention(q, q, q, torch.tensor([-0.1, -0.01]), chunk_size=0)


# Two heads: the fastest and the slowest decay of the schedule (the heads between add time under the interpreter,
# not rounding: each head's sums are its own). 172 tokens: two whole 64-token chunks and a 44-token tail, a state
# carried across two chunk edges (an interpreted chunk costs ~0.7 s here: 300 tokens' five chunks added nothing)
@pytest.mark.parametrize("case", [(1, 172, 2, 128, 128, 64), (1, 100, 2, 256, 64, 64)], ids=_case_id)
def test_bf16_model_sized_heads(kt, case):
    B, T, H, K, V, chunk_size = case
    q, k, v, log_decay, h0 = kt.make_inputs(B, T, H, K, V, torch.bfloat16, initial_state=True, device=DEVICE)
    got = kt.run_with_grads(chunk_retention, q, k, v, log_decay, h0, True, chunk_size=chunk_size)
    kt.compare(got, _reference(kt, q, k, v, log_decay, h0, True), TOL[torch.bfloat16], "bf16")


@pytest.mark.parametrize(
    "dtype, stored", [(torch.bfloat16, "*bf16"), (torch.float16, "*fp32"), (torch.float32, "*fp32")],
    ids=["bf16", "fp16", "fp32"],
)
def test_chunk_states_are_stored_in_the_dtype_their_dots_use(dtype, stored):
    """The per-chunk states h and their gradients dh, the largest intermediates, are stored in bf16 for
    bf16 inputs (their dots round them to bf16 anyway) and fp32 otherwise; the final state and the initial
    state's gradient stay fp32 always. Read off the launches the forward and backward make."""
    from retnet.kernels.aot import record_launches

    launches = record_launches(dtype, 64, varlen=True)
    types = {}
    for launch in launches:
        for name, kind in launch.signature:
            if name in ("h", "dh", "ht", "dh0") and kind != "constexpr":
                types.setdefault((launch.kernel, name), set()).add(kind)
    per_chunk = {key: kinds for key, kinds in types.items() if key[1] in ("h", "dh")}
    assert len(per_chunk) == 6  # h: state fwd, output, dq/dk; dh: state bwd, dv, dq/dk
    assert all(kinds == {stored} for kinds in per_chunk.values()), per_chunk
    final = {key: kinds for key, kinds in types.items() if key[1] in ("ht", "dh0")}
    assert final and all(kinds == {"*fp32"} for kinds in final.values()), final


@pytest.mark.parametrize("chunk_size, tile", [(1, 16), (16, 16), (24, 32), (64, 64), (100, 64), (4096, 64)])
def test_chunk_size_maps_to_a_tile_every_gpu_can_hold(chunk_size, tile):
    """Tiles stop at 64: 128-token tiles spill on sm_80/sm_89 and overflow an sm_89's shared memory."""
    from retnet.kernels.chunk import _block_size

    assert _block_size(chunk_size) == tile


def test_autotune_switch(monkeypatch):
    from retnet.kernels.chunk import _autotune_enabled

    for value, enabled in [("1", True), ("on", True), ("0", False), ("OFF", False)]:
        monkeypatch.setenv("RETNET_AUTOTUNE", value)
        assert _autotune_enabled() is enabled
    monkeypatch.setenv("RETNET_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="RETNET_AUTOTUNE must be 1/on or 0/off; got 'sometimes'"):
        _autotune_enabled()


TRITON_OPS = [
    pytest.param(chunk_retention, id="triton-chunk"), pytest.param(recurrent_retention, id="triton-recurrent")
]
ALL_OPS = [
    pytest.param(naive.parallel_retention, id="reference-parallel"),
    pytest.param(naive.chunk_retention, id="reference-chunk"),
    pytest.param(naive.recurrent_retention, id="reference-recurrent"),
    *TRITON_OPS,
]


@pytest.mark.parametrize("op", ALL_OPS)
def test_packed_row_without_sequences(op):
    """cu_seqlens = [0]: N = 0 documents in an empty row (an empty batch of prompts), on every op and path."""
    q, v = torch.randn(1, 0, 2, 16, device=DEVICE), torch.randn(1, 0, 2, 24, device=DEVICE)
    log_decay = torch.tensor([-0.1, -0.01], device=DEVICE)
    cu_seqlens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    o, ht = op(q, q, v, log_decay, None, None, True, cu_seqlens=cu_seqlens)
    assert o.shape == (1, 0, 2, 24) and o.dtype == v.dtype
    assert ht.shape == (0, 2, 16, 24) and ht.dtype == torch.float32
    o, ht = op(q, q, v, log_decay, None, torch.zeros(0, 2, 16, 24, device=DEVICE), False, cu_seqlens=cu_seqlens)
    assert o.shape == (1, 0, 2, 24) and ht is None


@pytest.mark.parametrize("op", ALL_OPS)
def test_final_state_of_no_tokens_is_a_new_tensor(op):
    """With T = 0 the final state equals the initial one but is not that tensor: a caller that updates one
    (a decode buffer, ``update_state_inplace``) must not change the other."""
    q, v = torch.randn(2, 0, 2, 16, device=DEVICE), torch.randn(2, 0, 2, 16, device=DEVICE)
    h0 = torch.randn(2, 2, 16, 16, device=DEVICE)
    _, ht = op(q, q, v, torch.tensor([-0.1, -0.01], device=DEVICE), None, h0, True)
    torch.testing.assert_close(ht, h0, rtol=0, atol=0)
    assert ht.data_ptr() != h0.data_ptr()


@pytest.mark.parametrize("op", TRITON_OPS)
def test_log_decay_or_scale_requiring_grad_is_refused(kt, op):
    """The Triton ops give log_decay and scale no gradient: asked for one, they refuse, rather than leave
    .grad at None (the references refuse the same: tests/kernels/test_input_rules.py)."""
    q, k, v, log_decay, h0 = kt.make_inputs(1, 5, 2, 16, 16, initial_state=True, device=DEVICE)
    learnable = log_decay.clone().requires_grad_()
    with pytest.raises(ValueError, match="log_decay gets no gradient"):
        op(q, k, v, learnable, None, h0, True)
    with pytest.raises(ValueError, match="scale gets no gradient"):
        op(q, k, v, log_decay, torch.tensor(0.3, device=DEVICE, requires_grad=True), h0, True)
    with torch.no_grad():  # inference may hold a learnable decay
        o, _ = op(q, k, v, learnable, None, h0, True)
    ref_o, _ = naive.chunk_retention(q, k, v, log_decay, None, h0, True)
    kt.assert_close_scaled(o, ref_o, TOL[torch.float32], "o")


def test_forcing_triton_on_cpu_without_the_interpreter_says_so(monkeypatch):
    """RETNET_KERNELS=triton with CPU tensors and compiled (not interpreted) kernels: a ValueError naming the
    fix, not Triton's "0 active drivers" from deep in its launcher.

    ``@triton.jit`` compiles or interprets as ``TRITON_INTERPRET`` says when a kernel is defined, so this process
    (which interprets) defines the kernel module once more with the variable unset: the module a process without
    the interpreter imports, standing in for the interpreted one during the call (a process of its own spent ~6 s
    of CPU importing torch and the kernels for this one call)."""
    import importlib.util
    import sys

    from triton.runtime.jit import JITFunction

    import retnet.kernels.chunk as loaded

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location(loaded.__name__, loaded.__file__)
    compiled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled)
    assert isinstance(compiled._load_tile, JITFunction)  # (an interpreted kernel is an InterpretedFunction)
    monkeypatch.setitem(sys.modules, loaded.__name__, compiled)
    monkeypatch.setattr(kernels, "chunk", compiled)
    monkeypatch.setenv("RETNET_KERNELS", "triton")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"^RETNET_KERNELS=triton on cpu tensors needs Triton's interpreter"):
        kernels.chunk_retention(q, q, q, torch.tensor([-0.1, -0.01]))


@pytest.mark.parametrize("T", [0, 7])
def test_autocast_leaves_the_triton_ops_final_state_fp32(kt, T):
    """The model under autocast feeds the ops bf16 q, k, v; the state they return stays fp32 (the empty call
    goes through the reference, which turns autocast off)."""
    q, k, v, log_decay, h0 = kt.make_inputs(2, T, 2, 16, 16, dtype=torch.bfloat16, initial_state=True,
                                            device=DEVICE)
    for op in (chunk_retention, recurrent_retention):
        want = op(q, k, v, log_decay, None, h0, True)
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            o, ht = op(q, k, v, log_decay, None, h0, True)
        assert ht.dtype == torch.float32 and o.dtype == torch.bfloat16
        torch.testing.assert_close(ht, want[1], rtol=0, atol=0)
        torch.testing.assert_close(o, want[0], rtol=0, atol=0)
