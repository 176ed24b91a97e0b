"""Activation parameters beyond float32's range (where SAU, SmeLU, gSmeLU and Leaky ReLU compute) are refused when the
config loads, naming the parameter: they were accepted, then the first forward raised a RuntimeError ("value cannot be
converted to type float without overflow") or returned nan everywhere. Values at the range's end still compute."""

import math

import pytest
import torch

from retnet.model import RetNetConfig
from retnet.model.activations import get_activation

SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize(("name", "kwargs", "param"), [
    ("smelu", {"beta": 1e39}, "beta"),
    ("gsmelu", {"alpha": 1e39}, "alpha"),
    ("gsmelu", {"beta": 1e39, "trainable": True}, "beta"),
    ("gsmelu", {"g_minus": -1e39}, "g_minus"),
    ("gsmelu", {"t": 1e39}, "t"),
    ("sau", {"sigma": 1e39}, "sigma"),
    ("sau", {"alpha": 1e39}, "alpha"),
    ("leaky_relu", {"negative_slope": 1e39}, "negative_slope"),
])
def test_parameters_past_float32_are_refused_when_the_config_loads(name, kwargs, param):
    with pytest.raises(ValueError, match=rf"hidden_act \(layer 0\): activation '{name}': {param} must be a finite real "
                                         rf"number within float32's range .*got {param}=-?1e\+39"):
        RetNetConfig(**SIZES, hidden_act=name, hidden_act_kwargs=kwargs)


def test_a_gsmelu_width_past_float32_is_refused():
    # Each end representable, their sum not: the quadratic's position rounded to 0 and every input took the left piece.
    with pytest.raises(ValueError, match=r"alpha \+ beta must be within float32's range .*alpha=3e\+38, beta=3e\+38"):
        RetNetConfig(**SIZES, hidden_act="gsmelu", hidden_act_kwargs={"alpha": 3e38, "beta": 3e38})


@pytest.mark.parametrize("trainable", [False, True])
def test_values_at_the_range_end_compute(trainable):
    x = torch.tensor([-1e38, 0.0, 1e30])
    smelu = get_activation("smelu", beta=3e38)(x)
    assert torch.allclose(smelu.double(), (x.double() + 3e38) ** 2 / (4 * 3e38), rtol=1e-5)
    gsmelu = get_activation("gsmelu", alpha=1.7e38, beta=1.7e38, trainable=trainable)(x)
    assert torch.allclose(gsmelu.double(), (x.double() + 1.7e38) ** 2 / (4 * 1.7e38), rtol=1e-5)
    sau = get_activation("sau", sigma=3e38)(torch.tensor([0.0]))
    assert math.isclose(sau.item(), 0.85 * 3e38 / math.sqrt(2 * math.pi), rel_tol=1e-5)
