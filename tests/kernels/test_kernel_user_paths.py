"""Retention-op calls as users make them, where a path used to answer wrongly or differently from the others.

Each test names the path it guards: a reference op (``naive.py``) and the Triton op of the same name
(interpreted on CPU) must return the same dtypes and refuse the same inputs with the same ``ValueError``.
Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from retnet.kernels import chunk, naive, recurrent

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"

ALL_OPS = [naive.parallel_retention, naive.chunk_retention, naive.recurrent_retention,
           chunk.chunk_retention, recurrent.recurrent_retention]
RECURRENT_OPS = [naive.recurrent_retention, recurrent.recurrent_retention]


def _name(op) -> str:
    return f"{op.__module__.rsplit('.', 1)[-1]}.{op.__name__}"


# (the references run [0, 2, 5] as one padded batch, [0, 1, 2, 7] sequence by sequence)
@pytest.mark.parametrize("cu_seqlens", [None, [0, 2, 5], [0, 1, 2, 7]], ids=["batch", "packed", "packed-apart"])
@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_final_state_is_fp32_whatever_the_initial_states_dtype(kt, op, cu_seqlens):
    """The final state is fp32 on every path, as documented: the parallel reference once returned float64 for a
    float64 initial state (its final state added the state as given), where every other form returned fp32."""
    num_states = None if cu_seqlens is None else len(cu_seqlens) - 1
    length = 5 if cu_seqlens is None else cu_seqlens[-1]
    q, k, v, log_decay, h0 = kt.make_inputs(1 if cu_seqlens else 2, length, 2, 4, 3, initial_state=True,
                                            num_states=num_states, device=DEVICE)
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEVICE)
    want = naive.recurrent_retention(q, k, v, log_decay, None, h0, True, cu_seqlens=offsets)[1]
    _, state = op(q, k, v, log_decay, None, h0.double(), True, cu_seqlens=offsets)
    assert state.dtype == torch.float32, f"{_name(op)}: final state {state.dtype}"
    kt.assert_close_scaled(state, want, 1e-5, _name(op))


@pytest.mark.parametrize(
    "scale, received",
    [(torch.tensor(True), "a float or a one-element real tensor; got a torch.bool tensor"),
     (float("nan"), "finite; got nan"), (float("inf"), "finite; got inf"),
     (torch.tensor(-math.inf), "finite; got -inf"), (10**400, "finite; got an int too large for a float")],
    ids=["bool-tensor", "nan", "inf", "minus-inf-tensor", "huge-int"],
)
@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_scale_must_be_a_finite_number(op, scale, received):
    """A bool tensor was read as 1.0 (a Python bool is refused), a non-finite scale turned every output into
    NaN or inf without a word, and an int too large for a float raised OverflowError instead of the rule."""
    q = torch.randn(1, 3, 2, 4, device=DEVICE)
    log_decay = torch.tensor([-0.1, -0.5], device=DEVICE)
    with pytest.raises(ValueError, match=rf"^{op.__name__}: scale must be {received}"):
        op(q, q, q, log_decay, scale)


def _inference_state(shape):
    with torch.inference_mode():
        return torch.randn(shape, device=DEVICE)


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad"])
@pytest.mark.parametrize("op", RECURRENT_OPS, ids=_name)
def test_inplace_step_refuses_an_inference_state_outside_inference_mode(op, grad_mode):
    """torch refuses in-place writes to an inference tensor outside inference_mode (it keeps no version counter,
    so a graph that saved it could not notice). The reference hit that as a RuntimeError from deep inside; the
    Triton kernel wrote through its raw pointer anyway. Both now refuse with the rule, the state untouched."""
    q = torch.randn(2, 1, 2, 4, device=DEVICE)
    log_decay = torch.tensor([-0.1, -0.5], device=DEVICE)
    state = _inference_state((2, 2, 4, 4))
    before = state.clone()
    refusal = (r"^recurrent_retention: update_state_inplace=True can't write an inference tensor outside "
               r"torch.inference_mode\(\)")
    with torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad(), pytest.raises(ValueError, match=refusal):
        op(q, q, q, log_decay, None, state, True, None, True)
    assert torch.equal(state, before)


@pytest.mark.parametrize("op", RECURRENT_OPS, ids=_name)
def test_inplace_step_on_an_inference_state_inside_inference_mode(kt, op):
    """The server's case, which must keep working: state and step both under inference_mode, the state advanced
    in place exactly as the functional step computes it."""
    q, k, v, log_decay, h0 = kt.make_inputs(2, 3, 2, 4, 5, initial_state=True, device=DEVICE)
    want_o, want_state = naive.recurrent_retention(q, k, v, log_decay, None, h0, True)
    with torch.inference_mode():
        state = h0.clone()
        o, returned = op(q, k, v, log_decay, None, state, True, None, True)
    assert returned is state
    kt.assert_close_scaled(o, want_o, 1e-5, "o")
    kt.assert_close_scaled(state, want_state, 1e-5, "state")


@pytest.mark.parametrize("op", [naive.parallel_retention, chunk.chunk_retention], ids=_name)
def test_cu_seqlens_on_meta_is_refused_by_the_rule(op):
    """Offsets without values (a meta tensor, as shape-only tracing makes) can't be checked or used: the rule's
    ValueError rather than NotImplementedError("Cannot copy out of meta tensor") from the host read."""
    q = torch.empty(1, 4, 2, 8, device="meta")
    log_decay = torch.full((2,), -0.1, device="meta")
    cu_seqlens = torch.tensor([0, 4], device="meta")
    with pytest.raises(ValueError, match=rf"^{op.__name__}: cu_seqlens must hold values .*got a meta tensor"):
        op(q, q, q, log_decay, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_cu_seqlens_in_an_unsigned_type_torch_cannot_subtract_is_refused(op, dtype):
    """uint16/32/64 passed the integer rule, then failed deep inside with NotImplementedError ("add_stub" not
    implemented) on some paths and ran on others, depending on the offsets."""
    q = torch.randn(1, 7, 2, 4, device=DEVICE)
    log_decay = torch.tensor([-0.1, -0.5], device=DEVICE)
    cu_seqlens = torch.tensor([0, 3, 3, 7], device=DEVICE).to(dtype)
    with pytest.raises(ValueError, match=(
            rf"^{op.__name__}: cu_seqlens must be a 1-D integer tensor \[N \+ 1\] of int8, uint8, int16, int32 or "
            rf"int64; got {dtype} \(4,\)")):
        op(q, q, q, log_decay, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_cu_seqlens_in_every_accepted_integer_type_gives_the_same_result(kt, op, dtype):
    """The integer types the rule keeps run on every path, padded-batch and one-by-one references alike."""
    q, k, v, log_decay, h0 = kt.make_inputs(1, 7, 2, 4, 3, initial_state=True, num_states=3, device=DEVICE)
    for bounds in ([0, 3, 3, 7], [0, 1, 2, 7]):
        want = naive.recurrent_retention(q, k, v, log_decay, None, h0, True,
                                         cu_seqlens=torch.tensor(bounds, device=DEVICE))
        got = op(q, k, v, log_decay, None, h0, True, cu_seqlens=torch.tensor(bounds, dtype=dtype, device=DEVICE))
        kt.assert_close_scaled(got[0], want[0], 1e-5, f"{bounds} o")
        kt.assert_close_scaled(got[1], want[1], 1e-5, f"{bounds} state")


# (q, k, v, upstream gradient) magnitudes; T = 20, K = 32, V = 8, scale 1
FP16_RANGE_CASES = {
    "scores": (50.0, 50.0, 1e-3, 1e-3),  # q·k = 80000: the forward's and dv's scores
    "score-gradients": (1e-3, 1e-3, 300.0, 300.0),  # do·v up to 720000: dq's and dk's score gradients
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("case", list(FP16_RANGE_CASES))
@pytest.mark.parametrize("op", [chunk.chunk_retention, recurrent.recurrent_retention], ids=_name)
def test_fp16_scores_beyond_fp16s_range_keep_a_finite_result(kt, op, case):
    """fp16 intra-chunk scores (scale · q·k, or do·v in the backward) past 65504 while o and the gradients fit
    fp16: the reference (fp32 inside) computed them, but the chunk kernels rounded the scores to fp16 for their
    dots and returned inf. A tile out of fp16's range now enters its dot divided by a power of two."""
    q_size, k_size, v_size, do_size = FP16_RANGE_CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.full((1, 20, 1, 32), size) for size in (q_size, k_size))
    v, upstream = (size * (0.5 + torch.rand(1, 20, 1, 8, generator=gen)) for size in (v_size, do_size))
    q, k, v, upstream = (x.to(DEVICE).half() for x in (q, k, v, upstream))
    log_decay = torch.tensor([-0.1], device=DEVICE)
    results = {}
    for name, fn in (("reference", naive.chunk_retention), ("op", op)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o, _ = fn(*leaves, log_decay, 1.0)
        (o.float() * upstream.float()).sum().backward()
        results[name] = (o.detach(), *(x.grad for x in leaves))
    for label, got, want in zip(("o", "dq", "dk", "dv"), results["op"], results["reference"], strict=True):
        assert want.isfinite().all(), f"reference {label} should fit fp16"
        assert got.isfinite().all(), f"{_name(op)} {label} is not finite"
        kt.assert_close_scaled(got, want, 1e-2, f"{_name(op)} {label}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_an_infinite_input_spoils_only_the_rows_that_see_it(dtype):
    """An inf in one query makes only that row's output non-finite, as in the reference: the fp16 score scaling
    must not take the inf's magnitude as the tile's (inf shift: every row of the chunk NaN)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 1, 8, generator=gen).to(DEVICE, dtype) for _ in range(3))
    q[0, 5, 0, 0] = float("inf")
    log_decay = torch.tensor([-0.1], device=DEVICE)
    for fn in (naive.chunk_retention, chunk.chunk_retention):
        o, _ = fn(q, k, v, log_decay, chunk_size=16)
        bad_rows = (~o.isfinite()).any(-1).any(-1)[0].nonzero().flatten().tolist()
        assert bad_rows == [5], (fn.__module__, bad_rows)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_a_non_finite_token_stays_in_its_own_packed_sequence(op, which):
    """A NaN query, key or value in one packed sequence leaves the others' outputs, final states and gradients as
    they are alone. The references ran [0, 2, 5] as a padded batch whose padding (the next sequence's tokens) was
    multiplied by 0, or kept: a NaN there made the first sequence's outputs, final state or gradients NaN (a prefill
    burst: one prompt spoiled the others)."""
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(1, 5, 1, 4, generator=gen).to(DEVICE) for name in "qkv"}
    inputs[which][0, 2, 0, 0] = math.nan  # the second sequence's first token
    h0 = torch.randn(2, 1, 4, 4, generator=gen).to(DEVICE)
    log_decay = torch.tensor([-0.1], device=DEVICE)
    results = {}
    for label, fn, tokens, state, cu_seqlens in (
        ("packed", op, slice(None), h0, torch.tensor([0, 2, 5], device=DEVICE)),
        ("alone", naive.recurrent_retention, slice(0, 2), h0[:1], None),
    ):
        leaves = [x[:, tokens].clone().requires_grad_() for x in inputs.values()] + [state.clone().requires_grad_()]
        o, ht = fn(*leaves[:3], log_decay, None, leaves[3], True, cu_seqlens=cu_seqlens)
        (o[:, :2].sum() + ht[0].sum()).backward()  # the first sequence's alone
        results[label] = [o[:, :2].detach(), ht[:1].detach()] + [x.grad[:, :2] for x in leaves[:3]] + [leaves[3].grad[:1]]
    for name, got, want in zip(("o", "final state", "dq", "dk", "dv", "dh0"), results["packed"], results["alone"],
                               strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bad", [0.25, math.nan], ids=["positive", "nan"])
@pytest.mark.parametrize("op", ALL_OPS, ids=_name)
def test_a_log_decay_above_zero_or_nan_is_refused_on_every_path(kt, op, bad):
    """ln γ > 0 made the state grow by γ^T (inf at the end of a long sequence) and a NaN spread, with nothing
    naming why: every path refuses both, naming the values; -inf (γ = 0) and 0 (γ = 1) stay accepted."""
    q, k, v, _, _ = kt.make_inputs(1, 5, 2, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"log_decay must be ln γ <= 0 .* got \[(0\.25|nan), "):
        op(q, k, v, torch.tensor([bad, -0.5], device=DEVICE))
    o, _ = op(q, k, v, torch.tensor([-math.inf, 0.0], device=DEVICE))
    assert torch.isfinite(o).all()


def test_log_decay_is_read_once_per_tensor_and_again_after_an_in_place_write(kt):
    q, k, v, log_decay, _ = kt.make_inputs(1, 5, 2, 4, 3, device=DEVICE)
    naive.chunk_retention(q, k, v, log_decay)
    reads = []
    original = torch.Tensor.all

    def counting(self, *args, **kwargs):
        reads.append(self.shape)
        return original(self, *args, **kwargs)

    torch.Tensor.all = counting
    try:
        naive.chunk_retention(q, k, v, log_decay)
        assert reads == []  # the model passes one [H] tensor to every layer's every call: one device sync
    finally:
        torch.Tensor.all = original
    log_decay.add_(1.0)  # now positive: read again
    with pytest.raises(ValueError, match="log_decay must be"):
        naive.chunk_retention(q, k, v, log_decay)


@pytest.mark.parametrize("first_call", ["eager", "compiled"])
def test_the_log_decay_check_leaves_a_compiled_model_one_graph(first_call):
    """The check's read-once mark reads the tensor's version counter, which dynamo cannot trace: taken while
    compiling, it broke the graph around every retention call (fullgraph=True failed): one layer has one."""
    from tests.model.conftest import make_model

    model = make_model(retention_mode="chunkwise", num_hidden_layers=1)
    ids = torch.randint(2, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if first_call == "eager":
            expected = model(ids).logits
        compiled = torch.compile(model.model, backend="eager", fullgraph=True)
        hidden = compiled(input_ids=ids, use_cache=False).last_hidden_state
        if first_call == "compiled":
            expected = model(ids).logits
    torch.testing.assert_close(model.lm_head(hidden), expected)
