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


def _patch_the_interpreted_language_once_per_launch() -> None:
    """Let an interpreted launch patch ``triton.language`` once per module namespace, not at every call of a
    nested ``@triton.jit`` helper.

    The interpreter patches the language's builtins (``inspect.getmembers`` over ``tl``, ``tl.core``, ``tl.math``
    and the tensor class) at each launch and again at each helper call inside it: thousands of times per kernel
    launch, about a quarter of an interpreted test's time. Inside a launch a second patch of the same namespaces
    changes nothing (what is patched is not a builtin any more and is left alone; the rest is set to equivalent
    values), so it is skipped; a helper whose module sees another namespace (``tl.core`` in triton's own
    ``standard.py``) still patches that one, as before. What the kernels compute is unchanged.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "once_per_launch", False):
        return
    patched: list[set[int]] = []  # the namespaces patched in the launch running now (one entry while it runs)

    def patch_lang(fn):
        namespaces = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        if patched and namespaces <= patched[0]:
            return interpreter._LangPatchScope()  # nothing to undo: the launch's own patches stay until it ends
        scope = original(fn)
        if patched:
            patched[0] |= namespaces
            return scope
        patched.append(set(namespaces))
        restore = scope.restore

        def end_of_launch():
            patched.clear()
            restore()

        scope.restore = end_of_launch
        return scope

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _patch_the_interpreted_language_once_per_launch()

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



def compare(got, want, tol, label=""):
    """``got`` against ``want``, each (o, final state[, {name: grad}]) as an op or ``run_with_grads`` returns them:
    each close to within ``tol`` (``assert_close_scaled``), the state None in both or fp32 (every op's state is),
    the same gradients taken."""
    assert len(got) == len(want), f"{label}: {len(got)} results, want {len(want)}"
    assert_close_scaled(got[0], want[0], tol, f"{label} o")
    if want[1] is None:
        assert got[1] is None, f"{label}: final state should be None"
    else:
        assert got[1] is not None, f"{label}: no final state"
        assert got[1].dtype == torch.float32, f"{label}: final state is {got[1].dtype}"
        assert_close_scaled(got[1], want[1], tol, f"{label} final state")
    if len(want) > 2:
        assert got[2].keys() == want[2].keys(), label
        for name in want[2]:
            assert_close_scaled(got[2][name], want[2][name], tol, f"{label} d{name}")


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
        compare=compare,
    )
