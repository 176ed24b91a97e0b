"""The MFU's retention FLOPs are those of the form training runs, not always the chunkwise form's: on the PyTorch
references (a CPU) ``retention_mode="auto"`` runs the parallel form up to 256 tokens (the whole T × T scores, no
state), chunkwise beyond; on the Triton kernels (a CUDA device) the chunkwise op in tiles of ``chunk_size`` rounded
to a power of two within [16, 64] (``retention_mode="parallel"`` too, at its default chunk of 64). Each figure is
worked out by hand for a tiny config, and on the CPU checked against torch's FLOP counter over a training step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import retnet  # noqa: F401 - registers the model
from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.train.flops import flops_per_token, retention_flops, retention_form

# 2 layers × 2 heads, key dim K = 32 / 2 = 16, value dim V = 2 · K = 32
TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, chunk_size=16)
LAYER_HEADS, K, V = 2 * 2, 16, 32


def _config(**overrides) -> RetNetConfig:
    return RetNetConfig(**{**TINY, **overrides})


def _chunkwise(chunk: int) -> int:
    """Per token and head: q·S and kᵀ·v (2·2·K·V), the chunk's q·kᵀ and scores·v (2·C·K + 2·C·V)."""
    return LAYER_HEADS * (4 * K * V + 2 * chunk * (K + V))


def _parallel(length: int) -> int:
    """Per token and head: a row of the T × T scores (2·T·K) and its product with v (2·T·V)."""
    return LAYER_HEADS * 2 * length * (K + V)


def test_the_cpu_runs_the_parallel_form_up_to_256_tokens_and_chunkwise_beyond():
    auto = _config()
    assert retention_form(auto, 48) == ("parallel", 48)
    assert retention_flops(auto, 48) == _parallel(48) == 18432  # (the chunkwise count said 14336)
    assert retention_flops(auto, 8) == _parallel(8) == 3072  # (no state: not 4·K·V more a head, 11264)
    assert retention_form(auto, 256) == ("parallel", 256)
    assert retention_form(auto, 320) == ("chunkwise", 16)
    assert retention_flops(auto, 320) == _chunkwise(16) == 14336
    assert retention_flops(_config(retention_mode="chunkwise"), 48) == _chunkwise(16)
    assert retention_flops(_config(retention_mode="chunkwise"), 8) == _chunkwise(8)  # a chunk of the sequence
    assert retention_flops(_config(retention_mode="parallel"), 320) == _parallel(320)
    assert retention_form(_config(retention_mode="recurrent"), 48) == ("recurrent", 0)
    assert retention_flops(_config(retention_mode="recurrent"), 48) == LAYER_HEADS * 4 * K * V == 8192


def test_the_triton_kernels_run_chunkwise_in_their_own_tiles(monkeypatch):
    pytest.importorskip("triton")  # (the tiles are the kernels' own: retnet.kernels.chunk imports triton)
    import retnet.kernels

    monkeypatch.setattr(retnet.kernels, "use_triton", lambda x: True)  # as on a CUDA device
    assert retention_form(_config(), 48) == ("chunkwise", 16)
    assert retention_flops(_config(), 48) == _chunkwise(16)
    assert retention_form(_config(chunk_size=128), 512) == ("chunkwise", 64)  # (not 128: the tile is at most 64)
    assert retention_flops(_config(chunk_size=128), 512) == _chunkwise(64)
    assert retention_form(_config(chunk_size=24), 512) == ("chunkwise", 32)  # rounded up to a power of two
    assert retention_form(_config(chunk_size=4), 512) == ("chunkwise", 16)  # at least 16
    assert retention_form(_config(retention_mode="parallel"), 512) == ("chunkwise", 64)  # the same op, chunk 64
    assert retention_form(_config(retention_mode="recurrent"), 512) == ("recurrent", 0)


@pytest.mark.parametrize("setting", ["torch", "neither"])
def test_a_device_the_triton_path_cannot_take_counts_as_the_references(setting, monkeypatch):
    """RETNET_KERNELS=torch, or a setting the ops refuse (the first forward says so, not the count): the references,
    on a CPU as without a device."""
    monkeypatch.setenv("RETNET_KERNELS", setting)
    assert retention_form(_config(), 48, torch.device("cpu")) == retention_form(_config(), 48) == ("parallel", 48)


@pytest.mark.parametrize(("mode", "length"), [("auto", 48), ("chunkwise", 48), ("recurrent", 6)])
def test_the_count_is_what_a_cpu_training_step_runs(mode, length):
    """6 FLOPs a Linear weight a token (the fused head's too) plus 3 × the retention's forward: torch's counter over
    a training step's forward and backward gives the same figure (a whole number of chunks: no padding)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = _config(retention_mode=mode, fuse_linear_cross_entropy=True)
    model = RetNetForCausalLM(config).train()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    expected = 6 * linear + 3 * {"auto": _parallel(length), "chunkwise": _chunkwise(16),
                                 "recurrent": LAYER_HEADS * 4 * K * V}[mode]
    assert flops_per_token(config, length) == expected
    ids = torch.randint(0, config.vocab_size, (2, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert counter.get_total_flops() / ids.numel() == expected
