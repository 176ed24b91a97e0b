"""``python -m retnet.kernels.aot`` on GPU archs beyond sm_80/86/89/90: each compile is checked against that arch's
shared memory, and an arch whose limit is unknown is refused by name rather than checked against 0 bytes (sm_100
and sm_120 compiled, yet every launch was reported as fitting no config, exit status 1). No compiles here."""

from __future__ import annotations

from unittest import mock

import pytest

from retnet.kernels import aot


def test_blackwell_archs_have_their_shared_memory_limits():
    # (CUDA programming guide: 227 KiB per block on compute capability 10.0, 99 KiB on 12.0)
    assert aot.MAX_SHARED_BYTES[100] == 227 * 1024
    assert aot.MAX_SHARED_BYTES[120] == 99 * 1024


def test_sm100_tensor_core_dots_are_not_reported_as_fma():
    ptx = "tcgen05.mma.cta_group::1.kind::f16 [%r1], %rd2, %rd3, %r4, p;\n"
    assert aot._matmul_instructions(ptx) == "tcgen05"
    assert aot._matmul_instructions("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
    assert aot._matmul_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == "fma"


def test_an_arch_of_unknown_shared_memory_is_refused_before_compiling(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with mock.patch.object(aot, "record_launches", side_effect=AssertionError("compiled for an unknown arch")):
        with pytest.raises(SystemExit):
            aot.main(["--arch", "61"])
        assert "61" in capsys.readouterr().err
        with pytest.raises(ValueError, match="arch 61: no shared-memory limit"):
            aot.check([90, 61], ["bfloat16"], [64])


@pytest.mark.parametrize("flag, value, message", [
    ("--head-dims", "513", "head dims must be in [1, 512]"),
    ("--head-dims", "0", "head dims must be in [1, 512]"),
    ("--chunk-sizes", "0", "chunk_size must be an int >= 1"),
])
def test_a_head_dim_or_chunk_size_the_ops_refuse_is_refused_before_compiling(flag, value, message, capsys,
                                                                             monkeypatch):
    # (513 compiled for minutes and reported launches no model can make; 0 as a head dim was a ZeroDivisionError
    # traceback, 0 as a chunk size compiled 16-token tiles)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with mock.patch.object(aot, "record_launches", side_effect=AssertionError("recorded a refused launch")):
        with pytest.raises(SystemExit) as exit_info:
            aot.main(["--arch", "90", flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and value in err
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            aot.check([90], ["bfloat16"], [64] if flag == "--chunk-sizes" else [int(value)],
                      chunk_sizes=[int(value)] if flag == "--chunk-sizes" else [64])


def test_a_kernels_filter_that_matches_no_kernel_is_refused(capsys, monkeypatch):
    # (a typo such as "dkq" compiled nothing and reported "0 compiles", exit status 0: a check that passed unrun)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with mock.patch.object(aot, "record_launches", side_effect=AssertionError("recorded for a filter of nothing")):
        with pytest.raises(SystemExit) as exit_info:
            aot.main(["--kernels", "dqk", "dkq"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--kernels dkq: matches no kernel" in err and "_chunk_dqk_bwd_kernel" in err
