"""peft's tuners other than LoRA find default targets for model_type "retnet", as they do for Llama: each read a dict
of its own, copied from LoRA's when peft was imported, so only LoRA's had a "retnet" entry and every other
get_peft_model without target_modules raised "Please specify `target_modules`"."""

import pytest
import torch

from tests.model.conftest import make_model

LINEARS = {"q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "up_proj", "down_proj"}  # gate_proj: ffn_glu is off

# config class name, its keyword arguments, and the module names it must adapt by default
TUNERS = [
    ("IA3Config", {}, {"k_proj", "v_proj", "down_proj"}),
    ("LoHaConfig", {"r": 2}, LINEARS),
    ("LoKrConfig", {"r": 2}, LINEARS),
    ("OFTConfig", {"r": 0, "oft_block_size": 8}, LINEARS),
    ("BOFTConfig", {"boft_block_size": 4}, LINEARS),
    ("VeraConfig", {"r": 4}, LINEARS),
    ("AdaLoraConfig", {"init_r": 4, "target_r": 2, "total_step": 10}, LINEARS),
    ("HRAConfig", {"r": 2}, LINEARS),
    ("FourierFTConfig", {"n_frequency": 16}, LINEARS),
    ("LNTuningConfig", {}, {"retention_norm", "ffn_norm", "norm"}),
]


def _adapted_modules(model) -> set:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


@pytest.mark.parametrize(("config_name", "kwargs", "expected"), TUNERS, ids=[t[0] for t in TUNERS])
def test_tuner_without_target_modules_adapts_retnet_and_trains_only_its_adapter(config_name, kwargs, expected):
    import peft

    model = peft.get_peft_model(make_model(), getattr(peft, config_name)(task_type="CAUSAL_LM", **kwargs))
    assert _adapted_modules(model) == expected
    if config_name == "IA3Config":  # IA3 scales the FFN's down projection's input, the others' output
        assert model.peft_config["default"].feedforward_modules == {"down_proj"}

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    prefix = model.base_model.prefix
    assert trainable and all(prefix in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    ids = torch.randint(2, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable


def test_ia3_adapter_saved_without_target_modules_loads_back_to_the_same_outputs(tmp_path):
    import peft

    model = peft.get_peft_model(make_model(), peft.IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # IA3 starts as the identity: make the adapter do something to compare
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        assert not torch.allclose(expected, make_model()(ids).logits)
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(make_model(), tmp_path / "adapter").eval()
    assert _adapted_modules(loaded) == {"k_proj", "v_proj", "down_proj"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
