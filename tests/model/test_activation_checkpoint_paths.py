"""Older checkpoints of the trainable activations still load: parameters written 0-dim before they became
one-element tensors (FSDP2 shards no 0-dim parameter)."""

import pytest
import torch

from retnet.model.activations import GeneralizedSmeLU, generalized_smelu

GSMELU = {"alpha": 1.5, "beta": 2.0, "g_minus": -0.1, "g_plus": 1.2, "t": 0.3}


def test_trainable_gsmelu_loads_a_state_dict_of_its_former_0_dim_parameters():
    # SAU's former 0-dim α and log σ were converted when they became [1]; gSmeLU's five, changed the same day,
    # were refused as size mismatches ([] against [1]).
    module = GeneralizedSmeLU(trainable=True)
    module.load_state_dict({key: torch.tensor(value) for key, value in GSMELU.items()})
    assert all(getattr(module, key).shape == (1,) for key in GSMELU)
    x = torch.linspace(-4, 4, 17)
    torch.testing.assert_close(module(x), generalized_smelu(x, **GSMELU))


def test_a_state_dict_of_one_element_parameters_loads_as_before():
    module = GeneralizedSmeLU(trainable=True)
    module.load_state_dict({key: torch.tensor([value]) for key, value in GSMELU.items()})
    assert module.t.item() == pytest.approx(0.3) and module.beta.shape == (1,)
