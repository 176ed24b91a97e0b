"""``model.init_from`` whose weights are not all its model's (missing, or another class's) is refused naming it, as
the README says, instead of transformers drawing the missing ones at random with only a load report; and
``train.compile`` does not recompile the host bookkeeping of packed rows (``cu_seqlens``) at every micro-batch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError

from .conftest import save_micro_base
from .test_init_from import fine_tune_args

HOLE = "model.layers.1.mlp.down_proj.weight"


def _holed(source: Path, target: Path, key: str = HOLE) -> Path:
    """A copy of the export ``source`` whose model.safetensors lacks ``key``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    del weights[key]
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _tiny(tie: bool, num_labels: int | None = None):
    from retnet.model import RetNetConfig

    extra = {} if num_labels is None else {"num_labels": num_labels}
    return RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, chunk_size=16,
                                    vocab_size=64, tie_word_embeddings=tie, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("base")
    save_micro_base(path, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    return path


def test_an_init_from_missing_a_weight_is_refused_naming_it(base, micro, tmp_path, capsys):
    # Before: exit 0, the layer's down_proj trained from a random init after transformers' "MISSING" report.
    holed = _holed(base, tmp_path / "holed")
    out = tmp_path / "out"
    assert main(fine_tune_args(micro(out), holed)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"model.init_from {str(holed)!r}" in err and f"missing: {HOLE}" in err, err
    assert "Traceback" not in err and not (out / "checkpoints").exists()


def test_a_reward_models_export_is_refused_as_a_causal_lm_init_from(base, micro, tmp_path, capsys):
    """A reward model's export (``runs/rm/export``) given to an SFT/DPO/GRPO run: its score head would be dropped and
    the LM head be the tied embedding (untied: a random matrix). Refused before the data is read; one whose
    config.json names no architecture is refused by its weights."""
    from retnet.model import RetNetConfig, RetNetForSequenceClassification
    from retnet.train.trainer import _pretrained_model

    config = json.loads((base / "config.json").read_text())
    for tie in (True, False):
        export = tmp_path / f"rm-{tie}"
        shutil.copytree(base, export)
        (export / "model.safetensors").unlink()
        classifier = RetNetForSequenceClassification(RetNetConfig.from_dict(
            {**config, "tie_word_embeddings": tie, "num_labels": 1, "id2label": None, "label2id": None}))
        classifier.save_pretrained(export)
        out = tmp_path / f"out-{tie}"
        assert main(fine_tune_args(micro(out), export)) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert f"model.init_from {str(export)!r} holds a RetNetForSequenceClassification" in err, err
        assert "Traceback" not in err and not (out / "checkpoints").exists()

        saved = json.loads((export / "config.json").read_text())
        saved.pop("architectures")
        (export / "config.json").write_text(json.dumps(saved))
        with pytest.raises(ConfigError, match=re.escape("unexpected: score.weight")) as refusal:
            _pretrained_model(export, RetNetConfig.from_dict(saved))
        assert f"model.init_from {str(export)!r}" in str(refusal.value)


def test_a_reward_model_from_a_causal_lm_export_draws_only_its_head(tmp_path):
    """A reward run from a causal LM's export gets a new score head (and drops the LM head), as intended; any other
    weight missing is refused."""
    from retnet.model import RetNetForCausalLM, RetNetForSequenceClassification
    from retnet.train.trainer import _pretrained_model

    for tie in (True, False):
        export = tmp_path / f"lm-{tie}"
        RetNetForCausalLM(_tiny(tie)).save_pretrained(export)
        model = _pretrained_model(export, _tiny(tie, num_labels=1), RetNetForSequenceClassification)
        assert type(model) is RetNetForSequenceClassification
        holed = _holed(export, tmp_path / f"holed-{tie}")
        with pytest.raises(ConfigError, match=re.escape(f"missing: {HOLE}")) as refusal:
            _pretrained_model(holed, _tiny(tie, num_labels=1), RetNetForSequenceClassification)
        assert f"model.init_from {str(holed)!r}" in str(refusal.value) and "score" not in str(refusal.value)


def test_compiled_layers_do_not_recompile_for_each_new_cu_seqlens():
    """Every micro-batch brings a new cu_seqlens tensor. Traced, SharedHostOffsets.get guarded its frame on the dict
    entry of the previous tensor's id(): a recompile per micro-batch until dynamo's recompile limit (8), warned of."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from retnet.model import RetNetForCausalLM

    torch.manual_seed(0)
    model = RetNetForCausalLM(_tiny(True))
    torch._dynamo.reset()
    try:
        for layer in model.model.layers:
            layer.compile(backend="eager")
        ids = torch.randint(0, 64, (1, 32))
        compiled = []
        for cut in (5, 9, 20, 11):
            with torch.no_grad():
                model(input_ids=ids, cu_seqlens=torch.tensor([0, cut, 32]))
            compiled.append(counters["frames"]["total"])
        assert compiled[1:] == [compiled[0]] * 3, compiled  # nothing compiled again after the first forward
    finally:
        torch._dynamo.reset()


def test_a_damaged_weights_file_is_refused_naming_init_from(tmp_path):
    """A model.safetensors cut short (a copy interrupted): safetensors' own error, not caught, was a traceback."""
    from retnet.model import RetNetForCausalLM
    from retnet.train.trainer import _pretrained_model

    export = tmp_path / "cut"
    RetNetForCausalLM(_tiny(True)).save_pretrained(export)
    weights = (export / "model.safetensors").read_bytes()
    (export / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ConfigError, match="its weights could not be loaded: SafetensorError") as refusal:
        _pretrained_model(export, _tiny(True))
    assert f"model.init_from {str(export)!r}" in str(refusal.value)


@pytest.mark.parametrize("override", [{"hidden_act": "sau"}, {"hidden_act": ["gelu", "sau"]}, {"ffn_bias": True}])
def test_model_settings_that_add_weights_still_load_over_an_init_from(tmp_path, override):
    # model.* settings apply on top of init_from's config: weights they add (SAU's alpha and sigma, FFN biases)
    # start at their constructor's values, as before the weight check; it refused them as "missing"
    import torch

    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.train.trainer import _pretrained_model

    export = tmp_path / "export"
    RetNetForCausalLM(_tiny(tie=True)).save_pretrained(export)
    config = RetNetConfig.from_dict({**RetNetConfig.from_pretrained(export).to_dict(), **override})
    model = _pretrained_model(export, config)
    saved = RetNetForCausalLM.from_pretrained(export)
    assert torch.equal(model.model.layers[1].retention.q_proj.weight, saved.model.layers[1].retention.q_proj.weight)
    # ... while a weight the export's own config names stays required
    holed = _holed(export, tmp_path / "holed")
    with pytest.raises(ConfigError, match=f"missing: {re.escape(HOLE)}"):
        _pretrained_model(holed, config)
