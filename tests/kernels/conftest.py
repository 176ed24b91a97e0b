"""Kernel tests run the Triton kernels under Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before the kernels are *defined* (``@triton.jit`` reads it when the
module is imported), so it is set here, before any test module imports ``retnet.kernels.chunk``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The paper's decay schedule for 32 heads, γ_h = 1 - 2^(-5-h), as ln γ computed in float64.
SCHEDULE_32 = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(32, dtype=torch.float64))).float()


def log_decays(num_heads: int) -> torch.Tensor:
    """ln γ for ``num_heads`` heads spread over the 32-head schedule (always its fastest and slowest)."""
    if num_heads == 1:
        return SCHEDULE_32[:1].clone()
    picks = [round(i * 31 / (num_heads - 1)) for i in range(num_heads)]
    return SCHEDULE_32[picks].clone()


def make_inputs(B, T, H, K, V, dtype=torch.float32, initial_state=False, num_states=None, seed=0, device="cpu"):
    """q, k, v in ``dtype`` (unit scale), ln γ [H] and an optional fp32 initial state."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(device=device, dtype=dtype)
    h0 = None
    if initial_state:
        h0 = torch.randn(num_states or B, H, K, V, generator=gen).to(device)
    return q, k, v, log_decays(H).to(device), h0


def assert_close_scaled(actual, expected, tol, name=""):
    """|actual - expected| <= tol · (|expected| + max|expected|), elementwise (fp32 comparison)."""
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * max(scale, 1e-6), msg=lambda m: f"{name}: {m}"
    )


def run_with_grads(fn, q, k, v, log_decay, h0, output_final_state, seed=1, **kwargs):
    """Run ``fn`` in fp32-comparable form and return (o, ht, {name: grad}) for random upstream grads.

    Gradients are taken for q, k, v and h0 (when given) against Σ o·do + Σ ht·dht, both do and dht random.
    """
    gen = torch.Generator().manual_seed(seed)
    leaves = {"q": q, "k": k, "v": v}
    if h0 is not None:
        leaves["h0"] = h0
    leaves = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    o, ht = fn(leaves["q"], leaves["k"], leaves["v"], log_decay, None, leaves.get("h0"), output_final_state, **kwargs)
    do = torch.randn(o.shape, generator=gen).to(o)
    loss = (o.float() * do.float()).sum()
    if output_final_state:
        dht = torch.randn(ht.shape, generator=gen).to(ht)
        loss = loss + (ht * dht).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), None if ht is None else ht.detach(), dict(zip(leaves, grads))


@pytest.fixture
def kernels_env(monkeypatch):
    """Force the public ops onto the Triton path (interpreted on CPU)."""
    monkeypatch.setenv("RETNET_KERNELS", "triton")
    return monkeypatch


@pytest.fixture(scope="session")
def kt():
    """The helpers above, for the test modules (importing from a conftest is fragile)."""
    return SimpleNamespace(
        SCHEDULE_32=SCHEDULE_32,
        log_decays=log_decays,
        make_inputs=make_inputs,
        assert_close_scaled=assert_close_scaled,
        run_with_grads=run_with_grads,
    )
