"""RetNetConfig cases found by fuzzing its fields: each refused at load naming the field, or cheap to check."""

import pytest

import retnet.model.configuration_retnet as configuration
from retnet.model import RetNetConfig
from retnet.model.modeling_retnet import RetNetForCausalLM

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, chunk_size=4)


def test_one_activation_for_every_layer_is_checked_once_however_many_layers(monkeypatch):
    """Every layer's activation was instantiated at validation: 2**40 layers hung and exhausted memory, 2**62 raised
    a MemoryError (no ValueError naming a field) while building the per-layer list."""
    calls = []
    real = configuration.validate_activation
    monkeypatch.setattr(configuration, "validate_activation", lambda *args: calls.append(args) or real(*args))
    config = RetNetConfig(**{**TINY, "num_hidden_layers": 2**62, "hidden_act": "smelu",
                             "hidden_act_kwargs": {"beta": 1.5}})
    assert calls == [("smelu", {"beta": 1.5})]
    assert config.layer_activation(2**62 - 1) == ("smelu", {"beta": 1.5})
    with pytest.raises(ValueError, match=r"RetNetConfig\.hidden_act \(layer 0\): unknown activation 'nope'"):
        RetNetConfig(**{**TINY, "num_hidden_layers": 2**62, "hidden_act": "nope"})


def test_per_layer_activations_are_still_checked_and_built_layer_by_layer():
    per_layer = dict(hidden_act=["sau", "identity"], hidden_act_kwargs=[{"alpha": 0.2}, None])
    with pytest.raises(ValueError, match=r"\(layer 1\): activation 'smelu': beta must be > 0"):
        RetNetConfig(**{**TINY, "hidden_act": ["gelu", "smelu"], "hidden_act_kwargs": [None, {"beta": 0.0}]})
    config = RetNetConfig(**TINY, **per_layer)
    assert config.layer_activations == [("sau", {"alpha": 0.2}), ("identity", {})]
    model = RetNetForCausalLM(config)
    assert [type(layer.mlp.act_fn).__name__ for layer in model.model.layers] == ["SAU", "Identity"]


@pytest.mark.parametrize("sizes, field", [
    (dict(intermediate_size=2**60), "intermediate_size"),  # torch: TypeError "Overflow when unpacking long long"
    (dict(vocab_size=2**60), "vocab_size"),  # 2**60 x 16 elements: no tensor can hold them
    (dict(hidden_size=2**40, num_attention_heads=2**32), "hidden_size"),  # not the derived intermediate_size
])
def test_a_weight_beyond_torchs_int64_elements_is_refused_at_load(sizes, field):
    with pytest.raises(ValueError, match=rf"^RetNetConfig\.{field} must keep the .* weight .* below 2\*\*63 elements"):
        RetNetConfig(**{**TINY, **sizes})


def test_the_largest_weight_torch_can_index_is_accepted():
    config = RetNetConfig(**{**TINY, "vocab_size": 2**59 - 1})  # (2**59 - 1) x 16 < 2**63 elements
    assert config.vocab_size == 2**59 - 1


@pytest.mark.parametrize("sizes", [dict(hidden_size=1, num_attention_heads=4),
                                   dict(hidden_size=16, num_attention_heads=32)])
def test_a_head_dim_derived_as_zero_is_refused_naming_the_sizes_given(sizes):
    """head_dim defaults to hidden_size // num_attention_heads: 0 here, which was refused as 'head_dim must be a
    positive integer; got 0', a field the config never set."""
    with pytest.raises(ValueError, match=r"^RetNetConfig\.hidden_size must be divisible by num_attention_heads"):
        RetNetConfig(**{**TINY, **sizes})
    with pytest.raises(ValueError, match=r"^RetNetConfig\.head_dim must be a positive integer .*; got 0"):
        RetNetConfig(**{**TINY, "head_dim": 0})


HUGE = 10**400  # an int JSON and TOML read whole, beyond float's range


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=HUGE), r"hidden_size must be a positive integer below 2\*\*63"),
    (dict(chunk_size=2**63), r"chunk_size must be a positive integer below 2\*\*63"),
    (dict(head_dim=2**63), r"head_dim must be a positive integer below 2\*\*63"),
    (dict(rope_theta=HUGE), r"rope_theta must be a finite number"),
    (dict(value_factor=1e308), r"value_factor must be > 0 and make value_factor \* hidden_size"),
    (dict(hidden_act="leaky_relu", hidden_act_kwargs={"negative_slope": HUGE}),
     r"\(layer 0\): activation 'leaky_relu': negative_slope must be a finite real number"),
])
def test_numbers_beyond_float_and_int64_are_refused_naming_the_field(fields, message):
    """Each raised an OverflowError (int too large to convert to float; round() of value_factor · hidden_size = inf)
    instead of the ValueError that names the field."""
    with pytest.raises(ValueError, match=message):
        RetNetConfig(**{**TINY, **fields})


def test_whole_numbers_within_range_still_pass_as_floats_and_sizes():
    config = RetNetConfig(**{**TINY, "rope_theta": 10**300, "chunk_size": 2**63 - 1, "hidden_act": "leaky_relu",
                             "hidden_act_kwargs": {"negative_slope": 3}})
    assert config.rope_theta == 10**300 and config.chunk_size == 2**63 - 1


@pytest.mark.parametrize("fields, message", [
    (dict(id2label=5), r"^RetNetConfig\.id2label must be a dict of label ids"),  # was AttributeError: no .items
    (dict(id2label={"a": "x"}), r"^RetNetConfig\.id2label must be a dict of label ids"),  # was int("a")'s ValueError
    (dict(id2label={"--1": "x"}), r"^RetNetConfig\.id2label must be a dict of label ids"),  # int()'s, naming no field
    (dict(dtype="x"), r"^RetNetConfig\.dtype must be a torch dtype or its name"),  # was AttributeError from torch
    (dict(dtype=[]), r"^RetNetConfig\.dtype must be a torch dtype or its name"),  # was IndexError in to_dict
    (dict(torch_dtype="nn"), r"^RetNetConfig\.torch_dtype must be a torch dtype or its name"),
])
def test_transformers_own_fields_that_would_crash_are_refused_naming_them(fields, message):
    with pytest.raises(ValueError, match=message):
        RetNetConfig(**TINY, **fields)


def test_a_field_config_json_cannot_hold_is_refused_at_load():
    import datetime

    with pytest.raises(ValueError, match=r"^RetNetConfig\.output_attentions must be a JSON value"):
        RetNetConfig(**TINY, output_attentions=datetime.date(2020, 1, 1))


def test_transformers_fields_in_their_documented_forms_still_load():
    import torch

    config = RetNetConfig(**TINY, id2label={"0": "bad", "1": "good"}, dtype="bfloat16")
    assert config.id2label == {0: "bad", 1: "good"} and config.dtype is torch.bfloat16
    assert RetNetConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
