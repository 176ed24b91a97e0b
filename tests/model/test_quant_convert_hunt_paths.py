"""Bugs found by differential tests of int8 quantization, the fla converter and hub-path lookup: each test failed
before its fix (tiny models, in process)."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from safetensors.torch import save_file

from retnet.model import RetNetForCausalLM
from retnet.model.convert_fla import convert_fla_checkpoint

from .conftest import make_model
from .fla_checkpoints import _synthetic_fla_checkpoint

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'retnet-stack[quant]')")


def _unclipped() -> bool:
    from retnet.model.quantization import unclipped_int8

    return unclipped_int8()


# torchao < 0.18 keeps its config's clipping scale (retnet.model.quantization.unclipped_int8), not idempotent
needs_unclipped_int8 = pytest.mark.skipif(importlib.util.find_spec("torchao") is None or not _unclipped(),
                                          reason="torchao < 0.18 quantizes with its clipping scale")


def _ids(batch=2, length=29, vocab=101):
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------------------
@needs_unclipped_int8
@torch.no_grad()
def test_quantizing_a_saved_quantized_model_again_gives_the_same_model(tmp_path):
    """A quantized model's export holds its dequantized weights, to be quantized again at load (README). torchao's
    symmetric scale, max|w| / 127.5 with the extreme code clipped to 127, is not that of the dequantized row
    (127 s or 128 s at the extreme): requantized, every such row's scale moved, and the served model's logits
    differed from the evaluated one's by ~0.6% (relative), over half of what int8 costs here (~1%)."""
    from retnet.model.quantization import quantize_model

    model = make_model()
    quantize_model(model, "int8")
    model.save_pretrained(tmp_path)
    again = RetNetForCausalLM.from_pretrained(tmp_path).eval()
    quantize_model(again, "int8")
    for ours, theirs in zip(model.model.layers.modules(), again.model.layers.modules()):
        if isinstance(ours, torch.nn.Linear):
            assert torch.equal(ours.weight.dequantize(), theirs.weight.dequantize())
    ids = _ids()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@needs_unclipped_int8
@torch.no_grad()
def test_int8_rows_zero_constant_and_one_signed_are_represented_as_well_as_a_row_can_be():
    """A zero row stays zero, a constant row (every element the same, a single int8 step) and its negation are
    exact to the dtype's rounding, a random row is within half a step of its scale."""
    from retnet.model.quantization import quantize_model

    model = make_model()
    projection = model.model.layers[0].mlp.down_proj
    weight = projection.weight
    weight[0] = 0
    weight[1] = 0.3
    weight[2] = -0.3
    before = weight.detach().clone()
    quantize_model(model, "int8")
    dense = projection.weight.dequantize()
    assert torch.equal(dense[0], before[0])
    torch.testing.assert_close(dense[1:3], before[1:3], rtol=1e-6, atol=0)
    step = before[3:].abs().amax(1, keepdim=True) / 127
    assert ((dense[3:] - before[3:]).abs() <= step / 2 * (1 + 1e-5)).all()


# ----------------------------------------------------------------------------------------------------------
# hub-path lookup
# ----------------------------------------------------------------------------------------------------------
def test_a_name_too_long_for_a_path_is_refused_as_a_missing_directory():
    """On Python < 3.12 ``Path.exists`` raises for a name the file system cannot take (ENAMETOOLONG, or EACCES
    under an unreadable directory): an OSError traceback out of every command, whose handlers catch HubError."""
    from retnet.model.hub import HubError, resolve_pretrained

    with pytest.raises(HubError, match=r"^'a{300}': "):
        resolve_pretrained("a" * 300)


def test_a_dangling_symlink_is_refused_naming_its_target_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """A link whose target is gone reads as a hub id ('model'), so it was reported as a failed download."""
    from retnet.model.hub import HubError, resolve_pretrained

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").symlink_to(tmp_path / "gone")
    with pytest.raises(HubError, match=r"^'model': a symbolic link to '.*gone', which does not exist"):
        resolve_pretrained("model")


# ----------------------------------------------------------------------------------------------------------
# retnet-convert-fla
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("missing", [
    "model.layers.1.attn.k_proj.weight", "model.layers.1.attn.v_proj.weight", "model.layers.0.attn.g_proj.weight",
    "model.layers.1.attn.o_proj.weight",
    # fla's config says fuse_norm (its default): the fused head norm's name, not the unfused one's
    "model.layers.0.attn.g_norm_swish_gate.weight",
    # the FFN's width is read from it: it was refused as "config field intermediate_size=None: is not set"
    "model.layers.0.mlp.down_proj.weight",
])
def test_a_missing_projection_is_refused_naming_it_and_nothing_is_written(tmp_path, capsys, missing):
    """A missing k/v/g/o projection went into the state dict as None: AttributeError ('NoneType' object has no
    attribute 'to'), a traceback out of retnet-convert-fla, where the README promises a refusal by name."""
    from retnet.model.convert_fla import main

    weights = _synthetic_fla_checkpoint(tmp_path / "fla")
    del weights[missing]
    save_file(weights, tmp_path / "fla" / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "fla"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"retnet-convert-fla: error: fla checkpoint has no {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_one_dimensional_down_projection_is_refused_by_name(tmp_path):
    """Its second dimension is the FFN's width: an IndexError (tuple index out of range) before any check."""

    weights = _synthetic_fla_checkpoint(tmp_path / "fla")
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64)
    save_file(weights, tmp_path / "fla" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight has shape \(64,\), expected"):
        convert_fla_checkpoint(tmp_path / "fla", tmp_path / "out")


@pytest.mark.parametrize(("config", "weights", "error"), [
    # SafetensorError is neither ValueError nor OSError: a traceback
    (None, b"not a safetensors file", r"cannot read .*model\.safetensors.* \(SafetensorError: "),
    ('{"model_type": "retnet",', None, r"cannot read .*config\.json.*: Expecting property name"),
    ("5", None, r"config\.json is not a flash-linear-attention RetNet config"),  # a TypeError from `in`
])
def test_damaged_files_are_refused_naming_the_file(tmp_path, capsys, config, weights, error):
    from retnet.model.convert_fla import main

    state = _synthetic_fla_checkpoint(tmp_path / "fla")
    save_file(state, tmp_path / "fla" / "model.safetensors")
    if config is not None:
        (tmp_path / "fla" / "config.json").write_text(config)
    if weights is not None:
        (tmp_path / "fla" / "model.safetensors").write_bytes(weights)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "fla"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert re.search(rf"^retnet-convert-fla: error: .*{error}", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_shard_index_without_a_weight_map_is_refused_naming_it(tmp_path):

    _synthetic_fla_checkpoint(tmp_path / "fla")
    (tmp_path / "fla" / "model.safetensors.index.json").write_text('{"metadata": {}}')  # was a KeyError
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json' has no weight_map"):
        convert_fla_checkpoint(tmp_path / "fla", tmp_path / "out")
