"""transformers-side loading and saving of RetNet exports: older layouts, the heads, dtypes."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from retnet.model import RetNetForCausalLM, RetNetForSequenceClassification, RetNetModel

SAU_VALUES = {0: (0.3, -0.2), 1: (0.4, -0.3)}  # layer: (alpha, log sigma), not the constructor's


def _old_sau_export(model_factory, directory, **act_kwargs):
    """A save_pretrained export as written before SAU's alpha/log_sigma became [1]: 0-dim tensors."""
    model = model_factory(hidden_act="sau", hidden_act_kwargs=act_kwargs)
    with torch.no_grad():
        for index, (alpha, log_sigma) in SAU_VALUES.items():
            model.model.layers[index].mlp.act_fn.alpha.fill_(alpha)
            model.model.layers[index].mlp.act_fn.log_sigma.fill_(log_sigma)
    model.save_pretrained(directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    old = {key: value.reshape(()) if key.endswith((".act_fn.alpha", ".act_fn.log_sigma")) else value
           for key, value in tensors.items()}
    assert sum(value.dim() == 0 for value in old.values()) == 4
    save_file(old, path, metadata={"format": "pt"})
    return model


@pytest.mark.parametrize(("cls", "act_kwargs", "dtype"), [
    (RetNetForCausalLM, {"trainable_sigma": True}, None),
    (AutoModelForCausalLM, {"trainable_alpha": False}, None),  # alpha a buffer
    (RetNetModel, {}, None),
    (AutoModel, {}, None),
    (RetNetForSequenceClassification, {}, None),
    (RetNetForCausalLM, {}, torch.bfloat16),
], ids=["causal-lm", "auto-buffer", "base", "auto-base", "classifier", "bf16"])
def test_from_pretrained_loads_an_export_with_0_dim_sau_parameters(model_factory, tmp_path, cls, act_kwargs, dtype):
    source = _old_sau_export(model_factory, tmp_path, **act_kwargs)
    loaded = cls.from_pretrained(tmp_path, **({"dtype": dtype} if dtype else {}))
    base = loaded if isinstance(loaded, RetNetModel) else loaded.model
    for index, (alpha, log_sigma) in SAU_VALUES.items():
        act = base.layers[index].mlp.act_fn
        assert act.alpha.shape == act.log_sigma.shape == (1,)
        assert act.alpha.dtype == (dtype or torch.float32)
        tol = 1e-2 if dtype else 1e-7
        assert act.alpha.item() == pytest.approx(alpha, abs=tol)
        assert act.log_sigma.item() == pytest.approx(log_sigma, abs=tol)
    if cls in (RetNetForCausalLM, AutoModelForCausalLM) and dtype is None:
        ids = torch.randint(2, 101, (1, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=0, atol=0)
        # Saved again it is the current layout.
        loaded.save_pretrained(tmp_path / "again")
        shapes = {key: tuple(value.shape) for key, value in load_file(tmp_path / "again" / "model.safetensors").items()
                  if ".act_fn." in key}
        assert len(shapes) == 4 and set(shapes.values()) == {(1,)}
