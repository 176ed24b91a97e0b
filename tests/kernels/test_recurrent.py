"""The fused Triton recurrent (decoding) kernel against the fp32 reference.

Runs under Triton's CPU interpreter on machines without a GPU (see conftest.py), bf16 included.
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
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# (B, T, H, K, V)
CASES = [
    (3, 1, 2, 16, 16),  # plain decoding step, batched
    (2, 3, 2, 32, 48),  # a few tokens per sequence (speculative decoding), K != V
    (1, 1, 2, 256, 256),  # the largest head dims (several V tiles)
    (2, 2, 3, 40, 24),  # head dims that are not powers of two
]


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}-K{}-V{}".format(*c))
def test_matches_reference(kt, case, dtype, initial_state):
    B, T, H, K, V = case
    q, k, v, log_decay, h0 = kt.make_inputs(B, T, H, K, V, dtype, initial_state=initial_state, device=DEVICE)
    with torch.no_grad():
        o, ht = recurrent_retention(q, k, v, log_decay, None, h0, True)
        ref_o, ref_ht = naive.recurrent_retention(q.float(), k.float(), v.float(), log_decay, None, h0, True)
        o_only, none = recurrent_retention(q, k, v, log_decay, None, h0, False)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert ht.dtype == torch.float32 and ht.shape == (B, H, K, V)
    assert none is None
    kt.assert_close_scaled(o, ref_o, TOL[dtype], "o")
    kt.assert_close_scaled(ht, ref_ht, TOL[dtype], "final state")
    torch.testing.assert_close(o_only, o)


def test_decode_continues_a_chunked_prefill(kt):
    """Prefill 37 tokens with the chunk kernel, decode 3 more one at a time: equals one pass over 40."""
    q, k, v, log_decay, _ = kt.make_inputs(2, 40, 2, 32, 16, device=DEVICE)
    ref_o, ref_ht = naive.parallel_retention(q, k, v, log_decay, None, None, True)
    with torch.no_grad():
        o, state = chunk_retention(q[:, :37], k[:, :37], v[:, :37], log_decay, None, None, True, 16)
        outputs = [o]
        for t in range(37, 40):
            o, state = recurrent_retention(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], log_decay, None, state, True)
            outputs.append(o)
    kt.assert_close_scaled(torch.cat(outputs, dim=1), ref_o, TOL[torch.float32], "o")
    kt.assert_close_scaled(state, ref_ht, TOL[torch.float32], "state")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "varlen"])
@pytest.mark.parametrize("op", [recurrent_retention, naive.recurrent_retention], ids=["triton", "reference"])
def test_update_state_inplace(kt, op, packed):
    """The final state overwrites the initial one (the same tensor comes back), with the values and
    outputs of the out-of-place call, decoding several steps on one buffer; V spans two kernel tiles."""
    q, k, v, log_decay, h0 = kt.make_inputs(3, 3, 2, 64, 160, initial_state=True, device=DEVICE)
    cu_seqlens = None
    if packed:
        q, k, v = (x.reshape(1, 9, *x.shape[2:])[:, :6] for x in (q, k, v))
        cu_seqlens = torch.tensor([0, 1, 4, 6], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        expected_o, expected_state = naive.recurrent_retention(q, k, v, log_decay, None, h0, True, cu_seqlens)
        buffer = h0.clone()
        address = buffer.data_ptr()
        o, state = op(q, k, v, log_decay, None, buffer, False, cu_seqlens, update_state_inplace=True)
    assert state is buffer and buffer.data_ptr() == address
    kt.assert_close_scaled(o, expected_o, TOL[torch.float32], "o")
    kt.assert_close_scaled(buffer, expected_state, TOL[torch.float32], "state")
    # A decode loop on the one buffer: each step continues from the last.
    with torch.no_grad():
        op(q, k, v, log_decay, None, buffer, False, cu_seqlens, update_state_inplace=True)
        _, twice = naive.recurrent_retention(q, k, v, log_decay, None, expected_state, True, cu_seqlens)
    kt.assert_close_scaled(buffer, twice, TOL[torch.float32], "second step")


def test_autotuning_trials_leave_an_inplace_state_alone():
    """On a GPU the autotuner runs the kernel once per trial config before the real launch (the interpreter
    has one config and never tunes, so this protocol is replayed here with the kernel's own hooks): an
    in-place state must come out of tuning as it went in, or the real launch would advance it again."""
    from retnet.kernels.recurrent import _recurrent_fwd_kernel

    hooks = (_recurrent_fwd_kernel.pre_hook, _recurrent_fwd_kernel.post_hook)
    state = torch.randn(2, 3, 16, 16)
    original = state.clone()
    inplace = {"h0": state, "ht": state, "o": torch.zeros(1)}
    for _ in range(3):  # three trial configs: each pre-hook, launch (advances the state), post-hook
        hooks[0](inplace)
        state.mul_(0.5).add_(1.0)
        hooks[1](inplace, exception=None)
    hooks[0](inplace, reset_only=True)  # what the tuner calls once a config is chosen: no snapshot
    torch.testing.assert_close(state, original, rtol=0, atol=0)
    # Out of place, the hooks copy nothing and restore nothing: a fresh ht is the kernel's output.
    fresh = torch.zeros_like(state)
    out_of_place = {"h0": state, "ht": fresh}
    hooks[0](out_of_place)
    fresh.fill_(7.0)
    hooks[1](out_of_place, exception=None)
    assert bool((fresh == 7.0).all())


TUNED_INPLACE_DECODE = """
import torch
from retnet.kernels.recurrent import _recurrent_fwd_kernel, recurrent_retention
assert len(_recurrent_fwd_kernel.configs) > 1, "not tuning"
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(5, 1, 3, dim, generator=gen).cuda() for dim in (96, 96, 80))
log_decay = torch.tensor([-0.5, -0.05, -0.005], device="cuda")
state = torch.randn(5, 3, 96, 80, generator=gen).cuda()
initial = state.clone()
# In place first: this launch, the first at this shape, is the one that tunes.
o, same = recurrent_retention(q, k, v, log_decay, None, state, True, update_state_inplace=True)
expected_o, expected = recurrent_retention(q, k, v, log_decay, None, initial, True)
assert same is state
torch.testing.assert_close(state, expected, rtol=0, atol=0)
torch.testing.assert_close(o, expected_o, rtol=0, atol=0)
print("tuned", len(_recurrent_fwd_kernel.configs), "configs")
"""


@pytest.mark.skipif(not ON_GPU, reason="autotuning runs on a GPU only (the interpreter has one config)")
def test_real_autotuning_advances_an_inplace_state_once():
    """The same with Triton's real autotuner (the suite runs untuned, so in a process of its own): the first
    in-place launch at a new shape tunes over every config and must still advance the state exactly once."""
    import subprocess
    import sys

    env = dict(os.environ, RETNET_AUTOTUNE="1")
    done = subprocess.run([sys.executable, "-c", TUNED_INPLACE_DECODE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tuned 3 configs" in done.stdout


@pytest.mark.parametrize("op", [recurrent_retention, naive.recurrent_retention], ids=["triton", "reference"])
def test_update_state_inplace_refuses_what_it_cannot_do(kt, op):
    q, k, v, log_decay, h0 = kt.make_inputs(2, 1, 2, 16, 16, initial_state=True, device=DEVICE)
    with pytest.raises(ValueError, match="needs an initial_state"):
        op(q, k, v, log_decay, None, None, True, update_state_inplace=True)
    with pytest.raises(ValueError, match="contiguous float32"):
        op(q, k, v, log_decay, None, h0.double(), True, update_state_inplace=True)
    with pytest.raises(ValueError, match="contiguous float32"):
        op(q, k, v, log_decay, None, h0.transpose(2, 3), True, update_state_inplace=True)
    before = h0.clone()
    with pytest.raises(ValueError, match="require grad"):
        op(q.requires_grad_(), k, v, log_decay, None, h0, True, update_state_inplace=True)
    torch.testing.assert_close(h0, before, rtol=0, atol=0)  # nothing was written


@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no-h0"])
def test_varlen_batches_sequences_of_different_lengths(kt, initial_state):
    bounds = [0, 1, 3, 3, 7]  # 1, 2, 0 and 4 tokens
    cu_seqlens = torch.tensor(bounds, device=DEVICE)
    q, k, v, log_decay, h0 = kt.make_inputs(
        1, 7, 2, 16, 32, initial_state=initial_state, num_states=4, device=DEVICE
    )
    with torch.no_grad():
        o, ht = recurrent_retention(q, k, v, log_decay, None, h0, True, cu_seqlens)
        for i, (s, e) in enumerate(itertools.pairwise(bounds)):
            h0_i = None if h0 is None else h0[i : i + 1]
            ref_o, ref_ht = naive.recurrent_retention(q[:, s:e], k[:, s:e], v[:, s:e], log_decay, None, h0_i, True)
            if e > s:
                kt.assert_close_scaled(o[:, s:e], ref_o, TOL[torch.float32], f"o[{i}]")
            kt.assert_close_scaled(ht[i : i + 1], ref_ht, TOL[torch.float32], f"state[{i}]")


def test_inputs_requiring_grad_get_correct_gradients(kt):
    """The kernel is forward only; with grad-requiring inputs the op still differentiates correctly."""
    q, k, v, log_decay, h0 = kt.make_inputs(1, 3, 2, 16, 16, initial_state=True, device=DEVICE)
    got = kt.run_with_grads(recurrent_retention, q, k, v, log_decay, h0, True)
    ref = kt.run_with_grads(naive.recurrent_retention, q, k, v, log_decay, h0, True)
    kt.assert_close_scaled(got[0], ref[0], TOL[torch.float32], "o")
    kt.assert_close_scaled(got[1], ref[1], TOL[torch.float32], "state")
    for name in ref[2]:
        kt.assert_close_scaled(got[2][name], ref[2][name], TOL[torch.float32], f"d{name}")


def test_public_op_dispatches_to_triton(kt, kernels_env):
    q, k, v, log_decay, h0 = kt.make_inputs(2, 1, 2, 16, 16, initial_state=True, device=DEVICE)
    ref_o, ref_ht = naive.recurrent_retention(q, k, v, log_decay, None, h0, True)

    def refuse(*args, **kwargs):
        raise AssertionError("reference called on the Triton path")

    kernels_env.setattr(naive, "recurrent_retention", refuse)
    o, ht = kernels.recurrent_retention(q, k, v, log_decay, None, h0, True)
    kt.assert_close_scaled(o, ref_o, TOL[torch.float32], "o")
    kt.assert_close_scaled(ht, ref_ht, TOL[torch.float32], "state")


def test_noncontiguous_state(kt):
    q, k, v, log_decay, h0 = kt.make_inputs(2, 1, 2, 16, 16, initial_state=True, device=DEVICE)
    h0t = h0.transpose(-1, -2).contiguous().transpose(-1, -2)
    qt = q.transpose(0, 2).contiguous().transpose(0, 2)
    assert not h0t.is_contiguous() and not qt.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(
            recurrent_retention(qt, k, v, log_decay, None, h0t, True),
            recurrent_retention(q, k, v, log_decay, None, h0, True),
        )


@pytest.mark.parametrize(
    "q_shape, v_shape, h0_shape, dtype, match",
    [
        ((2, 1, 2), (2, 1, 2, 16), None, torch.float32, r"\[B, T, H, D\]"),
        ((2, 1, 2, 16), (2, 1, 3, 16), None, torch.float32, "v must be"),
        ((2, 1, 2, 16), (2, 1, 2, 16), (1, 2, 16, 16), torch.float32, r"initial_state must be .*\[2, 2, 16, 16\]"),
        ((2, 1, 2, 600), (2, 1, 2, 16), None, torch.float32, r"head dims .*K=600"),
        ((2, 1, 2, 16), (2, 1, 2, 16), None, torch.float64, "got torch.float64"),
    ],
    ids=["rank", "v-shape", "state-shape", "K>512", "float64"],
)
def test_guard_rails(q_shape, v_shape, h0_shape, dtype, match):
    q = torch.randn(q_shape, dtype=dtype)
    v = torch.randn(v_shape, dtype=dtype)
    h0 = None if h0_shape is None else torch.zeros(h0_shape)
    with pytest.raises(ValueError, match=match):
        recurrent_retention(q, q, v, torch.tensor([-0.1, -0.01]), None, h0, True)


def test_bf16_model_sized_heads(kt):
    q, k, v, log_decay, h0 = kt.make_inputs(8, 2, 4, 128, 128, torch.bfloat16, initial_state=True, device=DEVICE)
    with torch.no_grad():
        o, ht = recurrent_retention(q, k, v, log_decay, None, h0, True)
        ref_o, ref_ht = naive.recurrent_retention(q.float(), k.float(), v.float(), log_decay, None, h0, True)
    kt.assert_close_scaled(o, ref_o, TOL[torch.bfloat16], "o")
    kt.assert_close_scaled(ht, ref_ht, TOL[torch.bfloat16], "state")
