"""Fused Triton recurrent retention for decoding: a few tokens per sequence, many sequences per launch.

Same signature and layout as :func:`retnet.kernels.naive.recurrent_retention`::

    q, k: [B, T, H, K]    v: [B, T, H, V]    log_decay: [H] float32
    S_t = γ S_{t-1} + k_tᵀ v_t,     o_t = scale · q_t S_t,     states [B, H, K, V] float32

One program owns a [K, BV] slice of one sequence's state for one head (all of K, so the output needs no
cross-program reduction), keeps it in fp32 registers across the T tokens and writes it back once.
Grid: one axis of N·H·V-tiles programs, CUDA's x (up to 2^31 - 1 blocks; y and z stop at 65535, and a
decode step of 4096 sequences × 32 heads is 131072 (sequence, head) pairs). Varlen (``cu_seqlens``, B = 1)
batches sequences of different lengths in one launch.

Forward only: it is the inference path. Called with inputs that require grad (under grad mode) it
hands the call to the Triton chunkwise op, which computes the same function and has a backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from retnet.kernels import chunk as _chunk
from retnet.kernels import naive as _naive
from retnet.kernels.checks import shares_host_offsets
from retnet.kernels.chunk import _autotune, _pow2, check_retention_inputs

__all__ = ["recurrent_retention"]


class _InplaceStateGuard:
    """Autotuning hooks of the recurrent kernel. Tuning runs the kernel once per trial before the real
    launch; when the final state overwrites the initial one (``update_state_inplace``), each trial would
    advance the state again. The pre-hook snapshots such a state, the post-hook puts it back, so the
    real launch starts from the caller's state. Out-of-place launches cost nothing here."""

    def __init__(self):
        self.snapshot: torch.Tensor | None = None

    def save(self, kwargs, reset_only: bool = False) -> None:
        h0, ht = kwargs.get("h0"), kwargs.get("ht")
        if not reset_only and h0 is not None and ht is not None and h0.data_ptr() == ht.data_ptr():
            self.snapshot = ht.clone()

    def restore(self, kwargs, exception=None) -> None:
        if self.snapshot is not None:
            kwargs["ht"].copy_(self.snapshot)
            self.snapshot = None


_inplace_state_guard = _InplaceStateGuard()


@_autotune(
    ["H", "K", "V", "BK", "BV"], num_warps=[2, 4, 8], num_stages=[1], default=(4, 1),
    pre_hook=_inplace_state_guard.save, post_hook=_inplace_state_guard.restore,
)
@triton.jit(do_not_specialize=["T"])
def _recurrent_fwd_kernel(
    q, k, v, o, h0, ht, log_decay, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # (sequence · H + head) · V-tiles + V-tile, on x (CUDA's y stops at 65535). One axis rather than (N·H, V-tiles):
    # the same programs, and the 4-warp default keeps K = 256 within 128 registers on sm_90 (two axes spilled 8 bytes).
    NV: tl.constexpr = (V + BV - 1) // BV
    i_nh, i_v = tl.program_id(0) // NV, tl.program_id(0) % NV
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = tl.cast(i_n, tl.int64) * T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    # γ in fp32 (its rounding only matters beyond what an fp32 state can represent anyway).
    decay = tl.exp(tl.load(log_decay + i_h).to(tl.float32))

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    state_offsets = tl.cast(i_nh, tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_H0:
        b_h += tl.load(h0 + state_offsets, mask=m_h, other=0.0).to(tl.float32)
    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_o = o + (bos * H + i_h) * V + o_v
    for _ in range(T):
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_h = b_h * decay + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_o += H * V
    if STORE_HT:
        tl.store(ht + state_offsets, b_h, mask=m_h)


def recurrent_retention_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens,
                            update_state_inplace=False):
    """Launch on validated, contiguous inputs: ``(o in v's dtype, final state [N, H, K, V] fp32 or None)``.

    In place, each program reads its state slice into registers before writing it back, and no two
    programs share a slice, so the final state can overwrite the initial one."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    BK = _pow2(K)
    # Keep the [K, BV] fp32 state slice at <= 8K elements (32 KiB of registers per program).
    BV = min(_pow2(V), max(16, 8192 // BK))
    o = torch.empty_like(v)
    if update_state_inplace:
        ht = initial_state
    else:
        ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    with _chunk._device_guard(q):
        _recurrent_fwd_kernel[_chunk._checked_grid(N * H * triton.cdiv(V, BV))](
            q, k, v, o, initial_state, ht, log_decay, cu_seqlens, scale, T,
            H=H, K=K, V=V, BK=BK, BV=BV,
            USE_H0=initial_state is not None, STORE_HT=ht is not None, IS_VARLEN=cu_seqlens is not None,
        )
    if update_state_inplace:
        # The kernel wrote through a raw pointer, which autograd does not see: count the write as a torch in-place
        # op would (the reference's does), so a graph that saved this state (a prefill's, say) refuses to backward
        # through the overwritten values rather than use them silently.
        torch.autograd.graph.increment_version(ht)
    return o, ht


@shares_host_offsets
def recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    update_state_inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent retention in one fused Triton kernel (decoding). Forward only.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one dtype of float32, float16 or bfloat16, K and V at
            most 512 (the references' rules, :mod:`retnet.kernels.checks`).
            T is meant to be small (1 for plain decoding, a few for speculative decoding); the cost is
            sequential in T.
        log_decay: ``[H]`` float32, ln γ per head.
        scale: multiplies q·k: a float or a one-element tensor; defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` float32 (``[N, H, K, V]`` with ``cu_seqlens``) or None for zeros.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` integer offsets of N sequences packed into B = 1.
        update_state_inplace: write the final state over ``initial_state`` (fp32, contiguous, no grad) and
            return that tensor: a decode loop keeps one state buffer per layer (CUDA graphs need that).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [B or N, H, K, V] float32 or None)``.

    With grad mode on and an input that requires grad, the call is served by the Triton chunkwise op
    (:func:`retnet.kernels.chunk.chunk_retention`): same function, with a backward.
    """
    scale = check_retention_inputs(q, k, v, log_decay, initial_state, cu_seqlens, "recurrent_retention", scale)
    if update_state_inplace:  # (refuses inputs that require grad, so the chunk op below never takes it)
        _naive.check_inplace_state(q, k, v, initial_state, "recurrent_retention")
        output_final_state = True
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, initial_state)
    )
    if needs_grad:
        return _chunk.chunk_retention(
            q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    log_decay = log_decay.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()  # the same tensor when updated in place
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    args = (q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, update_state_inplace)
    if q.numel() == 0 or v.numel() == 0:  # nothing to launch
        return _naive.recurrent_retention(*args)
    return recurrent_retention_fwd(*args)
