"""Causal-LM surface against what transformers users pass: an empty EOS list, labels of the wrong shape."""

import json
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import retnet  # noqa: F401
from retnet.model import RetNetConfig, RetNetForCausalLM

TINY = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
PROMPT = torch.tensor([[3, 4, 5]])


def tiny(**overrides) -> RetNetForCausalLM:
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def no_eos_reference():
    return tiny().generate(PROMPT, max_new_tokens=4, do_sample=False)


def test_an_empty_eos_list_is_no_eos(no_eos_reference):
    # Kept as [], generate took its first id for the pad: IndexError inside transformers (Llama's too).
    config = RetNetConfig(**TINY, eos_token_id=[])
    assert config.eos_token_id is None
    model = tiny(eos_token_id=[])
    assert model.generation_config.eos_token_id is None
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), no_eos_reference)


def test_an_empty_eos_list_in_config_json_or_an_override_loads_as_none(tmp_path, no_eos_reference):
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": []}))
    assert AutoConfig.from_pretrained(tmp_path).eos_token_id is None
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), no_eos_reference)
    assert AutoConfig.from_pretrained(tmp_path, eos_token_id=[]).eos_token_id is None


def test_an_empty_eos_list_given_to_generate_is_no_eos(no_eos_reference):
    # generate(eos_token_id=[]) or a generation_config.json of [] reached the same IndexError.
    model = tiny(eos_token_id=[2, 3])
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False, eos_token_id=[]), no_eos_reference)
    model.generation_config.eos_token_id = []
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), no_eos_reference)


@pytest.mark.parametrize("name", ["labels", "shift_labels"])
def test_labels_not_shaped_like_the_inputs_are_refused_naming_both_shapes(name):
    # [T] labels for a batch of one raised an IndexError from the shift; [B, T - 1] ones cross_entropy's ValueError
    # on the flattened counts (8 logits against 6 labels), naming neither. (With logits_to_keep they were checked.)
    model = tiny()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ValueError, match=rf"{name} must be \[B, T\] like the inputs, \(1, 4\); got \(4,\)"):
        model(ids[:1], **{name: ids[0]})
    with pytest.raises(ValueError, match=rf"{name} must be \[B, T\] like the inputs, \(2, 4\); got \(2, 3\)"):
        model(ids, **{name: ids[:, :3]})
    assert model(ids, **{name: ids}).loss.isfinite()


def test_use_cache_asked_for_under_gradient_checkpointing_is_warned_as_transformers_does(caplog):
    # No cache is made there (transformers' models set use_cache=False); asked for by name, it was None silently.
    model = tiny().train()
    model.activation_checkpointing_enable()
    hf_logging.warning_once.cache_clear()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            assert model(PROMPT).cache is None
            assert not [r for r in caplog.records if "gradient checkpointing" in r.getMessage()]
            out = model(PROMPT, labels=PROMPT, use_cache=True)
    finally:
        hf_logging.disable_propagation()
    assert out.cache is None
    out.loss.backward()
    assert [r for r in caplog.records if "use_cache=True is incompatible with gradient checkpointing" in r.getMessage()]
