"""Paths of the public retention ops where one path (the fp32 references or the Triton ops, interpreted on CPU)
failed where the other computed, or a call failed after an earlier one. What test_edges.py, test_recurrent.py and
test_kernels_hunt_paths.py cover is not repeated. Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

import retnet.kernels as kernels
from retnet.kernels import naive

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = 1e-5
OPS = [kernels.parallel_retention, kernels.chunk_retention, kernels.recurrent_retention]


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_an_initial_state_kept_heads_first(kt, monkeypatch, path, op, grad):
    """A state kept [H, B, K, V] (heads first) and passed transposed to [B, H, K, V]: the recurrent reference viewed
    it as [B·H, K, V] and raised torch's "view size is not compatible" where every other op computed."""
    monkeypatch.setenv("RETNET_KERNELS", path)
    q, k, v, log_decay, h0 = kt.make_inputs(2, 3, 3, 8, 16, initial_state=True, device=DEVICE)
    permuted = h0.transpose(0, 1).contiguous().transpose(0, 1)
    assert not permuted.is_contiguous()
    if grad:
        kt.compare(kt.run_with_grads(op, q, k, v, log_decay, permuted, True),
                   kt.run_with_grads(op, q, k, v, log_decay, h0, True), TOL)
    else:
        with torch.no_grad():
            kt.compare(op(q, k, v, log_decay, None, permuted, True), op(q, k, v, log_decay, None, h0, True), TOL)


@pytest.mark.parametrize("leaf", ["k", "h0"])
def test_a_step_with_grad_after_one_under_inference_mode(kt, leaf):
    """The recurrent reference keeps γ on the ln γ tensor for the next call (the model passes each call of a layer
    the same one). Made by a first call under ``torch.inference_mode()`` (a generate before a training step), it
    was an inference tensor: every later step whose state needs a gradient failed with "Inference tensors cannot
    be saved for backward"."""
    q, k, v, log_decay, h0 = kt.make_inputs(2, 3, 2, 8, 16, initial_state=True, device=DEVICE)
    with torch.inference_mode():
        naive.recurrent_retention(q[:, :1], k[:, :1], v[:, :1], log_decay, None, h0, True)
    fresh = log_decay.clone()  # (nothing kept on it: the values to expect)
    inputs = {"k": k, "h0": h0}
    got, want = [], []
    for decay, results in ((log_decay, got), (fresh, want)):
        leaves = {name: x.clone().requires_grad_(name == leaf) for name, x in inputs.items()}
        o, state = naive.recurrent_retention(q, leaves["k"], v, decay, None, leaves["h0"], True)
        (o.sum() + state.sum()).backward()
        results += [o.detach(), state.detach(), {leaf: leaves[leaf].grad}]
    kt.compare(got, want, 0)
