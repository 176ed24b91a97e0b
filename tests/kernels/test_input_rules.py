"""The references and the Triton ops accept and refuse the same inputs (``retnet/kernels/checks.py``).

Every bad input below goes through a reference op and the Triton op of the same name (interpreted on CPU)
and must raise the same ``ValueError`` on each; inputs that one path used to refuse and the other to
accept are now accepted (head dims up to 512, one-element ``scale`` tensors) or refused on both.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import retnet.kernels as kernels
from retnet.kernels import checks, chunk, naive, recurrent

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
H = 2


def _call(**overrides):
    x = dict(
        q=torch.randn(1, 5, H, 16), k=torch.randn(1, 5, H, 16), v=torch.randn(1, 5, H, 16),
        log_decay=torch.tensor([-0.1, -0.01]), scale=None, initial_state=None, cu_seqlens=None,
    )
    x.update(overrides)
    return {
        name: value.to(DEVICE) if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value
        for name, value in x.items()
    }


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (overrides, what the message must say)
BAD = {
    # One path accepted these, the other refused them.
    "mixed-qk-dtype": (dict(k=_f(1, 5, H, 16, dtype=torch.bfloat16)), "q, k, v must share one dtype"),
    "mixed-v-dtype": (dict(v=_f(1, 5, H, 16, dtype=torch.float16)), "q, k, v must share one dtype"),
    "float64": (
        dict(q=_f(1, 5, H, 16).double(), k=_f(1, 5, H, 16).double(), v=_f(1, 5, H, 16).double()),
        "dtype must be one of float32, float16, bfloat16; got torch.float64",
    ),
    "int-inputs": (
        dict(q=torch.ones(1, 5, H, 16, dtype=torch.int32), k=torch.ones(1, 5, H, 16, dtype=torch.int32),
             v=torch.ones(1, 5, H, 16, dtype=torch.int32)),
        "dtype must be one of float32, float16, bfloat16; got torch.int32",
    ),
    "K>512": (dict(q=_f(1, 5, H, 600), k=_f(1, 5, H, 600)), r"head dims must be in \[1, 512\]; got K=600, V=16"),
    "V>512": (dict(v=_f(1, 5, H, 1024)), r"head dims must be in \[1, 512\]; got K=16, V=1024"),
    "K=0": (dict(q=_f(1, 5, H, 0), k=_f(1, 5, H, 0)), r"head dims must be in \[1, 512\]; got K=0, V=16"),
    "V=0": (dict(v=_f(1, 5, H, 0)), r"head dims must be in \[1, 512\]; got K=16, V=0"),
    "scale-2-elements": (
        dict(scale=torch.tensor([0.5, 0.25])),
        r"scale must be a float or a one-element real tensor; got a torch.float32 tensor of shape \(2,\)",
    ),
    "scale-broadcastable": (dict(scale=torch.ones(5, 1, 1)), r"scale .* of shape \(5, 1, 1\)"),
    "scale-string": (dict(scale="0.5"), "scale must be a float or a one-element real tensor; got str"),
    "scale-bool": (dict(scale=True), "scale must be a float or a one-element real tensor; got bool"),
    "scale-requires-grad": (dict(scale=torch.tensor(0.5, requires_grad=True)), "scale gets no gradient"),
    "log-decay-requires-grad": (
        dict(log_decay=torch.tensor([-0.1, -0.01], requires_grad=True)), "log_decay gets no gradient",
    ),
    "log-decay-int": (dict(log_decay=torch.tensor([-1, -2])), "log_decay must be floating point"),
    "log-decay-list": (dict(log_decay=[-0.1, -0.01]), "log_decay must be a torch.Tensor; got list"),
    "q-list": (dict(q=[[1.0]]), "q must be a torch.Tensor; got list"),
    "state-int": (
        dict(initial_state=torch.zeros(1, H, 16, 16, dtype=torch.int32)), "initial_state must be floating point",
    ),
    "state-list": (dict(initial_state=[[0.0]]), "initial_state must be a torch.Tensor or None; got list"),
    "state-meta": (dict(initial_state=torch.zeros(1, H, 16, 16, device="meta")), "all tensors must be on one device"),
    "log-decay-meta": (dict(log_decay=torch.zeros(H, device="meta")), "all tensors must be on one device"),
    "cu-seqlens-meta": (
        dict(cu_seqlens=torch.tensor([0, 2, 5], device="meta")), "all tensors must be on one device",
    ),
    "cu-seqlens-float": (dict(cu_seqlens=torch.tensor([0.0, 2.0, 5.0])), "cu_seqlens must be a 1-D integer tensor"),
    "cu-seqlens-bool": (dict(cu_seqlens=torch.tensor([False, True])), "cu_seqlens must be a 1-D integer tensor"),
    "cu-seqlens-list": (dict(cu_seqlens=[0, 2, 5]), "cu_seqlens must be a torch.Tensor or None; got list"),
    # Refused the same way before; kept here so the two paths stay together.
    "rank": (dict(q=_f(5, H, 16)), r"q, k, v must be \[B, T, H, D\]"),
    "qk-shape": (dict(k=_f(1, 5, H, 32)), "q and k must have the same shape"),
    "v-shape": (dict(v=_f(1, 6, H, 16)), r"v must be \[B, T, H, V\]"),
    "log-decay-shape": (dict(log_decay=torch.tensor([[-0.1, -0.01]])), r"log_decay must be \[H\] = \[2\]"),
    "state-shape": (dict(initial_state=torch.zeros(1, H, 16, 8)), r"initial_state must be .*\[1, 2, 16, 16\]"),
    "cu-seqlens-2d": (dict(cu_seqlens=torch.tensor([[0, 2, 5]])), "cu_seqlens must be a 1-D integer tensor"),
    "cu-seqlens-empty": (dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), "cu_seqlens must be a 1-D integer"),
    "cu-seqlens-end": (dict(cu_seqlens=torch.tensor([0, 2, 4])), "end at T=5"),
    "cu-seqlens-batch": (
        dict(q=_f(2, 5, H, 16), k=_f(2, 5, H, 16), v=_f(2, 5, H, 16), cu_seqlens=torch.tensor([0, 5])), "B=1",
    ),
    "cu-seqlens-state-count": (
        dict(cu_seqlens=torch.tensor([0, 2, 5]), initial_state=torch.zeros(1, H, 16, 16)),
        r"initial_state must be \[B or N, H, K, V\] = \[2, 2, 16, 16\]",
    ),
}

PAIRS = {  # reference, Triton op, the name both report
    "chunk": (naive.chunk_retention, chunk.chunk_retention, "chunk_retention"),
    "recurrent": (naive.recurrent_retention, recurrent.recurrent_retention, "recurrent_retention"),
}


def _refusal(op, x, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        op(x["q"], x["k"], x["v"], x["log_decay"], x["scale"], x["initial_state"], True, cu_seqlens=x["cu_seqlens"],
           **kwargs)
    return str(caught.value)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("case", list(BAD))
def test_both_paths_refuse_the_same_inputs_the_same_way(case, pair):
    overrides, match = BAD[case]
    reference, triton_op, name = PAIRS[pair]
    torch.manual_seed(0)
    on_reference = _refusal(reference, _call(**overrides))
    on_triton = _refusal(triton_op, _call(**overrides))
    assert on_reference == on_triton
    assert on_reference.startswith(f"{name}: ")
    assert re.search(match, on_reference), on_reference


@pytest.mark.parametrize("case", ["mixed-qk-dtype", "V>512", "scale-2-elements", "cu-seqlens-float", "K=0"])
def test_public_parallel_op_refuses_the_same_on_both_paths(case, monkeypatch):
    """The public parallel op is served by the chunk op on the Triton path: the same rule, its own name."""
    overrides, match = BAD[case]
    monkeypatch.setenv("RETNET_KERNELS", "torch")
    on_reference = _refusal(kernels.parallel_retention, _call(**overrides))
    monkeypatch.setenv("RETNET_KERNELS", "triton")
    on_triton = _refusal(kernels.parallel_retention, _call(**overrides))
    assert on_reference == on_triton and on_reference.startswith("parallel_retention: ")
    assert re.search(match, on_reference), on_reference


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, 16.0, True, "64", None], ids=repr)
def test_chunk_size_must_be_a_positive_int_on_both_paths(chunk_size):
    """The reference took 16.0 for a TypeError from range() and the Triton op ran 2.5 as 16; True was 1."""
    x = _call()
    on_reference = _refusal(naive.chunk_retention, x, chunk_size=chunk_size)
    assert on_reference == _refusal(chunk.chunk_retention, x, chunk_size=chunk_size)
    assert on_reference.startswith("chunk_retention: chunk_size must be an int >= 1; got ")


@pytest.mark.parametrize("op", ["reference", "triton"])
def test_update_state_inplace_checks_the_inputs_first(op):
    """With update_state_inplace the reference checked the state before the shapes, the Triton op after:
    a bad q with no state got two different errors."""
    fn = naive.recurrent_retention if op == "reference" else recurrent.recurrent_retention
    x = _call(q=_f(5, H, 16).to(DEVICE))
    message = _refusal(fn, x, update_state_inplace=True)
    assert message.startswith(r"recurrent_retention: q, k, v must be [B, T, H, D]")


@pytest.mark.parametrize(
    "scale", [torch.tensor(0.3), torch.tensor([0.3]), torch.tensor([[0.3]], dtype=torch.float64), np.float32(0.3)],
    ids=["0-d", "[1]", "[1,1]-f64", "numpy"],
)
def test_one_element_scale_is_a_float_on_both_paths(kt, scale):
    q, k, v, log_decay, h0 = kt.make_inputs(1, 7, 2, 16, 16, initial_state=True, device=DEVICE)
    scale = scale.to(DEVICE) if isinstance(scale, torch.Tensor) else scale
    with torch.no_grad():
        want_o, want_h = naive.chunk_retention(q, k, v, log_decay, float(scale), h0, True)
        for op in (naive.parallel_retention, naive.chunk_retention, naive.recurrent_retention,
                   chunk.chunk_retention, recurrent.recurrent_retention):
            o, ht = op(q, k, v, log_decay, scale, h0, True)
            assert o.shape == want_o.shape
            kt.assert_close_scaled(o, want_o, 1e-4, f"{op.__module__} o")
            kt.assert_close_scaled(ht, want_h, 1e-4, f"{op.__module__} state")


@pytest.mark.parametrize("dims", [(16, 512), (320, 16)], ids=["V=512", "K=320"])
def test_head_dims_beyond_256_run_on_the_triton_path(kt, dims):
    """The paper's presets have V = 512 (K = 256): the references ran them and the Triton ops refused them
    (limit 256). The kernels tile K and V, so up to 512 they match the reference, gradients included."""
    K, V = dims
    q, k, v, log_decay, h0 = kt.make_inputs(1, 19, 1, K, V, initial_state=True, device=DEVICE)
    want = kt.run_with_grads(naive.chunk_retention, q, k, v, log_decay, h0, True, chunk_size=16)
    got = kt.run_with_grads(chunk.chunk_retention, q, k, v, log_decay, h0, True, chunk_size=16)
    kt.assert_close_scaled(got[0], want[0], 1e-4, "o")
    kt.assert_close_scaled(got[1], want[1], 1e-4, "state")
    for name in want[2]:
        kt.assert_close_scaled(got[2][name], want[2][name], 1e-4, f"d{name}")
    with torch.no_grad():
        o, ht = recurrent.recurrent_retention(q[:, :3], k[:, :3], v[:, :3], log_decay, None, h0, True)
        ref_o, ref_ht = naive.recurrent_retention(q[:, :3], k[:, :3], v[:, :3], log_decay, None, h0, True)
    kt.assert_close_scaled(o, ref_o, 1e-4, "recurrent o")
    kt.assert_close_scaled(ht, ref_ht, 1e-4, "recurrent state")


@pytest.mark.parametrize("mode", ["auto", "torch", "triton"])
@pytest.mark.parametrize("op", ["chunk_retention", "parallel_retention", "recurrent_retention"])
def test_public_ops_refuse_a_non_tensor_q_with_the_rule(op, mode, monkeypatch):
    """The dispatcher read ``q.is_cuda`` before the input rules ran: a list or NumPy q got an AttributeError
    under auto and triton, the rule's ValueError only under RETNET_KERNELS=torch."""
    monkeypatch.setenv("RETNET_KERNELS", mode)
    x = _call()
    for q in ([[0.0]], x["q"].numpy()):
        with pytest.raises(ValueError, match=r"q must be a torch\.Tensor; got (list|ndarray)"):
            getattr(kernels, op)(q, x["k"], x["v"], x["log_decay"])


# -- cu_seqlens is read to the host once per scope (checks.SharedHostOffsets) --------------------------------
OPS_WITH_CU_SEQLENS = {
    "naive-parallel": naive.parallel_retention,
    "naive-chunk": naive.chunk_retention,
    "naive-recurrent": naive.recurrent_retention,
    "triton-chunk": chunk.chunk_retention,
    "triton-recurrent": recurrent.recurrent_retention,
}


def _count_cu_seqlens_reads(monkeypatch, cu_seqlens) -> list[int]:
    """Count the host reads of ``cu_seqlens``' values: tolist, and item/int (``_local_scalar_dense``) of it or
    of anything computed from it (the old ``int(lengths.max())``, ``int(chunk_offsets[-1])``)."""
    reads = [0]
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counted_tolist(self):
        reads[0] += self is cu_seqlens
        return tolist(self)

    def counted_item(self):
        reads[0] += not self.is_floating_point()  # integer scalars here are lengths and offsets
        return item(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: int(counted_item(self)))
    return reads


def _packed_call(T=12, bounds=(0, 5, 12)):
    x = _call(q=_f(1, T, H, 16), k=_f(1, T, H, 16), v=_f(1, T, H, 16), initial_state=_f(len(bounds) - 1, H, 16, 16))
    x["cu_seqlens"] = torch.tensor(bounds, device=DEVICE)
    return x


@pytest.mark.parametrize("op", list(OPS_WITH_CU_SEQLENS))
def test_an_op_reads_cu_seqlens_once_a_call_and_once_a_scope(op, monkeypatch):
    """An op call read cu_seqlens to the host two or three times (its check, then the longest sequence, the
    chunk table or the bounds); L layers' calls in one forward 3L times. Now once per call, and once for all
    the calls made while a SharedHostOffsets is active (what RetNetModel.forward does), with the same results."""
    fn, x = OPS_WITH_CU_SEQLENS[op], _packed_call()
    args = (x["q"], x["k"], x["v"], x["log_decay"], None, x["initial_state"], True)
    want = fn(*args, cu_seqlens=x["cu_seqlens"])
    reads = _count_cu_seqlens_reads(monkeypatch, x["cu_seqlens"])
    fn(*args, cu_seqlens=x["cu_seqlens"])
    assert reads[0] == 1
    reads[0] = 0
    with checks.SharedHostOffsets().active():
        for _ in range(2):  # (two layers' calls: one read)
            o, ht = fn(*args, cu_seqlens=x["cu_seqlens"])
    assert reads[0] == 1
    torch.testing.assert_close(o, want[0], rtol=0, atol=0)
    torch.testing.assert_close(ht, want[1], rtol=0, atol=0)


@pytest.mark.parametrize("pair", list(PAIRS))
def test_cu_seqlens_written_in_place_is_checked_again(pair):
    """A shared read is used only while the tensor's version counter says it was not written since: a write in
    place (here inside one scope, as between two layers) is read and checked again, on both paths alike."""
    x = _packed_call()
    cu_seqlens = x["cu_seqlens"]
    for fn in PAIRS[pair][:2]:
        cu_seqlens.copy_(torch.tensor([0, 5, 12]))
        with checks.SharedHostOffsets().active():
            _, first = fn(x["q"], x["k"], x["v"], x["log_decay"], None, x["initial_state"], True, cu_seqlens=cu_seqlens)
            cu_seqlens[1] = 8  # still valid: other sequences, other states
            _, second = fn(x["q"], x["k"], x["v"], x["log_decay"], None, x["initial_state"], True,
                           cu_seqlens=cu_seqlens)
            assert not torch.allclose(first, second)
            cu_seqlens[1] = 13  # past the end: refused again
            message = _refusal(fn, x)
        assert message.endswith("cu_seqlens must start at 0, never decrease and end at T=12; got [0, 13, 12]")


def test_an_inference_tensor_is_read_once_a_scope(monkeypatch):
    """Under inference_mode (the server's), cu_seqlens has no version counter: one scope (one forward) trusts
    its read, and the next scope reads it again."""
    x = _packed_call()
    with torch.inference_mode():
        cu_seqlens = x["cu_seqlens"].clone()
        reads = _count_cu_seqlens_reads(monkeypatch, cu_seqlens)
        for _ in range(2):
            with checks.SharedHostOffsets().active():
                for fn in (naive.chunk_retention, chunk.chunk_retention, recurrent.recurrent_retention):
                    fn(x["q"], x["k"], x["v"], x["log_decay"], None, x["initial_state"], True, cu_seqlens=cu_seqlens)
        assert reads[0] == 2
        cu_seqlens[2] = 11
        with pytest.raises(ValueError, match="end at T=12"):
            naive.chunk_retention(x["q"], x["k"], x["v"], x["log_decay"], cu_seqlens=cu_seqlens)


def test_the_public_ops_keep_the_references_signatures():
    """The decorators that share the host read (and turn autocast off in the references) keep each op's
    signature: the Triton ops' and the dispatchers' are the references' (names, order, defaults)."""
    import inspect

    def parameters(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in ("parallel_retention", "chunk_retention", "recurrent_retention"):
        assert parameters(getattr(kernels, name)) == parameters(getattr(naive, name)), name
    assert parameters(chunk.chunk_retention) == parameters(naive.chunk_retention)
    assert parameters(recurrent.recurrent_retention) == parameters(naive.recurrent_retention)


@pytest.mark.parametrize("value", ["", " ", " Torch\n"])
def test_the_backend_switch_reads_empty_as_auto_and_ignores_case_and_spaces(value, monkeypatch):
    """A job script's ``RETNET_KERNELS=$CHOICE`` with CHOICE unset is the default, not a refusal."""
    monkeypatch.setenv("RETNET_KERNELS", value)
    # On CPU tensors both auto and torch choose the reference (no TRITON_INTERPRET needed to ask).
    assert kernels.use_triton(torch.zeros(1)) is False
    monkeypatch.setenv("RETNET_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RETNET_KERNELS must be auto, torch or triton; got 'cuda'"):
        kernels.use_triton(torch.zeros(1))
