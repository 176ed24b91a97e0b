"""Launch grids against CUDA's limits, which only a real GPU enforces (the interpreter runs any grid).

A CUDA grid may have 2^31 - 1 blocks along x but only 65535 along y and z; a launch past that fails on the GPU
(``invalid argument``) while every interpreted test passes. Each axis that grows with the problem (sequences x
heads, chunks, batch rows x heads, decode rows x heads) must therefore be on x. The launchers run here on meta
tensors (no memory) at the largest realistic shapes, with the kernels swapped for recorders of their grids; the
kernels themselves run on small shapes in test_chunk.py / test_recurrent.py, and on the folded grids below.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch

from retnet.kernels import chunk, recurrent

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
KERNELS = [
    (chunk, "_chunk_state_fwd_kernel"),
    (chunk, "_chunk_output_fwd_kernel"),
    (chunk, "_chunk_state_bwd_kernel"),
    (chunk, "_chunk_dv_bwd_kernel"),
    (chunk, "_chunk_dqk_bwd_kernel"),
    (recurrent, "_recurrent_fwd_kernel"),
]


class _GridRecorder:
    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        self.grids.append((self.name, tuple(grid)))
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _recorded_grids():
    grids: list[tuple[str, tuple[int, ...]]] = []
    with contextlib.ExitStack() as patches:
        for module, name in KERNELS:
            patches.enter_context(mock.patch.object(module, name, _GridRecorder(name, grids)))
        yield grids


def _assert_launchable(grids):
    assert grids
    for name, grid in grids:
        assert 1 <= len(grid) <= 3, (name, grid)
        for axis, (size, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
            assert 1 <= size <= limit, f"{name}: grid {grid} axis {'xyz'[axis]} = {size} exceeds CUDA's {limit}"


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


# (B, T, H, K, V, chunk_size, packed sequences or None)
LARGE_CHUNK_CALLS = {
    # 1M tokens in 16-token tiles: 65536 chunks along one axis.
    "1M-tokens-chunk16": (1, 2**20, 8, 64, 64, 16, None),
    # a prefill of 4096 prompts (or a large micro-batch) padded: B·H = 131072 rows of heads.
    "B4096xH32": (4096, 16, 32, 64, 64, 64, None),
    # 4096 prompts packed into one row: N·H = 131072 state walks, 4096+ chunks.
    "packed-4096-prompts": (1, 4096 * 24, 32, 64, 64, 64, 4096),
    # 1M tokens of short documents packed: one chunk per document, 2^17 chunks.
    "packed-131072-docs": (1, 2**17 * 8, 4, 64, 64, 64, 2**17),
}


@pytest.mark.parametrize("case", list(LARGE_CHUNK_CALLS))
def test_chunk_launches_fit_cuda_grid_limits(case):
    B, T, H, K, V, chunk_size, num_seqs = LARGE_CHUNK_CALLS[case]
    q, k, v = _meta(B, T, H, K), _meta(B, T, H, K), _meta(B, T, H, V)
    log_decay = torch.full((H,), -0.1, device="meta")
    N = B if num_seqs is None else num_seqs
    h0 = _meta(N, H, K, V, dtype=torch.float32)
    cu_seqlens = None
    if num_seqs is not None:  # read on the host by prepare_chunks: a real (small) tensor
        cu_seqlens = torch.linspace(0, T, num_seqs + 1).round().to(torch.int32)
    with _recorded_grids() as grids:
        chunk.chunk_retention_fwd(q, k, v, log_decay, 0.125, h0, True, chunk_size, cu_seqlens)
        chunk.chunk_retention_bwd(q, k, v, log_decay, 0.125, h0, q, h0, chunk_size, cu_seqlens)
    assert {name for name, _ in grids} == {name for _, name in KERNELS[:5]}
    _assert_launchable(grids)


@pytest.mark.parametrize("rows, heads, packed", [(4096, 32, False), (4096, 32, True), (65536, 8, False)])
def test_decode_launch_fits_cuda_grid_limits(rows, heads, packed):
    """One decode step of 4096 sequences x 32 heads: 131072 (sequence, head) programs."""
    B, T = (1, rows) if packed else (rows, 1)
    q, v = _meta(B, T, heads, 128), _meta(B, T, heads, 128)
    log_decay = torch.full((heads,), -0.1, device="meta")
    h0 = _meta(rows, heads, 128, 128, dtype=torch.float32)
    cu_seqlens = torch.arange(rows + 1, dtype=torch.int32, device="meta") if packed else None
    with _recorded_grids() as grids:
        recurrent.recurrent_retention_fwd(q, q, v, log_decay, 0.1, h0, True, cu_seqlens)
    assert [name for name, _ in grids] == ["_recurrent_fwd_kernel"]
    _assert_launchable(grids)


def test_grid_helpers_put_everything_on_x():
    """The grid helpers as pure functions: one axis, every block accounted for, nothing past CUDA's limits."""
    # state walks: one program per (sequence, head) x V tile x K tile
    assert chunk._state_grid(4096, 32, 512, 512, 16, 32) == (4096 * 32 * 16 * 32,)
    assert chunk._state_grid(3, 2, 40, 24, 32, 16) == (3 * 2 * 2 * 2,)
    # per-chunk kernels: one program per (chunk, head) x tile of the head dim
    assert chunk._chunk_grid(2**20 // 16, 32, 256, 64) == (2**16 * 32 * 4,)
    # beyond what any axis can hold: a clear error instead of a failed launch on the GPU
    with pytest.raises(ValueError, match="grid"):
        chunk._chunk_grid(2**31, 1, 64, 64)
    with pytest.raises(ValueError, match="grid"):
        chunk._checked_grid(1, 65536)


def test_state_programs_cover_every_tile_once():
    """The state kernels read (sequence·H + head, K tile, V tile) back from their one-axis program id (K tiles
    fastest): every combination exactly once, for the grid ``_state_grid`` launches (run by Triton, interpreted)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(out, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        pid = tl.program_id(0)
        i_nh, i_k, i_v = chunk._state_program(pid, K, V, BK, BV)
        tl.store(out + pid * 3, i_nh)
        tl.store(out + pid * 3 + 1, i_k)
        tl.store(out + pid * 3 + 2, i_v)

    for N, H, K, V, BK, BV in [(3, 2, 40, 24, 16, 16), (1, 1, 16, 16, 16, 16), (2, 3, 64, 200, 32, 64)]:
        (programs,) = chunk._state_grid(N, H, K, V, BK, BV)
        out = torch.full((programs, 3), -1, dtype=torch.int32, device=DEVICE)
        decode[(programs,)](out, K=K, V=V, BK=BK, BV=BV)
        got = sorted(map(tuple, out.tolist()))
        want = [(nh, i, j) for nh in range(N * H) for i in range(-(-K // BK)) for j in range(-(-V // BV))]
        assert got == want
        assert out[:, 1].tolist()[: -(-K // BK)] == list(range(-(-K // BK)))  # K tiles fastest


def test_narrow_offsets_finds_32_bit_offsets_into_data_tensors():
    """``retnet.kernels.aot`` reads each compiled kernel's IR for 32-bit base offsets into data tensors
    (test_aot_compile.py runs it on every launch); the analysis itself, on IR in Triton's form."""
    from retnet.kernels.aot import narrow_offsets

    ttir = """
    %log2_decay = tt.addptr %log_decay, %i_h : !tt.ptr<f32>, i32 loc(#loc95)
    %bos = tt.addptr %cu_seqlens, %i_n : !tt.ptr<i32>, i32 loc(#loc9)
    %q_20 = tt.addptr %q, %q_19 : !tt.ptr<bf16>, i64 loc(#loc101)
    %k_21 = tt.addptr %k, %k_19 : !tt.ptr<bf16>, i32 loc(#loc102)
    %k_22 = tt.addptr %k_21, %rows : tensor<64x64x!tt.ptr<bf16>>, tensor<64x64xi32> loc(#loc103)
    %b_h = tt.splat %h0 : !tt.ptr<f32> -> tensor<64x64x!tt.ptr<f32>> loc(#loc77)
    %b_h_23 = tt.addptr %b_h, %offsets : tensor<64x64x!tt.ptr<f32>>, tensor<64x64xi64> loc(#loc68)
    %6 = tt.splat %ht : !tt.ptr<f32> -> tensor<64x64x!tt.ptr<f32>> loc(#loc50)
    %7 = tt.addptr %6, %offsets_32 : tensor<64x64x!tt.ptr<f32>>, tensor<64x64xi32> loc(#loc46)
    %h10 = tt.addptr %h1, %x : !tt.ptr<f32>, i32 loc(#loc1)
    """
    found = narrow_offsets(ttir, ["q", "k", "h0", "ht", "h", "log_decay", "cu_seqlens"])
    assert [line.split(":")[0] for line in found] == ["ht", "k"]
    assert narrow_offsets(ttir, ["q", "h0", "log_decay"]) == []


def test_kernels_launch_on_the_inputs_device(monkeypatch):
    """Triton launches on torch's current CUDA device, not the tensors' (torch's own ops follow the tensors):
    a layer on cuda:1 while cuda:0 is current (a model split over GPUs by ``device_map="auto"``) ran its kernels
    on cuda:0, on cuda:1's memory. Every launch must happen inside the inputs' device context."""
    from types import SimpleNamespace

    guard = chunk._device_guard(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with chunk._device_guard(torch.zeros(1)):  # CPU / interpreted: nothing to switch
        pass

    inside = []

    @contextlib.contextmanager
    def recording_guard(x):
        inside.append(x.device)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(chunk, "_device_guard", recording_guard)
    launched = []

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            launched.append((self.name, list(inside)))
            return lambda *args, **kwargs: None

    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Launch(name))
    q, h0 = _meta(1, 40, 2, 16), _meta(1, 2, 16, 16, dtype=torch.float32)
    log_decay = torch.full((2,), -0.1, device="meta")
    chunk.chunk_retention_fwd(q, q, q, log_decay, 0.25, h0, True, 16, None)
    chunk.chunk_retention_bwd(q, q, q, log_decay, 0.25, h0, q, h0, 16, None)
    recurrent.recurrent_retention_fwd(q[:, :1], q[:, :1], q[:, :1], log_decay, 0.25, h0, True, None)
    assert {name for name, _ in launched} == {name for _, name in KERNELS}
    assert all(devices == [q.device] for _, devices in launched), launched
