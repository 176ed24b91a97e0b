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


def test_from_pretrained_loads_an_export_of_a_trainable_gsmelu_with_0_dim_parameters(model_factory, tmp_path):
    # from_pretrained sets parameters itself (no _load_from_state_dict): the checkpoint conversion registered for
    # model_type retnet reshaped SAU's alpha and log_sigma, and refused gSmeLU's beta, g_minus, g_plus and t as
    # size mismatches ([] against [1])
    from safetensors.torch import load_file, save_file

    from retnet.model import RetNetForCausalLM

    source = model_factory(hidden_act="gsmelu", hidden_act_kwargs={"trainable": True, **GSMELU})
    with torch.no_grad():
        source.model.layers[1].mlp.act_fn.t.fill_(-0.2)  # not the constructor's: the loaded value is the saved one
    source.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    old = {key: value.reshape(()) if ".act_fn." in key else value for key, value in load_file(path).items()}
    assert sum(value.dim() == 0 for value in old.values()) == 2 * len(GSMELU)
    save_file(old, path, metadata={"format": "pt"})
    loaded = RetNetForCausalLM.from_pretrained(tmp_path)
    for layer in loaded.model.layers:
        assert all(getattr(layer.mlp.act_fn, key).shape == (1,) for key in GSMELU)
    assert loaded.model.layers[1].mlp.act_fn.t.item() == pytest.approx(-0.2)
    ids = torch.randint(2, 101, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=0, atol=0)
