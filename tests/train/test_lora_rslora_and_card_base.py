"""The README's LoRA fine-tuning section, walked: its refusals and the adapter export's layout."""

from __future__ import annotations

import copy
import json

import pytest

from retnet.train.config import ConfigError, build_config


def test_use_rslora_without_a_rank_is_refused_like_use_dora():
    """``--lora.use_rslora=true`` with the rank forgotten ran a full fine-tune without a word (``use_dora`` and
    ``target_modules`` were refused so)."""
    with pytest.raises(ConfigError, match=r"lora\.use_rslora is set but lora\.rank is 0"):
        build_config({"lora": {"use_rslora": True}})
    assert build_config({"lora": {"rank": 4, "use_rslora": True}}).lora.use_rslora


@pytest.mark.parametrize("where, name", [("local", None), ("hub", "org/base")])
def test_the_adapters_model_card_names_its_base(tmp_path, tokenizer_dir, where, name):
    """peft's ``adapter/README.md`` said ``base_model: ''`` (and the tag ``base_model:adapter:``) while
    ``adapter_config.json`` named the base: the card's base is the config's, a hub snapshot's by its id."""
    from transformers import AutoTokenizer

    from retnet.model import RetNetForCausalLM
    from retnet.train.config import LoraConfig
    from retnet.train.lora import ADAPTER_DIR, apply_lora, export_lora

    from .conftest import save_micro_base

    base = tmp_path / "base" if where == "local" else tmp_path / "hub" / "models--org--base" / "snapshots" / "abc123"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    save_micro_base(base, tokenizer)
    model = RetNetForCausalLM.from_pretrained(base)
    cfg, targets = LoraConfig(rank=2, target_modules=["q_proj"]), ["q_proj"]
    apply_lora(model, cfg, targets, base)
    config = copy.deepcopy(model.config)
    config.name_or_path = ""  # the trainer's: built from the run's config, it names no directory
    out = export_lora(tmp_path / "export", config, model.state_dict(), tokenizer, cfg, targets, base)

    want = name or str(base.resolve())
    assert json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"] == want
    card = (out / ADAPTER_DIR / "README.md").read_text().split("---")[1]
    assert f"base_model: {want}\n" in card and f"- base_model:adapter:{want}\n" in card, card
    # the merged export names no base of its own
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())
