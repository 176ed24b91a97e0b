"""README walk of LoRA fine-tuning and knowledge distillation: what a resume does with a base (``model.init_from``)
or teacher (``distill.teacher``) whose weight files are damaged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from retnet.train.config import ConfigError
from retnet.train.lora import base_fingerprint


def _weights(directory, suffix: str):
    state = {"model.embed_tokens.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4)}
    file = directory / f"model.{suffix}"
    if suffix == "safetensors":
        save_file(state, str(file))
    else:
        torch.save(state, file)
    return file


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
@pytest.mark.parametrize("keep", [0.5, 0.05])  # the tensors cut off, the header itself cut
def test_a_damaged_weight_file_is_refused_naming_the_setting_and_the_file(tmp_path, suffix, keep):
    """A resume fingerprints the base's (or teacher's) weights before anything else reads them: a truncated file
    was a safetensors/pickle traceback, not a refusal naming the setting."""
    file = _weights(tmp_path, suffix)
    whole = base_fingerprint(tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ConfigError, match=rf"its weight file model\.{suffix} could not be read"):
        base_fingerprint(tmp_path)
    with pytest.raises(ConfigError, match=rf"^distill\.teacher '.*': its weight file model\.{suffix} could not be"):
        base_fingerprint(tmp_path, "distill.teacher")
    file.write_bytes(data)
    assert base_fingerprint(tmp_path) == whole


def test_a_teacher_of_other_shaped_weights_is_refused_naming_them(tmp_path):
    """A config.json whose sizes are not its weights' was refused with transformers' "look at the above report"
    (the weights named only in a log table), not by the weights' names."""
    import json

    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.train.config_tuning import DistillConfig
    from retnet.train.distill import load_teacher

    config = RetNetConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)
    RetNetForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(hidden_size=32, intermediate_size=64)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"its weights do not match its config\.json \(mismatched: .*"
                                          r"model\.embed_tokens\.weight"):
        load_teacher(DistillConfig(teacher=str(tmp_path)), tmp_path, RetNetConfig.from_pretrained(tmp_path),
                     torch.device("cpu"), torch.float32)
