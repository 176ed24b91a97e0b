"""Triton chunkwise retention: forward and backward, fixed per-head decay, optional varlen packing.

Layout and math follow :func:`retnet.kernels.naive.chunk_retention` (the fp32 reference)::

    q, k: [B, T, H, K]    v: [B, T, H, V]    log_decay: [H] float32 (ln γ_h < 0)
    states: [B, H, K, V] float32 ([N, H, K, V] with ``cu_seqlens``, B = 1)
    S_t = γ S_{t-1} + k_tᵀ v_t,     o_t = scale · q_t S_t

The sequence is cut into chunks of BT tokens. With i, j the positions inside a chunk, L its length and h
the state before it, every chunk computes

    o_i    = scale · ( Σ_{j≤i} γ^(i-j) (q_i·k_j) v_j  +  γ^(i+1) q_i h )
    h_next = γ^L h + Σ_j γ^(L-1-j) k_jᵀ v_j

Kernels (one program per tile, on a one-axis grid with the tiles fastest (``MAX_GRID``), masked pointer loads
everywhere, fp32 accumulators):

1. ``_chunk_state_fwd_kernel`` - grid N·H × V-tiles × K-tiles: walks the chunks of one sequence in order
   and writes the state before each chunk (and the fp32 final state).
2. ``_chunk_output_fwd_kernel`` - grid chunks·H × V-tiles: the outputs of one chunk, in parallel
   over chunks: intra-chunk (q kᵀ ⊙ decay) v plus the inter-chunk q h.
3. ``_chunk_state_bwd_kernel`` - grid N·H × V-tiles × K-tiles: walks the chunks backwards and writes the
   gradient of the state *after* each chunk; what is left at the start is the initial state's
   gradient. It starts from the final state's upstream gradient (dht) when there is one.
4. ``_chunk_dv_bwd_kernel`` - grid chunks·H × V-tiles and ``_chunk_dqk_bwd_kernel`` - grid
   chunks·H × K-tiles: dv, and dq/dk, of one chunk from q, k, v, do, the states and their gradients.

The states are recomputed in fp32 for the backward (kernel 1 again) rather than kept from the forward:
a [chunks, H, K, V] tensor per layer would dominate the activation memory. The walking kernels accumulate
in fp32 registers and store each chunk's state (and state gradient) in the dtype its consumers multiply
in: bf16 for bf16 inputs (the same rounding the dot applied before; half the traffic), else fp32.

Decay is only ever used as ``exp2(n · log2 γ)`` for a non-negative distance n inside a chunk, in fp32
(γ itself would round to 1.0 in bf16, and in fp32 for the slowest heads). For bf16 inputs the state
matmuls run in bf16 on the tensor cores (the stored state is rounded to bf16, the running one is not); for fp16
the state stays fp32 in those matmuls (tf32), because a long-context state can exceed fp16's range, and the
intra-chunk scores, and the decay-weighted keys and queries of the state walks, go into their fp16 dots scaled by a
power of two into fp16's normal range (``_fp16_range_shift``);
for fp32 inputs every matmul is 3xTF32: tensor cores, fp32 accuracy (plain tf32 would drop 13 mantissa
bits; "ieee" fp32 dots run on the FMA units and spill registers).

``python -m retnet.kernels.aot`` compiles every launch and autotune config for sm_80/sm_89/sm_90 through
Triton and ptxas on any machine and reports registers, spills, shared memory and the tensor-core path.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from retnet.kernels import naive
from retnet.kernels.checks import (
    check_chunk_size,
    check_inputs,
    host_offsets,
    shares_host_offsets,
    usable_log_decay,
)

__all__ = ["check_retention_inputs", "chunk_retention", "chunk_retention_bwd", "chunk_retention_fwd"]

LOG2E = 1.4426950408889634


def _on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _autotune_enabled() -> bool:
    choice = os.environ.get("RETNET_AUTOTUNE", "1").lower()
    if choice not in ("0", "1", "off", "on", "false", "true"):
        raise ValueError(f"RETNET_AUTOTUNE must be 1/on or 0/off; got {choice!r}")
    return choice in ("1", "on", "true")


def _interpreter_index_fix() -> None:
    """Under Triton's interpreter a runtime loop bound (``range(NT)``, NT from a scalar argument) goes
    through ``tensor.__index__``, which Triton 3.6 and earlier implement as ``int()`` of a one-element 1-D array:
    NumPy >= 2.4 refuses that (triton-lang/triton#9171, fixed upstream by squeezing first). Squeeze here
    too; a no-op for Triton versions that already do. Compiled kernels never take this path."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a Triton without the interpreter module
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        index = lambda self: int(self.handle.data.squeeze())
        scope = args[0] if args else kwargs.get("scope")
        if scope is None:  # older Triton patches the class without a scope to undo it
            tensor.__index__ = index
        else:
            scope.set_attr(tensor, "__index__", index)

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _interpreter_index_fix()


def _autotune(key: list[str], num_warps: list[int], num_stages: list[int], default: tuple[int, int],
              pre_hook=None, post_hook=None):
    """``@triton.autotune`` over num_warps × num_stages on a GPU. ``default`` (warps, stages), spill-free on
    sm_80/sm_89/sm_90 for every dtype and head dim (``retnet.kernels.aot``, checked in the tests), is the only
    config under the interpreter (which can't tune) and with ``RETNET_AUTOTUNE=0``: each new shape then
    compiles one variant instead of tuning the sweep (seconds per kernel), for short jobs and test suites.
    The sweep stays readable as ``kernel.gpu_configs`` and the default as ``kernel.default_config``
    (``retnet.kernels.aot`` compiles them for a CUDA target, GPU or not). The hooks run around every tuning
    trial. Tuning results are cached on disk (Triton's cache, keyed by GPU, Triton version, kernel source
    and shapes), so a restarted server or a resumed training run does not tune again."""
    sweep = [triton.Config({}, num_warps=w, num_stages=s) for w in num_warps for s in num_stages]
    fallback = triton.Config({}, num_warps=default[0], num_stages=default[1])
    if (default[0], default[1]) not in {(c.num_warps, c.num_stages) for c in sweep}:
        raise ValueError(f"default config {default} is not in the sweep {num_warps} × {num_stages}")

    def decorate(kernel):
        configs = sweep if _on_gpu() and _autotune_enabled() else [fallback]
        tuner = triton.autotune(
            configs=configs, key=key, pre_hook=pre_hook, post_hook=post_hook, cache_results=True
        )(kernel)
        tuner.gpu_configs, tuner.default_config = sweep, fallback
        return tuner

    return decorate


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(base, n_rows, col0, n_cols, ROW_STRIDE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """[BR, BC] tile of a row-major matrix at ``base``: rows 0..BR (< n_rows), columns col0.. (< n_cols)."""
    rows = tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(base + rows[:, None] * ROW_STRIDE + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, n_rows, col0, n_cols, ROW_STRIDE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.arange(0, BR)
    cols = col0 + tl.arange(0, BC)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tl.store(base + rows[:, None] * ROW_STRIDE + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _state_tile_ptrs(base, i_k, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers and mask of the [BK, BV] tile (i_k, i_v) of a [K, V] fp32 state at ``base``."""
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return base + o_k[:, None] * V + o_v[None, :], (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def _state_program(pid, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A state-walking program's (sequence · H + head, K tile, V tile) from its id on the one-axis grid, K tiles
    fastest (the tiles of one head, which read the same k and v, run side by side)."""
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV
    return pid // (NK * NV), pid % NK, (pid // NK) % NV


@triton.jit
def _sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For a program that walks sequence ``i_n``: (its first row, its length, its chunk count, the index of
    its first chunk among all chunks, where the per-chunk states live)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        NT = tl.cdiv(T, BT)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = tl.cast(i_n, tl.int64) * T
        NT = tl.cdiv(T, BT)
        boh = tl.cast(i_n, tl.int64) * NT
    return bos, T, NT, boh


@triton.jit
def _chunk_span(pid, cu_seqlens, chunk_indices, T, H: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For a program of a per-chunk kernel, ``pid = (chunk among all chunks) · H + head`` (the layout of the
    per-chunk states; without varlen, batch row b holds chunks b·NT to b·NT + NT - 1): (its head, its chunk among
    all chunks (int64), its chunk within its sequence, the sequence's first row (int64) and length)."""
    i_h = pid % H
    i_tg = pid // H
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + tl.cast(i_tg, tl.int64) * 2)
        i_t = tl.load(chunk_indices + tl.cast(i_tg, tl.int64) * 2 + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        NT = tl.cdiv(T, BT)
        i_b = i_tg // NT
        i_t = i_tg - i_b * NT
        bos = tl.cast(i_b, tl.int64) * T
    return i_h, tl.cast(i_tg, tl.int64), i_t, bos, T


@triton.jit
def _scores_and_state_product(
    x, y, state, n_rows, i_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATE_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One chunk's ``x yᵀ`` [BT, BT] and ``x · state[:, V-tile i_v]`` [BT, BV], both summed over K tiles:
    (q, k, h) gives the output's scores and inter-chunk term, (k, q, dh) the same for dv."""
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_xs = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_x = _load_tile(x, n_rows, i_k * BK, K, H * K, BT, BK)
        b_y = _load_tile(y, n_rows, i_k * BK, K, H * K, BT, BK)
        p_s, m_s = _state_tile_ptrs(state, i_k, i_v, K, V, BK, BV)
        b_s = tl.load(p_s, mask=m_s, other=0.0)
        b_A += tl.dot(b_x, tl.trans(b_y), input_precision=DOT_PRECISION)
        if STATE_F32:
            b_xs += tl.dot(b_x.to(tl.float32), b_s, input_precision=DOT_PRECISION)
        else:
            b_xs += tl.dot(b_x, b_s.to(b_x.dtype))
    return b_A, b_xs


@triton.jit
def _fp16_range_shift(a):
    """For an fp32 tile ``a`` headed for an fp16 dot: the power of two 2^shift with max|a| / 2^shift in (2^14, 2^15].
    The tiles: a chunk's intra-chunk scores (or score gradients) [BT, BT], and the decay-weighted keys (queries) of
    the state (state-gradient) walk [BT, BK]. Scores are scale · q·k (times decays ≤ 1), and in fp16 they can
    pass 65504 while the result still fits (small v): rounded as they are they would turn it inf, where the
    reference's fp32 gives a number. Or a tile can fall below fp16's normal range (6.1e-5: a small scale or small
    upstream gradients; keys or queries that are fp16 subnormals, or weighted by a decay into them) while the
    result is a normal number (large v, or upstream gradients): rounded as they are its values would be subnormals
    or 0, and the result would lose up to all of that part (the final state 3-7% of itself, from keys of 1e-6).
    Divided by 2^shift (exact, but for values too small beside the tile's largest to count) they fit fp16's normal
    range, and the product is multiplied back in fp32; the dot keeps its fp16 operands (fp32 scores spilled
    registers on sm_89). Only finite values count: an inf or NaN one (an inf input) would make the shift inf and
    every row of the tile NaN, where it spoils only its own row unscaled. An all-zero tile takes 2^-115 (its zeros
    stay zeros; 2^±115 is finite in fp32)."""
    magnitude = tl.abs(a)
    largest = tl.max(tl.where(magnitude < float("inf"), magnitude, 0.0))
    return tl.ceil(tl.log2(tl.maximum(largest, 7.888609052210118e-31) * (1.0 / 32768.0)))  # (2^-100 / 2^15)


@_autotune(["H", "K", "V", "BT", "BK", "BV"], num_warps=[2, 4, 8], num_stages=[1, 2], default=(4, 2))
@triton.jit(do_not_specialize=["T"])
def _chunk_state_fwd_kernel(
    k, v, h, h0, ht, log_decay, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_H: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = _state_program(tl.program_id(0), K, V, BK, BV)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = _sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    log2_decay = tl.load(log_decay + i_h).to(tl.float32) * 1.4426950408889634
    o_t = tl.arange(0, BT)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0, m_h = _state_tile_ptrs(h0 + tl.cast(i_nh, tl.int64) * K * V, i_k, i_v, K, V, BK, BV)
        b_h += tl.load(p_h0, mask=m_h, other=0.0).to(tl.float32)
    for i_t in range(NT):
        if STORE_H:
            p_h, m_h = _state_tile_ptrs(h + ((boh + i_t) * H + i_h) * K * V, i_k, i_v, K, V, BK, BV)
            tl.store(p_h, b_h, mask=m_h)
        row0 = bos + i_t * BT
        n_rows = T - i_t * BT
        b_k = _load_tile(k + (row0 * H + i_h) * K, n_rows, i_k * BK, K, H * K, BT, BK)
        b_v = _load_tile(v + (row0 * H + i_h) * V, n_rows, i_v * BV, V, H * V, BT, BV)
        length = tl.minimum(n_rows, BT)
        # k_j carries γ^(L-1-j) to the chunk's end; rows past the end are zero (and their exponent unused).
        w_end = tl.where(o_t < length, tl.exp2((length - 1 - o_t).to(tl.float32) * log2_decay), 0.0)
        b_h = b_h * tl.exp2(length.to(tl.float32) * log2_decay)
        if b_k.dtype == tl.float16:  # weighted keys out of fp16's normal range: _fp16_range_shift
            b_kw = b_k * w_end[:, None]
            shift = _fp16_range_shift(b_kw)
            b_kw = (b_kw * tl.exp2(-shift)).to(b_k.dtype)
            b_h += tl.dot(tl.trans(b_kw), b_v, input_precision=DOT_PRECISION) * tl.exp2(shift)
        else:
            b_kw = (b_k * w_end[:, None]).to(b_k.dtype)
            b_h += tl.dot(tl.trans(b_kw), b_v, input_precision=DOT_PRECISION)
    if STORE_HT:
        p_ht, m_h = _state_tile_ptrs(ht + tl.cast(i_nh, tl.int64) * K * V, i_k, i_v, K, V, BK, BV)
        tl.store(p_ht, b_h, mask=m_h)


@_autotune(["H", "K", "V", "BT", "BK", "BV", "STATE_F32"], num_warps=[4, 8], num_stages=[2, 3], default=(8, 2))
@triton.jit(do_not_specialize=["T"])
def _chunk_output_fwd_kernel(
    q, k, v, h, o, log_decay, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, STATE_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV
    pid, i_v = tl.program_id(0) // NV, tl.program_id(0) % NV  # V tiles fastest
    i_h, i_tg, i_t, bos, T = _chunk_span(pid, cu_seqlens, chunk_indices, T, H, BT, IS_VARLEN)
    log2_decay = tl.load(log_decay + i_h).to(tl.float32) * 1.4426950408889634
    row0 = bos + i_t * BT
    n_rows = T - i_t * BT
    q += (row0 * H + i_h) * K
    k += (row0 * H + i_h) * K
    h += (i_tg * H + i_h) * K * V

    b_A, b_o = _scores_and_state_product(q, k, h, n_rows, i_v, H, K, V, BT, BK, BV, STATE_F32, DOT_PRECISION)

    o_t = tl.arange(0, BT)
    distance = o_t[:, None] - o_t[None, :]
    m_A = (distance >= 0) & (o_t < n_rows)[:, None] & (o_t < n_rows)[None, :]
    b_A = tl.where(m_A, b_A * tl.exp2(tl.maximum(distance, 0).to(tl.float32) * log2_decay) * scale, 0.0)
    b_v = _load_tile(v + (row0 * H + i_h) * V, n_rows, i_v * BV, V, H * V, BT, BV)
    b_o = b_o * (scale * tl.exp2((o_t + 1).to(tl.float32) * log2_decay))[:, None]
    if b_v.dtype == tl.float16:  # scores out of fp16's normal range: _fp16_range_shift
        shift = _fp16_range_shift(b_A)
        b_o += tl.dot((b_A * tl.exp2(-shift)).to(b_v.dtype), b_v, input_precision=DOT_PRECISION) * tl.exp2(shift)
    else:
        b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    _store_tile(o + (row0 * H + i_h) * V, b_o, n_rows, i_v * BV, V, H * V, BT, BV)


@_autotune(["H", "K", "V", "BT", "BK", "BV"], num_warps=[2, 4, 8], num_stages=[1, 2], default=(4, 2))
@triton.jit(do_not_specialize=["T"])
def _chunk_state_bwd_kernel(
    q, do, dh, dht, dh0, log_decay, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_nh, i_k, i_v = _state_program(tl.program_id(0), K, V, BK, BV)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = _sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    log2_decay = tl.load(log_decay + i_h).to(tl.float32) * 1.4426950408889634
    o_t = tl.arange(0, BT)

    first_decay = tl.exp2(log2_decay)  # γ: from the state before a chunk to its first token
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht, m_h = _state_tile_ptrs(dht + tl.cast(i_nh, tl.int64) * K * V, i_k, i_v, K, V, BK, BV)
        b_dh += tl.load(p_dht, mask=m_h, other=0.0).to(tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        # dh[chunk] is the gradient of the state *after* the chunk.
        p_dh, m_h = _state_tile_ptrs(dh + ((boh + i_t) * H + i_h) * K * V, i_k, i_v, K, V, BK, BV)
        tl.store(p_dh, b_dh, mask=m_h)
        row0 = bos + i_t * BT
        n_rows = T - i_t * BT
        b_q = _load_tile(q + (row0 * H + i_h) * K, n_rows, i_k * BK, K, H * K, BT, BK)
        b_do = _load_tile(do + (row0 * H + i_h) * V, n_rows, i_v * BV, V, H * V, BT, BV)
        length = tl.minimum(n_rows, BT)
        # o_i read the state before the chunk through scale · γ^(i+1) q_i. fp16 weighs q by γ^i only (≤ 1, and 1 on
        # the first row), scaled into fp16's normal range (_fp16_range_shift), before its rounding, and 2^shift, then
        # scale · γ, multiply the fp32 product: folded into an fp16 q, a scale above 1 could take it past 65504 (inf:
        # NaN gradients), and a γ under fp16's normal range every row of it to a subnormal or 0 (the initial state's
        # gradient of a fast-decaying head lost). bf16 and fp32 have fp32's range, where the unweighted product is
        # the one that could overflow: the weights stay folded in.
        b_dh = b_dh * tl.exp2(length.to(tl.float32) * log2_decay)
        if b_q.dtype == tl.float16:
            w_start = tl.where(o_t < length, tl.exp2(o_t.to(tl.float32) * log2_decay), 0.0)
            b_qw = b_q * w_start[:, None]
            shift = _fp16_range_shift(b_qw)
            b_qw = (b_qw * tl.exp2(-shift)).to(b_q.dtype)
            b_dh += (tl.dot(tl.trans(b_qw), b_do.to(b_qw.dtype), input_precision=DOT_PRECISION) * tl.exp2(shift)
                     * (scale * first_decay))
        else:
            w_start = tl.where(o_t < length, scale * tl.exp2((o_t + 1).to(tl.float32) * log2_decay), 0.0)
            b_qw = (b_q * w_start[:, None]).to(b_q.dtype)
            b_dh += tl.dot(tl.trans(b_qw), b_do.to(b_qw.dtype), input_precision=DOT_PRECISION)
    if STORE_DH0:
        p_dh0, m_h = _state_tile_ptrs(dh0 + tl.cast(i_nh, tl.int64) * K * V, i_k, i_v, K, V, BK, BV)
        tl.store(p_dh0, b_dh, mask=m_h)


@_autotune(["H", "K", "V", "BT", "BK", "BV", "STATE_F32"], num_warps=[4, 8], num_stages=[2, 3], default=(8, 2))
@triton.jit(do_not_specialize=["T"])
def _chunk_dv_bwd_kernel(
    q, k, do, dh, dv, log_decay, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, STATE_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV
    pid, i_v = tl.program_id(0) // NV, tl.program_id(0) % NV  # V tiles fastest
    i_h, i_tg, i_t, bos, T = _chunk_span(pid, cu_seqlens, chunk_indices, T, H, BT, IS_VARLEN)
    log2_decay = tl.load(log_decay + i_h).to(tl.float32) * 1.4426950408889634
    row0 = bos + i_t * BT
    n_rows = T - i_t * BT
    q += (row0 * H + i_h) * K
    k += (row0 * H + i_h) * K
    dh += (i_tg * H + i_h) * K * V

    # b_A[j, i] = k_j · q_i ; b_dv[j] = k_j dh
    b_A, b_dv = _scores_and_state_product(k, q, dh, n_rows, i_v, H, K, V, BT, BK, BV, STATE_F32, DOT_PRECISION)

    o_t = tl.arange(0, BT)
    length = tl.minimum(n_rows, BT)
    distance = o_t[None, :] - o_t[:, None]  # i - j
    m_A = (distance >= 0) & (o_t < n_rows)[:, None] & (o_t < n_rows)[None, :]
    b_A = tl.where(m_A, b_A * tl.exp2(tl.maximum(distance, 0).to(tl.float32) * log2_decay) * scale, 0.0)
    w_end = tl.where(o_t < length, tl.exp2((length - 1 - o_t).to(tl.float32) * log2_decay), 0.0)
    b_do = _load_tile(do + (row0 * H + i_h) * V, n_rows, i_v * BV, V, H * V, BT, BV)
    if b_do.dtype == tl.float16:  # scores out of fp16's normal range: _fp16_range_shift
        shift = _fp16_range_shift(b_A)
        b_A = (b_A * tl.exp2(-shift)).to(b_do.dtype)
        b_dv = b_dv * w_end[:, None] + tl.dot(b_A, b_do, input_precision=DOT_PRECISION) * tl.exp2(shift)
    else:
        b_dv = b_dv * w_end[:, None] + tl.dot(b_A.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    _store_tile(dv + (row0 * H + i_h) * V, b_dv, n_rows, i_v * BV, V, H * V, BT, BV)


@_autotune(["H", "K", "V", "BT", "BK", "BV", "STATE_F32"], num_warps=[4, 8], num_stages=[2, 3], default=(8, 2))
@triton.jit(do_not_specialize=["T"])
def _chunk_dqk_bwd_kernel(
    q, k, v, h, do, dh, dq, dk, log_decay, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, STATE_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    NK: tl.constexpr = (K + BK - 1) // BK
    pid, i_k = tl.program_id(0) // NK, tl.program_id(0) % NK  # K tiles fastest
    i_h, i_tg, i_t, bos, T = _chunk_span(pid, cu_seqlens, chunk_indices, T, H, BT, IS_VARLEN)
    log2_decay = tl.load(log_decay + i_h).to(tl.float32) * 1.4426950408889634
    row0 = bos + i_t * BT
    n_rows = T - i_t * BT
    v += (row0 * H + i_h) * V
    do += (row0 * H + i_h) * V
    h += (i_tg * H + i_h) * K * V
    dh += (i_tg * H + i_h) * K * V

    # b_dA[i, j] = do_i · v_j ; b_dq[i] = do_i hᵀ ; b_dk[j] = v_j dhᵀ
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = _load_tile(v, n_rows, i_v * BV, V, H * V, BT, BV)
        b_do = _load_tile(do, n_rows, i_v * BV, V, H * V, BT, BV).to(b_v.dtype)
        p_h, m_h = _state_tile_ptrs(h, i_k, i_v, K, V, BK, BV)
        b_h = tl.load(p_h, mask=m_h, other=0.0)
        p_dh, _ = _state_tile_ptrs(dh, i_k, i_v, K, V, BK, BV)
        b_dh = tl.load(p_dh, mask=m_h, other=0.0)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        if STATE_F32:
            b_dq += tl.dot(b_do.to(tl.float32), tl.trans(b_h), input_precision=DOT_PRECISION)
            b_dk += tl.dot(b_v.to(tl.float32), tl.trans(b_dh), input_precision=DOT_PRECISION)
        else:
            b_dq += tl.dot(b_do, tl.trans(b_h.to(b_do.dtype)))
            b_dk += tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)))

    o_t = tl.arange(0, BT)
    length = tl.minimum(n_rows, BT)
    distance = o_t[:, None] - o_t[None, :]  # i - j
    m_A = (distance >= 0) & (o_t < n_rows)[:, None] & (o_t < n_rows)[None, :]
    b_dA = tl.where(m_A, b_dA * tl.exp2(tl.maximum(distance, 0).to(tl.float32) * log2_decay) * scale, 0.0)
    w_start = scale * tl.exp2((o_t + 1).to(tl.float32) * log2_decay)
    w_end = tl.where(o_t < length, tl.exp2((length - 1 - o_t).to(tl.float32) * log2_decay), 0.0)
    b_q = _load_tile(q + (row0 * H + i_h) * K, n_rows, i_k * BK, K, H * K, BT, BK)
    b_k = _load_tile(k + (row0 * H + i_h) * K, n_rows, i_k * BK, K, H * K, BT, BK)
    if b_k.dtype == tl.float16:  # score gradients out of fp16's normal range: _fp16_range_shift
        shift = _fp16_range_shift(b_dA)
        b_dA = (b_dA * tl.exp2(-shift)).to(b_k.dtype)
        b_dq = b_dq * w_start[:, None] + tl.dot(b_dA, b_k, input_precision=DOT_PRECISION) * tl.exp2(shift)
        b_dk = b_dk * w_end[:, None] + tl.dot(tl.trans(b_dA), b_q, input_precision=DOT_PRECISION) * tl.exp2(shift)
    else:
        b_dA = b_dA.to(b_k.dtype)
        b_dq = b_dq * w_start[:, None] + tl.dot(b_dA, b_k, input_precision=DOT_PRECISION)
        b_dk = b_dk * w_end[:, None] + tl.dot(tl.trans(b_dA), b_q, input_precision=DOT_PRECISION)
    _store_tile(dq + (row0 * H + i_h) * K, b_dq, n_rows, i_k * BK, K, H * K, BT, BK)
    _store_tile(dk + (row0 * H + i_h) * K, b_dk, n_rows, i_k * BK, K, H * K, BT, BK)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _block_size(chunk_size: int) -> int:
    """The chunk length the kernels tile with: ``chunk_size`` rounded up to a power of two, within [16, 64]
    (the result does not depend on it; ``tl.dot`` needs tiles of at least 16).
    Not 128: its [128, 128] score tiles spill hundreds of bytes per thread on sm_80/sm_89, and fp32 dq/dk
    then fits no config in an sm_89's shared memory (``python -m retnet.kernels.aot --chunk-sizes 128``)."""
    return min(64, max(16, _pow2(chunk_size)))


def _head_blocks(K: int, V: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """Tile widths, all in [16, 128]: (BK, BV) of the state kernels, (BK, BV) of the per-chunk output and
    dv kernels, (BK, BV) of the dq/dk kernel. fp32 inputs take narrower tiles: their 3xTF32 dots hold
    each operand twice (high and low parts), and the 16-bit widths spill hundreds of bytes of registers
    per thread. ``python -m retnet.kernels.aot`` measured these as spill-free on sm_90, and on sm_80/sm_89
    bar 8-16 bytes in fp32 dq/dk."""
    k2, v2 = max(16, _pow2(K)), max(16, _pow2(V))
    if dtype == torch.float32:
        return min(32, k2), min(64, v2), min(32, k2), min(32, v2), min(16, k2), min(32, v2)
    # dq/dk: 64-wide K tiles (each recomputes do·vᵀ over all of V; wider tiles would spill registers).
    # fp16 multiplies fp32 states there (tf32), twice the operand registers: 32-wide V tiles (64 spilled
    # ~450 bytes per thread at K = V = 64 on sm_80/sm_89, and in 4-warp configs on sm_90).
    dqk_bv = 32 if dtype == torch.float16 else 64
    return min(64, k2), min(64, v2), min(64, k2), min(128, v2), min(64, k2), min(dqk_bv, v2)


def _chunk_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the per-chunk states h and their gradients dh (always accumulated in fp32): what their
    consumers multiply in. bf16 inputs round them to bf16 for the tensor-core dot anyway, so storing bf16
    gives bit-identical results at half the memory and traffic (at head dim 256, h outweighs q, k and v
    together); fp16 inputs keep fp32 states in their dots (range), fp32 inputs need fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def prepare_chunks(cu_seqlens: torch.Tensor, BT: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For a varlen batch: ``chunk_offsets`` [N+1] (first chunk of each sequence), ``chunk_indices``
    [chunks, 2] int32 (sequence, chunk-within-sequence) and the total chunk count.

    The count comes from the host copy of the offsets (:func:`retnet.kernels.checks.host_offsets`, read once
    per forward), and the tables are built once per forward and tile length, not per layer."""
    host = host_offsets(cu_seqlens)
    if ("chunks", BT) not in host.derived:
        total = sum(-(-length // BT) for length in host.lengths)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        counts = (lengths + BT - 1) // BT
        chunk_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # output_size: the count is known on the host, so the device's need not be read back
        seq = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts, output_size=total)
        local = torch.arange(total, device=cu_seqlens.device) - chunk_offsets[seq]
        chunk_indices = torch.stack([seq, local], dim=1).to(torch.int32).contiguous()
        host.derived["chunks", BT] = (chunk_offsets.to(torch.int32).contiguous(), chunk_indices, total)
    return host.derived["chunks", BT]


# CUDA's limits on a launch grid, per axis (x, y, z). Only a GPU enforces them (the interpreter runs any grid):
# 131072 (sequence, head) pairs of a 4096-sequence decode step, or 65536 chunks of 1M tokens, fail to launch on
# y or z. Every kernel therefore runs on x alone, its head-dim tiles fastest (tiles that re-read the same q, k,
# v rows stay side by side, as they were as the first of three axes).
MAX_GRID = (2**31 - 1, 65535, 65535)


def _checked_grid(*dims: int) -> tuple[int, ...]:
    """``dims`` as a launch grid, or a ``ValueError`` for one CUDA can't launch (rather than a failed launch)."""
    for axis, (size, limit) in enumerate(zip(dims, MAX_GRID)):
        if size > limit:
            raise ValueError(f"launch grid {dims}: axis {'xyz'[axis]} has {size} blocks, more than CUDA's {limit}")
    return dims


def _state_grid(N: int, H: int, K: int, V: int, BK: int, BV: int) -> tuple[int]:
    """Grid of the state-walking kernels: one program per (sequence · H + head, V tile, K tile), K fastest
    (``_state_program`` reads it back)."""
    return _checked_grid(N * H * triton.cdiv(V, BV) * triton.cdiv(K, BK))


def _chunk_grid(total: int, H: int, D: int, BD: int) -> tuple[int]:
    """Grid of the per-chunk kernels: one program per (chunk among all ``total`` chunks · H + head, tile of the
    head dim D), the tile fastest."""
    return _checked_grid(total * H * triton.cdiv(D, BD))


def _device_guard(x: torch.Tensor):
    """The context to launch kernels on ``x``: Triton launches on torch's *current* CUDA device, not on the
    tensors' (unlike torch's own ops), so a model split over GPUs (``device_map="auto"``, or any layer on cuda:1
    while cuda:0 is current) would run its kernels on the wrong GPU, reading another device's memory."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _layout(q, v, chunk_size, cu_seqlens, chunks=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = _block_size(chunk_size)
    if cu_seqlens is None:
        N, NT = B, triton.cdiv(T, BT)
        chunk_offsets = chunk_indices = None
        total = B * NT
    else:
        N, NT = len(cu_seqlens) - 1, None
        chunk_offsets, chunk_indices, total = chunks if chunks is not None else prepare_chunks(cu_seqlens, BT)
    return B, T, H, K, V, BT, N, NT, total, chunk_offsets, chunk_indices


def _chunk_states(k, v, log_decay, initial_state, output_final_state, store_states, lay, cu_seqlens):
    """Kernel 1: the states before every chunk ([chunks, H, K, V] in ``_chunk_state_dtype``, or None) and
    the fp32 final state."""
    _, T, H, K, V, BT, N, _, total, chunk_offsets, _ = lay
    BK, BV, *_ = _head_blocks(K, V, k.dtype)
    h = k.new_empty(total, H, K, V, dtype=_chunk_state_dtype(k.dtype)) if store_states else None
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    _chunk_state_fwd_kernel[_state_grid(N, H, K, V, BK, BV)](
        k, v, h, initial_state, ht, log_decay, cu_seqlens, chunk_offsets, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_H0=initial_state is not None, STORE_H=store_states, STORE_HT=output_final_state,
        IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(k.dtype),
    )
    return h, ht


def chunk_retention_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens,
                        chunks=None):
    """Forward on validated, contiguous inputs: ``(o [B, T, H, V] in v's dtype, final state or None)``."""
    with _device_guard(q):
        return _chunk_retention_fwd(
            q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens, chunks
        )


def _chunk_retention_fwd(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens,
                         chunks):
    lay = _layout(q, v, chunk_size, cu_seqlens, chunks)
    _, T, H, K, V, BT, _, _, total, _, chunk_indices = lay
    h, ht = _chunk_states(k, v, log_decay, initial_state, output_final_state, True, lay, cu_seqlens)
    o = torch.empty_like(v)
    _, _, BK, BV, _, _ = _head_blocks(K, V, q.dtype)
    _chunk_output_fwd_kernel[_chunk_grid(total, H, V, BV)](
        q, k, v, h, o, log_decay, cu_seqlens, chunk_indices, scale, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, IS_VARLEN=cu_seqlens is not None,
        STATE_F32=h.dtype == torch.float32, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return o, ht


def chunk_retention_bwd(q, k, v, log_decay, scale, initial_state, do, dht, chunk_size, cu_seqlens, chunks=None):
    """Backward on contiguous inputs: ``(dq, dk, dv, d initial_state or None)``; dht may be None."""
    with _device_guard(q):
        return _chunk_retention_bwd(
            q, k, v, log_decay, scale, initial_state, do, dht, chunk_size, cu_seqlens, chunks
        )


def _chunk_retention_bwd(q, k, v, log_decay, scale, initial_state, do, dht, chunk_size, cu_seqlens, chunks):
    lay = _layout(q, v, chunk_size, cu_seqlens, chunks)
    _, T, H, K, V, BT, N, _, total, chunk_offsets, chunk_indices = lay
    h, _ = _chunk_states(k, v, log_decay, initial_state, False, True, lay, cu_seqlens)
    BKs, BVs, BK, BV, BKq, BVq = _head_blocks(K, V, q.dtype)
    dh = q.new_empty(total, H, K, V, dtype=_chunk_state_dtype(q.dtype))
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if initial_state is not None else None
    is_varlen, precision, state_f32 = cu_seqlens is not None, _dot_precision(q.dtype), dh.dtype == torch.float32
    _chunk_state_bwd_kernel[_state_grid(N, H, K, V, BKs, BVs)](
        q, do, dh, dht, dh0, log_decay, cu_seqlens, chunk_offsets, scale, T,
        H=H, K=K, V=V, BT=BT, BK=BKs, BV=BVs,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, IS_VARLEN=is_varlen, DOT_PRECISION=precision,
    )
    dv = torch.empty_like(v)
    _chunk_dv_bwd_kernel[_chunk_grid(total, H, V, BV)](
        q, k, do, dh, dv, log_decay, cu_seqlens, chunk_indices, scale, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, IS_VARLEN=is_varlen, STATE_F32=state_f32, DOT_PRECISION=precision,
    )
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    _chunk_dqk_bwd_kernel[_chunk_grid(total, H, K, BKq)](
        q, k, v, h, do, dh, dq, dk, log_decay, cu_seqlens, chunk_indices, scale, T,
        H=H, K=K, V=V, BT=BT, BK=BKq, BV=BVq,
        IS_VARLEN=is_varlen, STATE_F32=state_f32, DOT_PRECISION=precision,
    )
    return dq, dk, dv, dh0


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------
class ChunkRetentionFunction(torch.autograd.Function):
    """Triton chunkwise retention with a Triton backward for q, k, v and the initial state."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens):
        chunks = None if cu_seqlens is None else prepare_chunks(cu_seqlens, _block_size(chunk_size))
        o, ht = chunk_retention_fwd(
            q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens, chunks
        )
        ctx.save_for_backward(q, k, v, log_decay, initial_state, cu_seqlens)
        ctx.scale, ctx.chunk_size, ctx.chunks = scale, chunk_size, chunks
        ctx.set_materialize_grads(False)  # an unused final state then costs no dht pass
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log_decay, initial_state, cu_seqlens = ctx.saved_tensors
        with torch.no_grad():
            do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
            dht = None if dht is None else dht.float().contiguous()
            dq, dk, dv, dh0 = chunk_retention_bwd(
                q, k, v, log_decay, ctx.scale, initial_state, do, dht, ctx.chunk_size, cu_seqlens, ctx.chunks
            )
            if dh0 is not None:
                dh0 = dh0.to(initial_state.dtype)
        if torch.is_grad_enabled():  # a create_graph=True backward (see _NotDifferentiableTwice)
            dq, dk, dv, dh0 = _NotDifferentiableTwice.wrap(dq, dk, dv, dh0)
        return dq, dk, dv, None, None, dh0, None, None, None


class _NotDifferentiableTwice(torch.autograd.Function):
    """The gradients of a ``create_graph=True`` backward through the Triton op, in a graph whose backward refuses.

    The Triton backward is not differentiable. ``once_differentiable`` marks its gradients so only when the upstream
    gradients require grad, which those of a gradient penalty or a Hessian-vector product (``do`` = ones, from
    ``loss.sum()``) do not: the gradients came back as constants, and a second-order term built on them was dropped
    without a word (or, alone, raised "does not require grad"). Now differentiating them raises, naming the way out."""

    @staticmethod
    def wrap(*grads):
        present = [g for g in grads if g is not None]
        wrapped = iter(_NotDifferentiableTwice.apply(*(g.detach().requires_grad_() for g in present)))
        return tuple(None if g is None else next(wrapped) for g in grads)

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "chunk_retention: the Triton kernels' backward is not differentiable: gradients taken with "
            "create_graph=True can't be differentiated again (a gradient penalty, a Hessian-vector product); "
            "RETNET_KERNELS=torch runs the fp32 references, which are"
        )


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------
def check_retention_inputs(q, k, v, log_decay, initial_state, cu_seqlens, op: str = "retention", scale=None):
    """The ops' input rules (:func:`retnet.kernels.checks.check_inputs`, the same as the references'); returns
    ``scale`` as a float (or None). Raises ``ValueError`` naming what was expected and what was received."""
    return check_inputs(op, q, k, v, log_decay, scale, initial_state, cu_seqlens)


@shares_host_offsets
def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise retention in Triton, differentiable in q, k, v and ``initial_state``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one dtype of float32, float16 or bfloat16, K and V at
            most 512. Any T (need not be a multiple of the chunk size). The input rules are the references'
            (:mod:`retnet.kernels.checks`).
        log_decay: ``[H]`` float32, ln γ per head (< 0). Gets no gradient: one that requires grad is refused
            under grad mode (so is a ``scale`` tensor that does), as by the references.
        scale: multiplies q·k: a float or a one-element tensor; defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` float32 state before the first token (``[N, H, K, V]`` with
            ``cu_seqlens``), or None for zeros.
        output_final_state: also return the state after the last token (its gradient is honoured).
        chunk_size: an int >= 1, the tile length; the kernels use the next power of two, within [16, 64] (the result
            does not depend on it).
        cu_seqlens: ``[N + 1]`` integer offsets of N sequences packed into B = 1; no state crosses them.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [B or N, H, K, V] float32 or None)``.
    """
    scale = check_inputs("chunk_retention", q, k, v, log_decay, scale, initial_state, cu_seqlens)
    chunk_size = check_chunk_size(chunk_size, "chunk_retention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    log_decay = usable_log_decay(log_decay).contiguous()  # γ = 0: exp2(0 · ln γ) is 1, not NaN
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    if q.shape[0] == 0 or q.shape[1] == 0:  # nothing to launch: the state passes through unchanged
        return naive.chunk_retention(
            q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens
        )
    return ChunkRetentionFunction.apply(
        q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size, cu_seqlens
    )
